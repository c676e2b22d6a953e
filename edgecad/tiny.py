"""Tiny draft/target GGUF pairs with random weights, for tests and quick benchmarks.

Both models are llama.cpp `qwen2` models over one 265-token GPT-2-style
byte-level vocabulary (256 byte tokens, 6 merges, 3 control tokens), so they
load, tokenize and generate on real llama.cpp in milliseconds. `write_spm_pair`
writes a `llama` pair over a SentencePiece vocabulary instead (Llama's and
Gemma's kind: byte fallback, a space prefix, BOS), and `write_mamba` a
recurrent model (`mamba`: a state per sequence, no KV cache) over the BPE
vocabulary, to pair with the F32 draft. The F32 pair
(`write_pair`) gives control tokens near-zero logits: generation never ends
early, and exact equality is the point. The quantized pair (`write_quantized_pair`:
Q4_0 target layers, which llama.cpp repacks, and a Q8_0 draft) has larger layers
and an end-of-generation token that wins wherever one ordinary token would: its
outputs end, and Q4 numerics meet near-ties as real models do.

To make speculative decoding meaningful, draft and target share the token
embeddings and the output matrix (a strong "bigram" signal both agree on),
while their transformer layers are independent random weights whose residual
contribution (`layer_scale`) makes each model depend on context in its own
way: the draft agrees with the target often, not always. Target layers are a
few hundred KB each (dozens of pages), so paging them is meaningful.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MERGES = ["Ġ t", "h e", "i n", "e r", "a n", "o n"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen's turn format, short
# Qwen2.5(-Coder)-Instruct's own template (as its GGUF files carry it): it lists `tools` in the system turn, asks for
# calls as <tool_call> JSON (the Hermes format) and renders assistant tool_calls and `tool` results itself
QWEN25 = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode mapping: the token text of each byte 0..255."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    m = dict(zip(bs, cs))
    return [chr(m[b]) for b in range(256)]


def vocabulary() -> tuple[list[str], list[int]]:
    tokens = byte_tokens() + [m.replace(" ", "") for m in MERGES] + SPECIAL
    types = [1] * (len(tokens) - len(SPECIAL)) + [3] * len(SPECIAL)  # 1 normal, 3 control
    return tokens, types


SPM_PIECES = (["▁"] + list("abcdefghijklmnopqrstuvwxyz.,:()")  # characters; anything else falls back to bytes
              + ["▁t", "he", "▁the", "in", "er", "an", "on", "▁a", "▁w", "or", "ld", "▁in", "▁on", "en", "ll", "▁h",
                 "re", "at", "▁o", "▁s", "is", "it", "▁wor", "▁world", "▁he", "llo", "▁hello"])  # merged, best first


def spm_vocabulary() -> tuple[list[str], list[int], list[float]]:
    """A SentencePiece vocabulary (llama.cpp's "llama" tokenizer): <unk>, <s> (BOS), </s> (EOS), the 256 byte
    tokens, then SPM_PIECES; each token's score (merges take the best-scored pair first)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)  # 2 unknown, 3 control, 6 byte, 1 normal
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    return tokens, types, scores


@dataclass(frozen=True)
class TinySpec:
    n_layer: int            # transformer blocks
    n_embd: int = 64        # hidden size (shared by draft and target: they share embeddings)
    n_ff: int = 256         # feed-forward size
    n_head: int = 4         # attention heads
    n_head_kv: int = 2      # key/value heads (grouped-query attention)
    layer_scale: float = 0.15  # std of the blocks' output projections: how much context matters
    seed: int = 0           # seed of the layer weights
    qtype: str = "F32"      # type of every matrix: "F32", or "Q4_0" / "Q8_0" (layers; embeddings and output Q8_0)


SHARED_SEED = 1234  # seed of the embeddings and output matrix shared by draft and target
LOGIT_SCALE = 0.6   # std of the output matrix: logits of std ~5, so top-2 gaps are rarely near-ties


_FILE_TYPES = {"F32": 0, "Q4_0": 2, "Q8_0": 7}  # llama.cpp's general.file_type (LLAMA_FTYPE_ALL_F32, MOSTLY_*)
EOG_TOKEN = "<|im_end|>"  # the end-of-turn token: llama.cpp counts it as end of generation


def write_model(path: str | os.PathLike, spec: TinySpec, *, name: str = "edgecad-tiny",
                vocab_tokens: list[str] | None = None, eog_like: int | None = None,
                chat_template: str | None = CHATML, spm: bool = False) -> Path:
    """eog_like: a token id whose output row, x 1.2, becomes EOG_TOKEN's: the model then ends its output
    wherever it would have chosen that token with a positive logit (a margin of 20% of that logit).
    chat_template: the file's tokenizer.chat_template (tests give hostile ones; None: the file has none).
    spm: a `llama` model over spm_vocabulary() (no biases: Llama's layers)."""
    import gguf

    tokens, types = vocabulary()
    if spm:
        tokens, types, scores = spm_vocabulary()
    if vocab_tokens is not None:  # (their types as _add_vocabulary writes them)
        tokens, types = vocab_tokens, types[:len(vocab_tokens)] + [1] * max(0, len(vocab_tokens) - len(types))
    n_vocab, d, dkv = len(tokens), spec.n_embd, spec.n_embd // spec.n_head * spec.n_head_kv
    shared = np.random.default_rng(SHARED_SEED)
    embd = shared.standard_normal((n_vocab, d)).astype(np.float32)
    out = (shared.standard_normal((n_vocab, d)) * LOGIT_SCALE).astype(np.float32)
    out[[i for i, t in enumerate(types) if t != 1]] = 0.0  # control tokens (EOS among them; SPM's unknown and
    #                          byte tokens too) score ~0: rarely chosen, never impossible
    if eog_like is not None:
        out[tokens.index(EOG_TOKEN)] = 1.2 * out[eog_like]
    rng = np.random.default_rng(spec.seed)
    qt = gguf.GGMLQuantizationType[spec.qtype]
    qt_io = gguf.GGMLQuantizationType.F32 if spec.qtype == "F32" else gguf.GGMLQuantizationType.Q8_0

    def add(name, x, t=qt):
        """A matrix in type t (vectors stay F32, as llama.cpp's quantizer leaves them)."""
        if x.ndim == 1 or t == gguf.GGMLQuantizationType.F32:
            wr.add_tensor(name, x)
        else:
            wr.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)

    def w(rows, cols, std):
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    wr = gguf.GGUFWriter(str(tmp), "llama" if spm else "qwen2")
    wr.add_name(name)
    wr.add_context_length(4096)
    wr.add_embedding_length(d)
    wr.add_block_count(spec.n_layer)
    wr.add_feed_forward_length(spec.n_ff)
    wr.add_head_count(spec.n_head)
    wr.add_head_count_kv(spec.n_head_kv)
    wr.add_rope_freq_base(10000.0)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_file_type(_FILE_TYPES[spec.qtype])
    _add_vocabulary(wr, tokens, types, scores if spm else None, chat_template)

    add("token_embd.weight", embd, qt_io)
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", np.ones(d, np.float32))
        for x, rows in (("q", d), ("k", dkv), ("v", dkv)):
            add(p + f"attn_{x}.weight", w(rows, d, d ** -0.5))
            bias = w(1, rows, 0.1)[0]
            if not spm:  # (Llama's attention has no biases)
                add(p + f"attn_{x}.bias", bias)
        add(p + "attn_output.weight", w(d, d, spec.layer_scale * d ** -0.5))
        add(p + "ffn_norm.weight", np.ones(d, np.float32))
        add(p + "ffn_gate.weight", w(spec.n_ff, d, d ** -0.5))
        add(p + "ffn_up.weight", w(spec.n_ff, d, d ** -0.5))
        add(p + "ffn_down.weight", w(d, spec.n_ff, spec.layer_scale * spec.n_ff ** -0.5))
    add("output_norm.weight", np.ones(d, np.float32))
    add("output.weight", out, qt_io)
    return _finish(wr, tmp, path)


def _add_vocabulary(wr, tokens: list[str], types: list[int], scores: list[float] | None,
                    chat_template: str | None) -> None:
    """The tokenizer's keys: Qwen's byte-level BPE (no BOS), or with scores Llama's SentencePiece (BOS first, a
    space before the text, unknown characters as their bytes); the chat template when there is one."""
    n_vocab = len(tokens)
    wr.add_tokenizer_model("gpt2" if scores is None else "llama")
    if scores is None:
        wr.add_tokenizer_pre("qwen2")
    wr.add_token_list(tokens)
    wr.add_token_types(types[: len(tokens)] + [1] * max(0, len(tokens) - len(types)))
    if scores is not None:
        wr.add_token_scores(scores)
        wr.add_bos_token_id(1)
        wr.add_eos_token_id(2)
        wr.add_add_bos_token(True)
        wr.add_add_space_prefix(True)
    else:
        wr.add_token_merges(MERGES)
        wr.add_bos_token_id(n_vocab - 3)
        wr.add_eos_token_id(n_vocab - 3)
        wr.add_add_bos_token(False)
    if chat_template is not None:
        wr.add_chat_template(chat_template)


def _finish(wr, tmp: Path, path: Path) -> Path:
    """Write the file to tmp, synced, then rename it to path."""
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with open(tmp, "rb") as f:  # clean pages: dirty ones cannot be evicted, which paging tests rely on
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


TINY_TARGET = TinySpec(n_layer=6, layer_scale=0.15, seed=1)  # top-1 agreement with the draft ~65%, top-3 ~89%
TINY_DRAFT = TinySpec(n_layer=2, layer_scale=0.10, seed=2)


def write_pair(out_dir: str | os.PathLike, *, target: TinySpec = TINY_TARGET,
               draft: TinySpec = TINY_DRAFT) -> tuple[Path, Path]:
    """Write tiny-draft.gguf and tiny-target.gguf into out_dir; return (draft, target)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = write_model(out_dir / "tiny-draft.gguf", draft, name="edgecad-tiny-draft")
    t = write_model(out_dir / "tiny-target.gguf", target, name="edgecad-tiny-target")
    return d, t


Q_TARGET = TinySpec(n_layer=8, n_embd=128, n_ff=768, layer_scale=0.15, seed=11, qtype="Q4_0")  # ~190 KB layers
Q_DRAFT = TinySpec(n_layer=2, n_embd=128, n_ff=512, layer_scale=0.10, seed=12, qtype="Q8_0")
EOG_LIKE = 160  # a byte the quantized target often picks greedily within 40 tokens: its choice ends the output


def write_quantized_pair(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write tiny-q-draft.gguf (Q8_0) and tiny-q-target.gguf (Q4_0 layers) into out_dir, with an end of
    generation reachable (EOG_LIKE); return (draft, target)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = write_model(out_dir / "tiny-q-draft.gguf", Q_DRAFT, name="edgecad-tiny-q-draft", eog_like=EOG_LIKE)
    t = write_model(out_dir / "tiny-q-target.gguf", Q_TARGET, name="edgecad-tiny-q-target", eog_like=EOG_LIKE)
    return d, t


def write_spm_pair(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write tiny-spm-draft.gguf and tiny-spm-target.gguf (`llama` models over spm_vocabulary(), without a chat
    template) into out_dir; return (draft, target)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = write_model(out_dir / "tiny-spm-draft.gguf", TINY_DRAFT, name="edgecad-tiny-spm-draft", spm=True,
                    chat_template=None)
    t = write_model(out_dir / "tiny-spm-target.gguf", TINY_TARGET, name="edgecad-tiny-spm-target", spm=True,
                    chat_template=None)
    return d, t


@dataclass(frozen=True)
class MambaSpec:
    n_layer: int = 2   # Mamba blocks
    n_embd: int = 64   # hidden size (the F32 pair's: it shares their embeddings and output matrix)
    d_inner: int = 128  # the SSM's inner size (2 x n_embd, as Mamba)
    d_state: int = 16  # the SSM's state size per channel
    d_conv: int = 4    # the causal convolution's kernel
    dt_rank: int = 4   # the rank of the time step's projection
    seed: int = 3      # seed of the layer weights


def write_mamba(path: str | os.PathLike, spec: MambaSpec = MambaSpec(), *, name: str = "edgecad-tiny-mamba") -> Path:
    """A tiny F32 `mamba` model over the BPE vocabulary (the F32 pair's embeddings and output: the same bigram
    signal, so the F32 draft drafts for it as for the target), with the pair's chat template."""
    import gguf

    tokens, types = vocabulary()
    d, di, ds = spec.n_embd, spec.d_inner, spec.d_state
    shared = np.random.default_rng(SHARED_SEED)
    embd = shared.standard_normal((len(tokens), d)).astype(np.float32)
    out = (shared.standard_normal((len(tokens), d)) * LOGIT_SCALE).astype(np.float32)
    out[-len(SPECIAL):] = 0.0
    rng = np.random.default_rng(spec.seed)

    def w(rows, cols, std):
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    wr = gguf.GGUFWriter(str(tmp), "mamba")
    wr.add_name(name)
    wr.add_context_length(4096)
    wr.add_embedding_length(d)
    wr.add_block_count(spec.n_layer)
    wr.add_feed_forward_length(0)
    wr.add_head_count(0)
    wr.add_ssm_conv_kernel(spec.d_conv)
    wr.add_ssm_inner_size(di)
    wr.add_ssm_state_size(ds)
    wr.add_ssm_time_step_rank(spec.dt_rank)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_file_type(_FILE_TYPES["F32"])
    _add_vocabulary(wr, tokens, types, None, CHATML)
    wr.add_tensor("token_embd.weight", embd)
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        wr.add_tensor(p + "attn_norm.weight", np.ones(d, np.float32))
        wr.add_tensor(p + "ssm_in.weight", w(2 * di, d, d ** -0.5))  # (x and the gate z)
        wr.add_tensor(p + "ssm_conv1d.weight", w(di, spec.d_conv, 0.5))
        wr.add_tensor(p + "ssm_conv1d.bias", w(1, di, 0.1)[0])
        wr.add_tensor(p + "ssm_x.weight", w(spec.dt_rank + 2 * ds, di, di ** -0.5))  # (dt, B, C)
        wr.add_tensor(p + "ssm_dt.weight", w(di, spec.dt_rank, spec.dt_rank ** -0.5))
        wr.add_tensor(p + "ssm_dt.bias", w(1, di, 0.1)[0])
        wr.add_tensor(p + "ssm_a", -np.exp(w(di, ds, 0.5)))  # A = -exp(A_log): a decaying state
        wr.add_tensor(p + "ssm_d", np.ones(di, np.float32))
        wr.add_tensor(p + "ssm_out.weight", w(d, di, 0.15 * di ** -0.5))
    wr.add_tensor("output_norm.weight", np.ones(d, np.float32))
    wr.add_tensor("output.weight", out)
    return _finish(wr, tmp, path)
