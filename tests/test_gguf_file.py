"""The GGUF header reader, the layer map, and the gate in front of llama.cpp (edgecad.gguf_gate)."""
import re

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


# ---------------------------------------------------------------------------- a prefix of the file
# read_gguf maps the file's first PREFIX bytes, doubled while the header goes on past them: a 32-bit process cannot
# map a model over 2 GiB whole, and a few MB of header need no more. Nothing it says may depend on how much it mapped.

import os  # noqa: E402

from edgecad import gguf_file  # noqa: E402


def _mapped_lengths(monkeypatch) -> list:
    """The length of every mapping made from now on (read_gguf's)."""
    import mmap
    lengths, real = [], mmap.mmap

    def spy(fileno, length, *args, **kwargs):
        lengths.append(length)
        return real(fileno, length, *args, **kwargs)
    monkeypatch.setattr(mmap, "mmap", spy)
    return lengths


def _error(path) -> str:
    with pytest.raises(ModelFileError) as e:
        read_gguf(path)
    return str(e.value)


def test_a_header_past_the_first_prefix_maps_more(tiny_target, monkeypatch):
    whole = read_gguf(tiny_target)
    monkeypatch.setattr(gguf_file, "PREFIX", 64)
    lengths = _mapped_lengths(monkeypatch)
    parses = []
    monkeypatch.setattr(gguf_file, "_parse", lambda *a, real=gguf_file._parse: parses.append(1) or real(*a))
    assert read_gguf(tiny_target) == whole
    assert len(parses) == 1  # parsed once: the reader goes on in the larger mapping
    assert len(lengths) > 1 and all(b > a and b % a == 0 for a, b in zip(lengths, lengths[1:]))  # doubled...
    assert {l & (l - 1) for l in lengths} == {0}  # (64 times powers of two)
    assert lengths[-2] < whole.data_offset and lengths[-1] < whole.file_size  # ...while the header went on, no further


def test_a_truncated_file_fails_the_same_from_a_small_prefix(tiny_target, tmp_path, monkeypatch):
    data = tiny_target.read_bytes()
    head = read_gguf(tiny_target).data_offset
    paths = []
    for cut in (10, 100, head // 2, head - 40, len(data) - 100):  # in the counts, the key-values, the tensor infos,
        paths.append(tmp_path / f"cut-{cut}.gguf")                # the data
        paths[-1].write_bytes(data[:cut])
    whole = [_error(p) for p in paths]
    assert "(it ends at byte 10 before" in whole[0] and "truncated: its tensors need" in whole[-1], whole
    monkeypatch.setattr(gguf_file, "PREFIX", 64)
    assert [_error(p) for p in paths] == whole


def test_a_3_gib_file_maps_only_its_header(tiny_target, tmp_path, monkeypatch):
    """A model over 2 GiB (sparse: the tiny model, then a hole to 3 GiB) is read from its first PREFIX bytes, as a
    32-bit process must; every check against the file's size uses the true size."""
    p = tmp_path / "big.gguf"
    p.write_bytes(tiny_target.read_bytes())
    os.truncate(p, 3 << 30)
    lengths = _mapped_lengths(monkeypatch)
    g = read_gguf(p)
    assert lengths == [gguf_file.PREFIX] and g.file_size == 3 << 30
    assert g.tensors == read_gguf(tiny_target).tensors


# ---------------------------------------------------------------------------- the gate: crafted files
# Each file is the tiny model with one thing broken, of a shape that has crashed or corrupted llama.cpp's
# loader (docs/model-files.md). The gate refuses it in one line before llama.cpp sees it.

import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from edgecad import Engine, tiny  # noqa: E402
from edgecad.gguf_gate import MAX_LAYERS, StringInfo  # noqa: E402
from helpers import craft_gguf, gguf_value  # noqa: E402

_TOKENS, _TYPES = tiny.vocabulary()


def _key(name: str, vtype: int) -> bytes:
    return gguf_value(8, name) + struct.pack("<I", vtype)


def _tensor(i, field, value):
    def edit(infos):
        infos[i][field] = value(infos) if callable(value) else value
    return edit


def _craft(src, dst, arch=None, **kw):
    """craft_gguf; arch=(name, {key: spec}) also moves the model's qwen2.* keys under another architecture's name
    and adds these of its own (llama.cpp then reads it as that architecture, up to its hyperparameters)."""
    if arch is not None:
        name, extra = arch
        own = {f.name: (int(f.types[0]), f.contents()) for f in gguf.GGUFReader(str(src)).fields.values()
               if f.name.startswith("qwen2.")}
        kw = dict(kw, drop=tuple(own), set_kv={"general.architecture": (8, name), **kw.get("set_kv", {}),
                                               **{name + k[5:]: v for k, v in own.items()},
                                               **{f"{name}.{k}": v for k, v in extra.items()}})
    return craft_gguf(src, dst, **kw)


def abort_shapes(tokens: list, types: list, n_layer: int) -> dict:
    """Files that pass every structural check and make llama.cpp abort (a GGML_ASSERT or GGML_ABORT as it loads
    them: the control below): name -> (_craft arguments, the gate's words). Made from a model's own vocabulary,
    token types and layer count: the tiny target's here, the fuzzer's small model's in write_fuzz_seeds."""
    def q(kv):
        return dict(set_kv={f"qwen2.{k}": v for k, v in kv.items()})
    dup = tokens[4]
    return {
        "expert_used_count without experts": (q({"expert_used_count": (4, 2)}),
                                              "expert_used_count is 2, more than the expert_count of 0"),
        "expert_count 2000": (q({"expert_count": (4, 2000), "expert_used_count": (4, 2)}),
                              "expert_count is 2000, more than llama.cpp's 1024"),
        "expert_used_count over expert_count": (q({"expert_count": (4, 4), "expert_used_count": (4, 8)}),
                                                "expert_used_count is 8, more than the expert_count of 4"),
        "expert_used_count -1 in a layer": (q({"expert_count": (4, 4),
                                               "expert_used_count": (9, [2] * (n_layer - 1) + [-1], 5)}),
                                            "expert_used_count is 4294967295, more than"),
        "experts, none used": (q({"expert_count": (4, 4)}), "expert_used_count is 0 or missing, with 4 experts"),
        "as many expert groups as experts": (q({"expert_count": (4, 4), "expert_used_count": (4, 2),
                                                "expert_group_count": (4, 4)}), "expert_group_count is 4, not under"),
        "expert groups not dividing": (q({"expert_count": (4, 8), "expert_used_count": (4, 2),
                                          "expert_group_count": (4, 3), "expert_group_used_count": (4, 1)}),
                                       "expert_group_count is 3, not a divisor of 8 experts"),
        "expert groups all used": (q({"expert_count": (4, 8), "expert_used_count": (4, 2),
                                      "expert_group_count": (4, 2), "expert_group_used_count": (4, 2)}),
                                   "expert_group_used_count is 2, not in 1..1"),
        "expert groups without experts": (q({"expert_group_count": (4, 2)}), "expert_group_count is 2 with no experts"),
        "block_count 0": (q({"block_count": (4, 0)}), "block_count is 0"),
        "nextn layers over block_count": (q({"nextn_predict_layers": (4, n_layer + 1)}),
                                          f"nextn_predict_layers is {n_layer + 1}, more than the {n_layer} layers"),
        "unknown rope scaling": (q({"rope.scaling.type": (8, "bogus")}), "rope.scaling.type is not one of"),
        "a token twice": (dict(set_kv={"tokenizer.ggml.tokens": (9, tokens[:5] + [dup] + tokens[6:], 8)}),
                          "twice (ids 4 and 5)"),
        "a token twice after a NUL": (dict(set_kv={"tokenizer.ggml.tokens": (9, tokens[:5] + [dup + "\0x"] + tokens[6:],
                                                                             8)}), "twice (ids 4 and 5)"),
        "a byte token in a bert vocabulary": (dict(set_kv={"tokenizer.ggml.model": (8, "bert"), "tokenizer.ggml."
                                                           "token_type": (9, types[:7] + [6] + types[8:], 5)}),
                                              "marks a byte token in a WordPiece (bert) vocabulary"),
        "no vocabulary": (dict(set_kv={"tokenizer.ggml.model": (8, "none"), "qwen2.vocab_size": (4, len(tokens))}),
                          "tokenizer.ggml.model is 'none': the model has no vocabulary"),
        "gemma4 without a BOS token": (dict(set_kv={"tokenizer.ggml.model": (8, "gemma4")},
                                            drop=("tokenizer.ggml.bos_token_id",)),
                                       "bos_token_id is missing or not one of the"),
        "t5 adding a BOS token it lacks": (dict(set_kv={"tokenizer.ggml.model": (8, "t5"),
                                                        "tokenizer.ggml.add_bos_token": (7, True)},
                                                drop=("tokenizer.ggml.bos_token_id",)),
                                           "adds a BOS token to every prompt"),
        **{name: (dict(arch=(arch, kv)), words) for name, (arch, kv, words) in _arch_shapes(n_layer).items()},
    }


def _arch_shapes(n_layer: int) -> dict:
    """The architectures whose own hyperparameters llama.cpp asserts on: name -> (architecture, its keys (with
    those it requires before the assert), the gate's words)."""
    u, f, b = 4, 6, 7  # GGUF types: uint32, float32, bool
    moe = {"expert_feed_forward_length": (u, 64), "expert_shared_count": (u, 1), "expert_weights_scale": (f, 1.0),
           "expert_weights_norm": (b, True), "expert_gating_func": (u, 4), "swiglu_clamp_exp": (f, 7.0)}
    mla = {"attention.key_length_mla": (u, 16), "attention.value_length_mla": (u, 16), "attention.q_lora_rank": (u, 16),
           "attention.kv_lora_rank": (u, 16), "ssm.conv_kernel": (u, 4), "kda.head_dim": (u, 16)}
    hc = {"hyper_connection.count": (u, 4), "hyper_connection.sinkhorn_iterations": (u, 2),
          "hyper_connection.epsilon": (f, 1e-6)}
    index = {"attention.indexer.head_count": (u, 2), "attention.indexer.key_length": (u, 16),
             "attention.indexer.top_k": (u, 8)}
    dflash = {"target_layers": (9, [0], 5), **moe, **hc, "hyper_connection.count": (u, 1),
              "attention.q_lora_rank": (u, 16), "attention.sliding_window": (u, 64),
              "attention.output_group_count": (u, 2), "attention.output_lora_rank": (u, 16)}
    kda = {**mla, **moe, "leading_dense_block_count": (u, 1), "kda.gate_lower_bound": (f, -5.0)}
    return {
        "wavtokenizer-dec posnet layers": ("wavtokenizer-dec", {
            "features_length": (u, 64), "posnet.embedding_length": (u, 64), "posnet.block_count": (u, n_layer + 1),
            "convnext.embedding_length": (u, 64), "convnext.block_count": (u, 1)}, "posnet.block_count is more than"),
        "bailingmoe3 unsafe gate": ("bailingmoe3", {**kda, "kda.safe_gate": (b, False)}, "kda.safe_gate is false"),
        "bailingmoe3 gate bound 1": ("bailingmoe3", {**kda, "kda.gate_lower_bound": (f, 1.0)},
                                     "kda.gate_lower_bound is 1.0, not negative"),
        "deepseek4 600 compress ratios": ("deepseek4", {
            **moe, **hc, **index, "attention.q_lora_rank": (u, 16), "attention.sliding_window": (u, 64),
            "attention.output_group_count": (u, 2), "attention.output_lora_rank": (u, 16),
            "attention.compress_rope_freq_base": (f, 1e4), "hash_layer_count": (u, 0),
            "attention.compress_ratios": (9, [0] * 600, u)}, "compress_ratios has 600 entries, more than 512"),
        "dflash no output groups": ("dflash", {**dflash, "attention.output_group_count": (u, 0)},
                                    "attention.output_group_count is 0"),
        "dflash no sliding window": ("dflash", {**dflash, "attention.sliding_window": (u, 0)},
                                     "attention.sliding_window is 0"),
        "glm5-next kpool 3 for top_k 8": ("glm5-next", {**mla, **moe, **hc, **index, "attention.indexer.kpool": (u, 3)},
                                          "indexer.kpool is 3: it must be over 1 and divide indexer.top_k 8"),
        "glm5-next 2 hyper-connections": ("glm5-next", {**mla, **moe, **hc, **index, "attention.indexer.kpool": (u, 2),
                                                        "hyper_connection.count": (u, 2)}, "count is not 4"),
        "hrm_text slots and layers": ("hrm_text", {"hrm.layers_per_stack": (u, n_layer), "hrm.h_cycles": (u, 1),
                                                   "hrm.l_cycles": (u, 1)}, "block_count is not hrm.layers_per_stack"),
        "hrm_text no cycles": ("hrm_text", {"hrm.layers_per_stack": (u, 1), "hrm.h_cycles": (u, 0),
                                            "hrm.l_cycles": (u, 1)}, "or hrm.h_cycles or hrm.l_cycles is 0"),
        "hy_v4 without MLA": ("hy_v4", {**moe, **hc, "attention.q_lora_rank": (u, 16), "attention.kv_lora_rank": (u, 16),
                                        "attention.key_length_mla": (u, 0), "attention.value_length_mla": (u, 0),
                                        "hyper_connection.magnitude": (f, 1.0)}, "key_length_mla or"),
        "minimax-m3 indexer blocks of 0": ("minimax-m3", {**moe, **index, "attention.indexer.block_size": (u, 0),
                                                          "attention.indexer.local_blocks": (u, 1)},
                                           "indexer.block_size is 0"),
        "nanbeige num_loops 0": ("nanbeige", {"num_loops": (u, 0)}, "nanbeige.num_loops is 0"),
        "nanbeige loops past 512 layers": ("nanbeige", {"num_loops": (u, MAX_LAYERS // n_layer + 1)},
                                           "at most 512 in all"),
        "gemma-embedding dense_2_feat_in": ("gemma-embedding", {"dense_2_feat_in": (u, 7),
                                                                "attention.sliding_window": (u, 64)},
                                            "dense_2_feat_in is 7, neither 0 nor embedding_length"),
    }


ATTACKS = {  # name: (craft_gguf arguments, the gate's words)
    "block_count 600": (dict(set_kv={"qwen2.block_count": (4, 600)}), "block_count is 600"),
    "scores as uint8": (dict(set_kv={"tokenizer.ggml.scores": (9, [0] * 265, 0)}), "array of uint8, where"),
    "token_type as uint8": (dict(set_kv={"tokenizer.ggml.token_type": (9, [1] * 265, 0)}), "array of uint8"),
    "tokens as int32": (dict(set_kv={"tokenizer.ggml.tokens": (9, list(range(265)), 5)}), "array of int32"),
    "byte token <0x-1>": (dict(set_kv={"tokenizer.ggml.tokens": (9, _TOKENS[:5] + ["<0x-1>"] + _TOKENS[6:], 8),
                                       "tokenizer.ggml.model": (8, "plamo2")}), "malformed byte token"),
    "2^40 key-values": (dict(counts=(None, 1 << 40)), "key-value pairs"),
    "2^40 tensors": (dict(counts=(1 << 40, None)), "tensors"),
    "string of 2^60 bytes": (dict(raw_kv=_key("x", 8) + struct.pack("<Q", 1 << 60)), "bytes left in the file"),
    "array of 2^50 floats": (dict(raw_kv=_key("x", 9) + struct.pack("<IQ", 6, 1 << 50)), "bytes left in the file"),
    "array of arrays": (dict(raw_kv=_key("x", 9) + struct.pack("<IQ", 9, 1)), "array of arrays"),
    "unknown value type": (dict(raw_kv=_key("x", 77)), "unknown value type 77"),
    "duplicate key": (dict(raw_kv=_key("general.architecture", 8) + gguf_value(8, "qwen2")), "appears twice"),
    "dimension 2^62": (dict(tensors=_tensor(0, 1, [64, 1 << 62])), "dimension out of range"),
    "2^80 elements": (dict(tensors=_tensor(0, 1, [1 << 40, 1 << 40])), "size overflows"),
    "5 dimensions": (dict(tensors=_tensor(0, 1, [64, 265, 1, 1, 1])), "5 dimensions"),
    "zero dimension": (dict(tensors=_tensor(0, 1, [64, 0])), "dimension out of range"),
    "unknown tensor type": (dict(tensors=_tensor(0, 2, 99)), "unknown ggml type 99"),
    "rows not whole blocks": (dict(tensors=_tensor(0, 2, 12)), "not a multiple of Q4_K's block"),
    "offset past the end": (dict(tensors=_tensor(1, 3, 1 << 40)), "truncated"),
    "misaligned offset": (dict(tensors=_tensor(1, 3, lambda t: t[1][3] + 4)), "not a multiple of the alignment"),
    "overlapping tensors": (dict(tensors=_tensor(2, 3, lambda t: t[1][3])), "overlaps"),
    "duplicate tensor": (dict(tensors=_tensor(1, 0, "token_embd.weight")), "appears twice"),
    "alignment 3": (dict(set_kv={"general.alignment": (4, 3)}), "power of two"),
    "alignment as uint64": (dict(set_kv={"general.alignment": (10, 32)}), "need uint32"),
    "tensor name of 5000 digits": (dict(tensors=_tensor(1, 0, "blk." + "9" * 5000 + ".x")), "has a name of"),
    "string of 20 MB": (dict(set_kv={"general.name": (8, "x" * (20 << 20))}), "is a string of"),
    "scores of another length": (dict(set_kv={"tokenizer.ggml.scores": (9, [0.0] * 70, 6)}), "length other than"),
    "vocabulary vs embeddings": (dict(set_kv={"tokenizer.ggml.tokens": (9, _TOKENS[:-1], 8)},
                                      drop=("tokenizer.ggml.token_type",)), "not one row per token"),
    "no architecture": (dict(drop=("general.architecture",)), "general.architecture is missing"),
    "9M array elements": (dict(raw_kv=_key("x", 9) + struct.pack("<IQ", 0, 9 << 20) + bytes(9 << 20)),
                          "has over 8,388,608 array elements"),
    "17 strings of 1 MiB": (dict(set_kv={f"x.s{i}": (8, "x" * (1 << 20)) for i in range(17)}),
                            "has over 16 MiB of metadata keys and values"),
    **abort_shapes(_TOKENS, _TYPES, tiny.TINY_TARGET.n_layer),
}
ABORTS = ["block_count 600", *abort_shapes(_TOKENS, _TYPES, tiny.TINY_TARGET.n_layer)]  # (the control's)


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_gate_refuses_each_attack_shape_in_one_line(tiny_target, tmp_path, attack):
    kw, words = ATTACKS[attack]
    path = _craft(tiny_target, tmp_path / "crafted.gguf", **kw)
    with pytest.raises(ModelFileError) as e:
        read_gguf(path)
    msg = str(e.value)
    assert words in msg and str(path) in msg and "\n" not in msg, msg
    with pytest.raises(ModelFileError, match=re.escape(words)):  # every load goes through the gate
        Engine(path, n_ctx=64)


def test_each_attack_fails_the_same_from_a_small_prefix(tiny_target, tmp_path, monkeypatch):
    """(The gate's verdict and words do not depend on how much of the file read_gguf mapped.)"""
    paths = [_craft(tiny_target, tmp_path / f"{i}.gguf", **kw) for i, (kw, _) in enumerate(ATTACKS.values())]
    whole = [_error(p) for p in paths]
    monkeypatch.setattr(gguf_file, "PREFIX", 64)
    assert [_error(p) for p in paths] == whole


def test_the_unchanged_copy_passes_the_gate(tiny_target, tmp_path):
    """(The crafting itself breaks nothing: the same rewrite with no change loads and generates.)"""
    path = craft_gguf(tiny_target, tmp_path / "same.gguf")
    with Engine(path, n_ctx=64) as e:
        assert e.create_completion("hello", max_tokens=4, temperature=0)["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("attack", ABORTS)
def test_what_the_gate_stops_aborts_llama_cpp_itself(tiny_target, tmp_path, attack):
    """The control: each file the gate refuses for a value llama.cpp asserts on, handed to llama.cpp directly (in a
    child process) to load it and tokenize a prompt, kills the process."""
    path = _craft(tiny_target, tmp_path / "crafted.gguf", **ATTACKS[attack][0])
    code = f"from llama_cpp import Llama; Llama({str(path)!r}, verbose=False).tokenize(b'hi')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode in (-6, 134), (r.returncode, r.stderr[-2000:])  # SIGABRT


def test_long_strings_are_measured_not_read(tiny_target, tmp_path):
    """A metadata string over 1 MiB (an embedded tokenizer.json) is kept as its length and place, not read; the
    model still loads."""
    path = craft_gguf(tiny_target, tmp_path / "long.gguf", set_kv={"general.name": (8, "n" * (2 << 20))})
    g = read_gguf(path)
    assert g.metadata["general.name"] == StringInfo(2 << 20, g.metadata["general.name"].start)
    with Engine(path, n_ctx=64) as e:
        assert e.create_completion("hello", max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2


def test_a_huge_header_is_refused_cheaply(tmp_path):
    """A well-formed header of 192 MiB (48 strings of 4 MiB in one array; the gate once accepted it after building
    a Python string of each: 0.25-1.7 s, +388 MB) is refused at the header's budget, reading little of it: in a
    child process, its peak resident memory grows by far less than the header's size (+32 MB here: the file pages
    the kernel maps around each string's length as it is read)."""
    path = tmp_path / "huge.gguf"
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + _key("general.architecture", 8) + gguf_value(8, "qwen2")
                + _key("x.huge", 9) + struct.pack("<IQ", 8, 48))
        string = struct.pack("<Q", 4 << 20) + b"x" * (4 << 20)
        for _ in range(48):
            f.write(string)
    code = ("import os, resource\nfrom edgecad.errors import ModelFileError\nfrom edgecad.gguf_file import read_gguf\n"
            "if os.access('/proc/self/clear_refs', os.W_OK):\n"
            "    open('/proc/self/clear_refs', 'w').write('5')  # (Linux: the peak starts again from here)\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"try:\n    read_gguf({str(path)!r}); print('accepted')\nexcept ModelFileError as e:\n    print(e)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)  # (a hang fails)
    assert r.returncode == 0, r.stderr[-2000:]
    verdict, mb = r.stdout.strip().splitlines()
    assert "the header goes on past 128 MiB" in verdict, verdict
    assert float(mb) < 100, mb


def write_fuzz_seeds(out) -> None:
    """The fuzzer's seeds: a small model, and each shape that aborts llama.cpp made from it (scripts/fuzz_gguf.sh
    seeds its longer runs with these too)."""
    small = tiny.TinySpec(n_layer=1, n_embd=8, n_ff=8, n_head=2, n_head_kv=1)
    src = tiny.write_model(out / "small.gguf", small, vocab_tokens=_TOKENS[:16] + [tiny.EOG_TOKEN])
    fields = gguf.GGUFReader(str(src)).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    for i, (kw, _) in enumerate(abort_shapes(tokens, types, small.n_layer).values()):
        _craft(src, out / f"abort-{i}.gguf", **kw)


def test_fuzzing_the_gate_finds_nothing(tmp_path):
    """A short coverage-guided run (atheris) from a small real model and the shapes that abort llama.cpp made from
    it (write_fuzz_seeds): every input gives a header or edgecad's ModelFileError, within libFuzzer's time and
    memory limits; and every regression file kept from longer runs (tests/fuzz-regressions/) still does. Longer runs: scripts/fuzz_gguf.sh."""
    pytest.importorskip("atheris", reason="atheris (the test extra) is not installed")
    from pathlib import Path
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_fuzz_seeds(corpus)
    regressions = sorted((Path(__file__).parent / "fuzz-regressions").glob("*"))
    harness = str(Path(__file__).parent / "fuzz_gguf.py")
    if regressions:
        r = subprocess.run([sys.executable, harness, *map(str, regressions)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, harness, str(corpus), "-max_total_time=40", "-timeout=5",
                        "-rss_limit_mb=1024", "-max_len=8192"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = int(re.search(r"Done (\d+) runs", r.stderr).group(1))
    assert runs > 1000, r.stderr[-1000:]
