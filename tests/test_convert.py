"""edgecad.convert.widen_ffn: a model's feed-forward widened with zero neurons on its quantized bytes (the registry's
7B-class target from the 1.5B) is the same model: the same greedy tokens, only wider and bigger."""
import hashlib
import shutil

import pytest

from edgecad import Engine, registry
from edgecad.convert import widen_ffn
from edgecad.errors import EdgecadError
from edgecad.gguf_file import read_gguf
from helpers import PROMPTS


def _tokens(path) -> list[list[int]]:
    with Engine(path, n_ctx=256, memory_budget=None, n_threads=2) as e:
        return [e.create_completion(p, temperature=0.0, max_tokens=24)["edgecad"]["token_ids"] for p in PROMPTS]


def test_a_widened_model_gives_its_source_s_greedy_tokens(tmp_path, quantized_pair):
    """The tiny quantized target (Q4_0 layers, n_ff 768) widened to 4 x 768: ffn_gate and ffn_up get zero rows,
    each row of ffn_down zero blocks, the metadata the new width; the rest is copied as it is."""
    source = quantized_pair[1]
    wide = widen_ffn(source, tmp_path / "wide.gguf", n_ff=3072, progress=False)
    q, w = read_gguf(source), read_gguf(wide)
    assert q.metadata["qwen2.feed_forward_length"] == 768 and w.metadata["qwen2.feed_forward_length"] == 3072
    assert w.metadata["general.file_type"] == q.metadata["general.file_type"] and w.vocab_digest == q.vocab_digest
    assert set(w.type_bytes()) == set(q.type_bytes()) == {"Q4_0", "Q8_0", "F32"}
    n_layer, ffn = q.metadata["qwen2.block_count"], 3 * 128 * 18 // 32  # Q4_0: 18 bytes per 32 values
    assert wide.stat().st_size - source.stat().st_size == n_layer * (3072 - 768) * ffn
    want = _tokens(source)
    assert _tokens(wide) == want and sum(map(len, want)) > 40


def test_a_width_that_cannot_widen_is_refused_before_anything_is_written(tmp_path, quantized_pair, tiny_dir):
    from edgecad import tiny
    source, dst = quantized_pair[1], tmp_path / "wide.gguf"
    for n_ff, message in ((768, "n_ff 768 does not widen tiny-q-target.gguf: its feed-forward is 768 wide; give a "
                                "larger width"),
                          (512, "n_ff 512 does not widen tiny-q-target.gguf: its feed-forward is 768 wide"),
                          (784, "n_ff 784 is not a multiple of 32, the block size of Q4_0 (blk.0.ffn_gate.weight in "
                                "tiny-q-target.gguf): give a multiple of 32")):
        with pytest.raises(EdgecadError) as e:
            widen_ffn(source, dst, n_ff=n_ff, progress=False)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    mamba = tiny.write_mamba(tiny_dir / "tiny-mamba.gguf")
    with pytest.raises(EdgecadError, match=r"^tiny-mamba.gguf has no feed-forward tensors \(blk.N.ffn_gate/ffn_up/"
                                           r"ffn_down.weight\) to widen$"):
        widen_ffn(mamba, dst, n_ff=512, progress=False)
    assert not dst.exists()


def test_the_registry_derives_a_widened_model_as_its_entry_says(tmp_path, quantized_pair, monkeypatch):
    """A derived entry names how it is computed (ModelSpec.derive, a key of registry.DERIVE): the wide 7B-class
    target is widen_ffn's, with the width of its DERIVE entry; an entry that names none is still the F16 re-encode."""
    source = quantized_pair[1]
    data = widen_ffn(source, tmp_path / "expected.gguf", n_ff=1024, progress=False).read_bytes()
    src = registry.ModelSpec(name="tiny-q", filename="tiny-q.gguf", description="test", packages=("none==0",),
                             size=source.stat().st_size, sha256=hashlib.sha256(source.read_bytes()).hexdigest())
    sp = registry.ModelSpec(name="tiny-q-wide", filename="tiny-q-wide.gguf", description="test", packages=(),
                            size=len(data), sha256=hashlib.sha256(data).hexdigest(), derived_from=src.name,
                            derive="tiny-wide")
    monkeypatch.setitem(registry.DERIVE, "tiny-wide", ("widen_ffn", {"n_ff": 1024}))
    monkeypatch.setitem(registry.MODELS, src.name, src)
    monkeypatch.setitem(registry.MODELS, sp.name, sp)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(source, models / src.filename)
    assert registry.fetch(sp, models, progress=False) == models / sp.filename
    assert (models / sp.filename).read_bytes() == data
    assert registry.DERIVE[registry.ModelSpec("x", "x", "x", (), 0, "").derive] == ("to_f16", {})
    real = registry.spec("qwen2.5-coder-1.5b-wide")
    assert real.derived_from == registry.DEFAULT_TARGET and registry.DERIVE[real.derive][0] == "widen_ffn"
