"""The llama.cpp wrapper, on real llama.cpp with the tiny target."""
import numpy as np
import pytest

from edgecad.errors import LlamaError
from edgecad.llama import Batch, Context, ContextParams, Model


@pytest.fixture(scope="module")
def model(tiny_target):
    with Model(tiny_target) as m:
        yield m


def decode_prompt(ctx, batch, tokens, seq_ids=(0,)):
    batch.clear()
    for i, t in enumerate(tokens):
        batch.add(t, i, seq_ids, i == len(tokens) - 1)
    ctx.decode(batch)


def test_tokenize_roundtrip(model):
    text = "hello the world, one two three"
    toks = model.tokenize(text)
    assert toks and all(0 <= t < model.n_vocab for t in toks)
    assert model.detokenize(toks) == text.encode()
    assert model.tokenize("the")[0] != model.tokenize(" the")[0]  # byte-level BPE keeps the space


def test_logits_are_views_of_llama_memory(model):
    with Context(model, ContextParams(n_ctx=256)) as ctx, Batch(64) as b:
        decode_prompt(ctx, b, model.tokenize("abc def"))
        a = ctx.logits(b.n_tokens - 1)
        assert a.shape == (model.n_vocab,) and a.dtype == np.float32
        assert not a.flags.owndata
        assert np.shares_memory(a, ctx.logits(b.n_tokens - 1))
        assert np.isfinite(a).all() and a.std() > 0


def test_memory_ops(model):
    toks = model.tokenize("some prompt text")
    n = len(toks)
    with Context(model, ContextParams(n_ctx=256, n_seq_max=4)) as ctx, Batch(64, n_seq_max=4) as b:
        decode_prompt(ctx, b, toks)
        assert ctx.seq_pos_max(0) == n - 1 and ctx.seq_pos_max(1) == -1
        ctx.seq_cp(0, 1)
        ctx.seq_cp(0, 2)
        assert ctx.seq_pos_max(1) == n - 1 and ctx.seq_pos_min(1) == 0
        # one token shared by sequences 1 and 2, one only in 2
        b.clear()
        b.add(7, n, (1, 2), False)
        b.add(8, n + 1, (2,), True)
        ctx.decode(b)
        assert (ctx.seq_pos_max(0), ctx.seq_pos_max(1), ctx.seq_pos_max(2)) == (n - 1, n, n + 1)
        ctx.seq_rm(2, n + 1, -1)
        assert ctx.seq_pos_max(2) == n
        ctx.seq_keep(1)
        assert (ctx.seq_pos_max(0), ctx.seq_pos_max(1), ctx.seq_pos_max(2)) == (-1, n, -1)
        ctx.seq_rm(1)
        assert ctx.seq_pos_max(1) == -1


def test_multi_sequence_batch_matches_sequential_decode(model):
    """Two branches decoded as one batch of multi-sequence tokens give the logits of decoding each alone."""
    prompt = model.tokenize("tree attention")
    n = len(prompt)
    branches = [[11, 12, 13], [11, 40]]  # share their first token
    with Context(model, ContextParams(n_ctx=256, n_seq_max=3)) as ctx, Batch(64, n_seq_max=3) as b:
        decode_prompt(ctx, b, prompt, seq_ids=(0, 1, 2))
        b.clear()
        b.add(11, n, (1, 2), True)
        b.add(12, n + 1, (1,), True)
        b.add(13, n + 2, (1,), True)
        b.add(40, n + 1, (2,), True)
        ctx.decode(b)
        tree = ctx.logits_all(4).copy()
    rows = {(0, 0): 0, (0, 1): 1, (0, 2): 2, (1, 0): 0, (1, 1): 3}  # branch 1 shares row 0
    for bi, br in enumerate(branches):
        with Context(model, ContextParams(n_ctx=256)) as ctx, Batch(64) as b:
            for i, t in enumerate(prompt + br):
                b.add(t, i, (0,), i >= n)
            ctx.decode(b)
            for j in range(len(br)):
                np.testing.assert_allclose(tree[rows[(bi, j)]], ctx.logits(n + j), atol=1e-3, rtol=1e-3)


def test_context_full_is_an_error_not_a_crash(model):
    with Context(model, ContextParams(n_ctx=256, n_batch=64)) as ctx, Batch(64) as b:
        pos = 0
        with pytest.raises(LlamaError) as e:
            for _ in range(10):
                b.clear()
                for j in range(64):
                    b.add(5, pos, (0,), j == 63)
                    pos += 1
                ctx.decode(b)
        assert e.value.code == 1 and "context is full" in str(e.value)


def test_batch_bounds_and_closed_objects(tiny_target):
    b = Batch(2, n_seq_max=2)
    b.add(1, 0)
    b.add(2, 1, (0, 1))
    with pytest.raises(LlamaError, match="full"):
        b.add(3, 2)
    b.clear()
    with pytest.raises(LlamaError, match="sequence ids"):
        b.add(1, 0, (0, 1, 2))
    b.close()
    b.close()
    m = Model(tiny_target)
    m.close()
    m.close()
    with pytest.raises(LlamaError, match="closed"):
        Context(m)


def test_prefill_in_chunks_equals_one_batch(model):
    """Context.prefill splits long inputs by the batch's capacity; the result is the same state."""
    toks = model.tokenize("a prompt long enough to need several chunks of eight tokens, twice over")
    with Context(model, ContextParams(n_ctx=256)) as ctx, Batch(8) as small, Batch(128) as big:
        chunked = ctx.prefill(small, toks, logits=True)
        assert ctx.seq_pos_max(0) == len(toks) - 1
        whole = ctx.prefill(big, toks, logits=True)
        assert ctx.seq_pos_max(0) == len(toks) - 1  # cleared first, not appended
        assert ctx.prefill(big, [], logits=True) is None and ctx.seq_pos_max(0) == -1
    np.testing.assert_allclose(chunked, whole, atol=1e-3, rtol=1e-3)


def test_a_model_llama_cpp_refuses_names_llama_cpp_s_reason(tiny_target, tmp_path):
    """A file that passes edgecad's header checks but lacks a tensor llama.cpp needs: the error carries
    llama.cpp's own reason, logged at GGML_LOG_LEVEL_ERROR (4), not the warnings logged before it (3)."""
    from edgecad.errors import ModelFileError
    data = tiny_target.read_bytes()
    assert data.count(b"output_norm.weight") == 1
    p = tmp_path / "no-output-norm.gguf"
    p.write_bytes(data.replace(b"output_norm.weight", b"output_nrm2.weight"))  # same length: offsets hold
    with pytest.raises(ModelFileError) as e:
        Model(p)
    msg = str(e.value)
    assert "llama.cpp said:" in msg and "output_norm" in msg, msg
