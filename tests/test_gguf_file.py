"""The GGUF header reader and the layer map."""
import gguf
import pytest

from edgecad.errors import ModelFileError
from edgecad.gguf_file import read_gguf


def test_matches_gguf_reader(tiny_target):
    ours = read_gguf(tiny_target)
    ref = gguf.GGUFReader(str(tiny_target))
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.offset == b.data_offset and a.n_bytes == b.n_bytes and a.type_name == b.tensor_type.name
    assert ours.architecture == "qwen2" and ours.vocab_size == 265


def test_layer_map(tiny_target):
    g = read_gguf(tiny_target)
    layers = g.layers()
    assert [l.index for l in layers] == list(range(g.n_layer)) and g.n_layer == 6
    assert all(l.n_bytes >= 16 * 4096 for l in layers)  # dozens of pages: paging is meaningful
    spans = sorted((l.start, l.end) for l in layers)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))  # no overlap
    for l in layers:  # contiguous: the range is exactly its tensors
        assert l.n_bytes >= sum(t.n_bytes for t in g.tensors if t.name.startswith(f"blk.{l.index}."))
    assert not g.tied_output and g.tensor("output.weight") is not None


def test_vocab_digest(tiny_pair, other_vocab_model):
    d, t = (read_gguf(p) for p in tiny_pair)
    assert d.vocab_digest == t.vocab_digest != ""
    assert read_gguf(other_vocab_model).vocab_digest != t.vocab_digest


def test_bad_files(tmp_path, tiny_target):
    with pytest.raises(ModelFileError, match="not found"):
        read_gguf(tmp_path / "x.gguf")
    with pytest.raises(ModelFileError, match="directory"):
        read_gguf(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ModelFileError, match="not a GGUF"):
        read_gguf(tmp_path / "a.gguf")
    data = tiny_target.read_bytes()
    (tmp_path / "b.gguf").write_bytes(data[:-100])
    with pytest.raises(ModelFileError, match="truncated: its tensors need"):
        read_gguf(tmp_path / "b.gguf")
