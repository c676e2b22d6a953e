"""The gate every GGUF header passes before llama.cpp parses it (docs/model-files.md: each check and its reason).

A file reaches llama.cpp's parser only once it has been checked: every count, length, offset and size against the
file's size and llama.cpp's own limits, and the shapes of known attacks on llama.cpp's loader. Two halves: the
Cursor reads the header's values within the header's budget as edgecad.gguf_file parses it (long values kept as
ArrayInfo and StringInfo, unread), and check() refuses a parsed header whose values llama.cpp would abort on or be
corrupted by (hyperparameters, vocabulary, tensors). Both raise Bad; read_gguf turns it into ModelFileError.
"""
from __future__ import annotations

import re
import struct
from array import array
from dataclasses import dataclass

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 64  # arrays of numbers longer than this keep only their length (ArrayInfo), as string arrays do
_U64 = struct.Struct("<Q")

MAX_KV = 1 << 16          # key-value pairs (real models: ~30-60)
MAX_TENSORS = 1 << 16     # tensors (real models: hundreds; the largest MoE: a few thousand)
MAX_DIMS = 4              # GGML_MAX_DIMS
MAX_LAYERS = 512          # LLAMA_MAX_LAYERS: llama.cpp aborts on a larger block_count
MAX_EXPERTS = 1024        # LLAMA_MAX_EXPERTS: llama.cpp aborts on a larger expert_count
MAX_VOCAB = 1 << 21       # tokens (real vocabularies: 32k-262k)
MAX_ALIGNMENT = 1 << 16   # general.alignment (32 by default)
MAX_STRING = 16 << 20     # bytes of a metadata string (chat templates: tens of KB; an embedded tokenizer.json: MBs)
MAX_NAME = 64             # GGML_MAX_NAME: a tensor name is shorter
# The header's budget, enforced while it is parsed, before anything past it is mapped or read. Real headers are
# a few MB: Qwen2.5's (151,936 tokens and 151,387 merges) ~6 MB; a 262k-token vocabulary with scores and types
# (Gemma 3) ~7 MB; ~500k merges more add ~8 MB. 128 MiB and 8M array elements are ten times that and more (and
# hold MAX_VOCAB's 2M tokens with their scores and types), while they bound what a hostile header costs to about
# a second and little memory: the reader keeps no Python object for what it only measures or skips.
MAX_HEADER = 128 << 20    # bytes from the file's start to the end of its tensor table
MAX_ELEMENTS = 1 << 23    # array elements in all, every array together (real: ~1.5M at most)
MAX_KEPT = 16 << 20       # bytes of keys and values kept as Python objects, 64 counted for each (real: ~100 KB)
_KEEP_STRING = 1 << 20    # metadata strings longer than this are kept as StringInfo, not read
_MIN_SIZE = {_STRING: 8, _ARRAY: 12}  # bytes an element takes at least (a length, or a type and a length)
# keys llama.cpp reads as arrays of one element type: a narrower type makes it read past the array (#26690)
_TYPED_ARRAYS = {"tokenizer.ggml.tokens": _STRING, "tokenizer.ggml.merges": _STRING,
                 "tokenizer.ggml.scores": 6, "tokenizer.ggml.token_type": 5}
TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
              8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}


class Bad(Exception):
    """A field of the file that fails a check: (what, why)."""


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array kept as its length and element type (and where its elements are): every array of strings,
    and arrays of numbers longer than 64."""
    length: int
    etype: int
    start: int  # file offset of its first element
    end: int    # one past its last byte


@dataclass(frozen=True)
class StringInfo:
    """A metadata string too long to keep (over 1 MiB: real ones are an embedded tokenizer.json, never read)."""
    length: int
    start: int  # file offset of its first byte


class Cursor:
    """Reads the header from `buf`, the first len(buf) bytes of a file of `size`; `grow(end)` maps more of the file
    when a read goes past them (read_gguf's mapping; none for a whole file's bytes), so that nothing is parsed
    twice. It keeps the header's budget as it goes."""

    def __init__(self, buf, size: int, grow=None):
        self.buf, self.pos, self.size, self.grow = buf, 0, size, grow
        self.array_types: dict = {}  # key -> element type of its array
        self.elements = self.kept = 0

    def left(self) -> int:
        return self.size - self.pos

    def budget(self, end: int, elements: int = 0) -> None:
        """What is read next ends at `end` and has `elements` array elements: within the header's budget."""
        self.elements += elements
        if end > MAX_HEADER:
            raise Bad("the header", f"goes on past {MAX_HEADER >> 20} MiB (real models' headers take a few MB)")
        if self.elements > MAX_ELEMENTS:
            raise Bad("the header", f"has over {MAX_ELEMENTS:,} array elements (real models': ~1.5M at most)")

    def need(self, end: int) -> None:
        """The next read ends at `end`: within the budget, and mapped if it is inside the file (past the file, the
        read itself fails as a truncated file's does)."""
        self.budget(end)
        if len(self.buf) < end <= self.size:
            self.buf = self.grow(end)

    def keep(self, n: int) -> None:
        """A key or value of `n` bytes becomes a Python object."""
        self.kept += 64 + n
        if self.kept > MAX_KEPT:
            raise Bad("the header", f"has over {MAX_KEPT >> 20} MiB of metadata keys and values (real models: "
                                    "~100 KB)")

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(self.pos + n)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def length(self, what: str, each: int = 1) -> int:
        """A u64 count of items of at least `each` bytes: it must fit in what is left of the file, and the budget."""
        n = self.unpack("<Q")
        if n * each > self.left():
            raise Bad(what, f"declares {n:,} items that need more than the {self.left():,} bytes left in the file")
        self.budget(self.pos + n * each)
        return n

    def string(self, what: str, long_unread: bool = False):
        """A string; with long_unread, one over _KEEP_STRING bytes is skipped unread (StringInfo)."""
        n = self.length(what)
        if n > MAX_STRING:
            raise Bad(what, f"is a string of {n:,} bytes (at most {MAX_STRING:,})")
        start = self.pos
        if long_unread and n > _KEEP_STRING:
            self.pos += n
            return StringInfo(n, start)
        self.keep(n)
        self.need(start + n)
        self.pos += n
        return bytes(self.buf[start:self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            self.keep(8)
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string(f"the value of {key}", long_unread=True)
        if vtype != _ARRAY:
            raise Bad(key, f"has an unknown value type {vtype}")
        etype = self.unpack("<I")
        if etype == _ARRAY:
            raise Bad(key, "is an array of arrays, which GGUF readers do not support")
        if etype not in _SCALARS and etype != _STRING:
            raise Bad(key, f"is an array of unknown element type {etype}")
        size = struct.calcsize(_SCALARS[etype]) if etype in _SCALARS else _MIN_SIZE[etype]
        n = self.length(f"the array {key}", size)
        self.budget(self.pos + n * size, n)
        self.array_types[key] = etype
        start = self.pos
        if etype in _SCALARS and n <= _KEEP_ARRAY:
            self.keep(32 * n)
            return [self.unpack(_SCALARS[etype]) for _ in range(n)]
        self.pos = self.skip_strings(n, key) if etype == _STRING else self.pos + n * size
        return ArrayInfo(n, etype, start, self.pos)

    def skip_strings(self, n: int, key: str) -> int:
        """Where n strings from here end, reading their lengths only (mapping more where the next one is past what
        is mapped: the verdict is the same however much is)."""
        u64, i, pos = _U64.unpack_from, 0, self.pos
        while True:
            buf = self.buf
            try:
                for i in range(i, n):
                    pos += 8 + u64(buf, pos)[0]
                break
            except struct.error:  # (the length of string i is past the mapping)
                if pos > self.size:
                    raise Bad(f"the array {key}", "has a string that runs past the end of the file") from None
                self.need(pos + 8)
                if pos + 8 > len(self.buf):
                    raise  # (past the file: truncated)
        if pos > self.size:
            raise Bad(f"the array {key}", "has a string that runs past the end of the file")
        self.need(pos)
        return pos


_BYTE_TOKEN = re.compile(rb"<0x[0-9A-Fa-f]{2}>")
_BYTE_START = re.compile(rb"<0x")
_ROPE_SCALING = ("none", "linear", "yarn", "longrope")  # LLAMA_ROPE_SCALING_TYPES
_BYTE_TYPE = 6  # LLAMA_TOKEN_TYPE_BYTE
# tokenizer.ggml.model -> (its default BOS/EOS/SEP ids, what its tokenize adds to a prompt unless add_*_token says)
_SPECIALS = {"llama": ({"bos": 1, "eos": 2}, {"bos"}), "bert": ({"bos": 101, "sep": 102}, {"bos", "sep"}),
             "t5": ({"eos": 1}, {"eos"}), "gemma4": ({}, {"bos"}),
             # (BPE: some pre-tokenizers add a BOS, others not: counted as all do)
             **{m: ({"bos": 11, "eos": 11}, {"bos"}) for m in ("gpt2", "hybriddna", "whitespace")}}


def check(g, buf) -> None:
    """What llama.cpp assumes of a model's header and does not check itself (each with its reason in
    docs/model-files.md). g: the parsed header (edgecad.gguf_file.GGUFInfo); buf: the mapping it was read from."""
    spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in g.tensors)
    for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
        if b_start < a_end:
            raise Bad(f"the tensor {b}", f"overlaps the tensor {a}")
    arch = g.metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise Bad("general.architecture", "is missing or not a string")
    n_layer = g.metadata.get(f"{arch}.block_count")
    if n_layer is not None and (not isinstance(n_layer, int) or isinstance(n_layer, bool) or
                                not 1 <= n_layer <= MAX_LAYERS):
        raise Bad(f"{arch}.block_count", f"is {n_layer!r}: llama.cpp holds 1..{MAX_LAYERS} layers")
    if n_layer is not None:  # (without it llama.cpp stops at its own error first)
        _check_hparams(g, buf, arch, n_layer)
    for key, etype in _TYPED_ARRAYS.items():
        v = g.metadata.get(key)
        if v is None:
            continue
        got = g.array_types.get(key)
        if got != etype:
            raise Bad(key, f"is {'an array of ' + TYPE_NAMES.get(got, '?') if got is not None else 'not an array'}"
                           f", where llama.cpp reads an array of {TYPE_NAMES[etype]}")
    model = g.metadata.get("tokenizer.ggml.model")
    if model in ("none", "no_vocab"):
        raise Bad("tokenizer.ggml.model", f"is {model!r}: the model has no vocabulary to tokenize a prompt with, "
                                         "which llama.cpp aborts on")
    toks = g.metadata.get("tokenizer.ggml.tokens")
    if toks is not None:
        _check_vocab(g, toks, buf, model)


def _check_vocab(g, toks: ArrayInfo, buf, model) -> None:
    """The vocabulary: its size against its arrays and embeddings, and what llama.cpp's loader and tokenizer
    assert of its tokens."""
    n = g.vocab_size
    if not 0 < n <= MAX_VOCAB:
        raise Bad("tokenizer.ggml.tokens", f"has {n:,} tokens (1..{MAX_VOCAB:,})")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        v = g.metadata.get(key)
        if v is not None and (v.length if isinstance(v, ArrayInfo) else len(v)) != n:
            raise Bad(key, f"has a length other than the vocabulary's {n:,} tokens")
    for name in ("token_embd.weight", "output.weight"):
        t = g.tensor(name)
        if t is not None and (len(t.shape) < 2 or t.shape[1] != n):
            raise Bad(f"the tensor {name}", f"has shape {t.shape}, not one row per token ({n:,})")
    if model not in ("gpt2", "bert"):  # (BPE and WPM texts are only text)
        _check_byte_tokens(toks, buf)
    if model == "bert" and (_numbers(g, buf, "tokenizer.ggml.token_type") == _BYTE_TYPE).any():
        raise Bad("tokenizer.ggml.token_type", "marks a byte token in a WordPiece (bert) vocabulary, which "
                                               "llama.cpp aborts on")
    _check_unique_tokens(toks, buf)
    _check_special_tokens(g, model, n)


def _check_special_tokens(g, model, n: int) -> None:
    """The BOS, EOS and SEP tokens llama.cpp's tokenize adds to every prompt (edgecad's too) have ids in the
    vocabulary (an explicit one, else the tokenizer's default): it asserts so, and aborts at the first prompt."""
    if model not in _SPECIALS:
        return
    defaults, adds = _SPECIALS[model][0], set(_SPECIALS[model][1])
    if model != "bert":  # (WordPiece adds both whatever the flags say)
        for x in ("bos", "eos"):
            flag = g.metadata.get(f"tokenizer.ggml.add_{x}_token")
            if isinstance(flag, bool):
                (adds.add if flag else adds.discard)(x)
    if model == "gemma4":
        adds.add("bos")  # (llama.cpp adds it to Gemma 4 prompts whatever the flag says)
    for x in sorted(adds):
        given = g.metadata.get(f"tokenizer.ggml.{x}_token_id")
        if not (isinstance(given, int) and 0 <= given < n or defaults.get(x, n) < n):
            raise Bad(f"tokenizer.ggml.{x}_token_id", f"is missing or not one of the {n:,} tokens, where the tokenizer "
                                                      f"adds a {x.upper()} token to every prompt, which llama.cpp "
                                                      "aborts on")


def _numbers(g, buf, key: str, most: int = MAX_ELEMENTS) -> np.ndarray:
    """A metadata value's numbers: a scalar as one, an array of numbers as its elements (copied from the mapping:
    no export of it is kept); none for anything else, or for an array longer than `most`."""
    v = g.metadata.get(key)
    if isinstance(v, ArrayInfo):
        ok = v.etype in _SCALARS and v.length <= most
        return np.frombuffer(buf[v.start:v.end], _SCALARS[v.etype]) if ok else np.empty(0)
    return np.array([x for x in (v if isinstance(v, list) else [v]) if isinstance(x, (int, float))])


def _check_hparams(g, buf, arch: str, n_layer: int) -> None:
    """The hyperparameters whose values llama.cpp's load_hparams asserts on (GGML_ASSERT: the process aborts) for
    every architecture, then those of the architectures that assert more (docs/model-files.md lists each)."""
    def u(key: str, default=None):
        """The largest value of {arch}.key as llama.cpp reads a uint32 (or one per layer: int32 elements wrap)."""
        vals = _numbers(g, buf, f"{arch}.{key}", MAX_LAYERS)
        return max(int(x) & 0xFFFFFFFF for x in vals.tolist()) if vals.size and vals.dtype.kind in "iub" else default

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise Bad(f"{arch}.{key}", f"{why}, which llama.cpp aborts on")

    nextn = u("nextn_predict_layers", 0)
    need(nextn <= n_layer, "nextn_predict_layers", f"is {nextn}, more than the {n_layer} layers")
    n_expert, used = u("expert_count", 0), u("expert_used_count", 0)
    groups, group_used = u("expert_group_count", 0), u("expert_group_used_count", 0)
    if arch in ("hunyuan-dense", "hunyuan_vl") and n_expert <= 1:  # (llama.cpp reads these as dense)
        n_expert = used = 0
    need(n_expert <= MAX_EXPERTS, "expert_count", f"is {n_expert}, more than llama.cpp's {MAX_EXPERTS}")
    need(used <= n_expert, "expert_used_count", f"is {used}, more than the expert_count of {n_expert}")
    if n_expert:
        need(used > 0, "expert_used_count", f"is 0 or missing, with {n_expert} experts")
        need(groups < n_expert, "expert_group_count", f"is {groups}, not under the {n_expert} experts")
        if groups > 1:
            need(n_expert % groups == 0, "expert_group_count", f"is {groups}, not a divisor of {n_expert} experts")
            need(0 < group_used < groups, "expert_group_used_count", f"is {group_used}, not in 1..{groups - 1}")
    else:
        need(groups == 0, "expert_group_count", f"is {groups} with no experts")
    scaling = g.metadata.get(f"{arch}.rope.scaling.type")
    if isinstance(scaling, (str, StringInfo)):
        need(scaling in _ROPE_SCALING, "rope.scaling.type", f"is not one of {', '.join(_ROPE_SCALING)}")
    _check_arch_hparams(g, arch, u, need, n_layer, n_layer - nextn)


def _check_arch_hparams(g, arch: str, u, need, n_all: int, n_main: int) -> None:
    """The architectures whose load_arch_hparams asserts on metadata values (src/models/<arch>.cpp); n_main is
    llama.cpp's n_layer(), the layers less the next-token-prediction ones. A missing required key is left to
    llama.cpp, which refuses it with its own error before asserting."""
    meta = g.metadata
    if arch == "wavtokenizer-dec":
        for key in ("posnet.block_count", "convnext.block_count"):
            need(u(key, 0) <= n_all, key, f"is more than the {n_all} layers")
    elif arch == "bailingmoe3":
        need(meta.get(f"{arch}.kda.safe_gate") is not False, "kda.safe_gate", "is false")
        bound = meta.get(f"{arch}.kda.gate_lower_bound")
        need(not isinstance(bound, float) or bound < 0, "kda.gate_lower_bound", f"is {bound}, not negative")
    elif arch == "deepseek4":
        ratios = meta.get(f"{arch}.attention.compress_ratios")
        n = ratios.length if isinstance(ratios, ArrayInfo) else len(ratios) if isinstance(ratios, list) else 0
        need(n <= MAX_LAYERS, "attention.compress_ratios", f"has {n} entries, more than {MAX_LAYERS}")
    elif arch == "dflash" and u("hyper_connection.count", 0):
        need(u("attention.output_group_count", 1) > 0, "attention.output_group_count", "is 0")
        need(u("attention.sliding_window", 1) > 0, "attention.sliding_window", "is 0")
    elif arch == "gemma-embedding":
        n_embd = u("embedding_length", 0)
        for key in ("dense_2_feat_in", "dense_3_feat_out"):
            need(u(key, 0) in (0, n_embd), key, f"is {u(key)}, neither 0 nor embedding_length {n_embd}")
    elif arch == "glm5-next":
        kpool, top_k = u("attention.indexer.kpool", 2), u("attention.indexer.top_k", 0)
        need(kpool > 1 and top_k % kpool == 0, "attention.indexer.kpool", f"is {kpool}: it must be over 1 and "
                                                                         f"divide indexer.top_k {top_k}")
        need(u("hyper_connection.count", 4) == 4, "hyper_connection.count", "is not 4")
    elif arch == "hrm_text":
        per_stack, h, l = (u(f"hrm.{k}") for k in ("layers_per_stack", "h_cycles", "l_cycles"))
        if None not in (per_stack, h, l):
            need(per_stack and h and l, "hrm.layers_per_stack", "or hrm.h_cycles or hrm.l_cycles is 0")
            need(n_main == per_stack * h * (l + 1) & 0xFFFFFFFF, "block_count",
                 f"is not hrm.layers_per_stack x h_cycles x (l_cycles + 1) = {per_stack * h * (l + 1)}")
    elif arch == "hy_v4":
        need(u("attention.key_length_mla", 1) and u("attention.value_length_mla", 1), "attention.key_length_mla",
             "or attention.value_length_mla is 0")
    elif arch == "minimax-m3":
        need(u("attention.indexer.block_size", 1) > 0, "attention.indexer.block_size", "is 0")
    elif arch == "nanbeige":
        loops = u("num_loops", 1)
        need(1 <= loops and n_main * loops <= MAX_LAYERS, "num_loops",
             f"is {loops}: 1 or more, and with the {n_main} layers at most {MAX_LAYERS} in all")


def _token_texts(toks: ArrayInfo, buf):
    """(id, text) of each token as llama.cpp keys it (up to a NUL: it reads C strings; an empty one becomes
    [EMPTY_<id>]), sliced from the mapping one at a time."""
    u64, pos = _U64.unpack_from, toks.start
    for i in range(toks.length):
        n = u64(buf, pos)[0]
        yield i, buf[pos + 8:pos + 8 + n].split(b"\0", 1)[0] or b"[EMPTY_%d]" % i
        pos += 8 + n


def _raw_hashes(toks: ArrayInfo, buf) -> tuple:
    """The hash and the length of each token's bytes as they are (numpy arrays; each text sliced and dropped)."""
    hashes, lengths, u64, pos = array("q"), array("q"), _U64.unpack_from, toks.start
    for _ in range(toks.length):
        n = u64(buf, pos)[0]
        hashes.append(hash(buf[pos + 8:pos + 8 + n]))
        lengths.append(n)
        pos += 8 + n
    return np.frombuffer(hashes, np.int64), np.frombuffer(lengths, np.int64)


def _raw_texts_are_keys(toks: ArrayInfo, buf, lengths) -> bool:
    """No token is empty or holds a NUL: every zero byte of the array is one of its 8-byte lengths' (counted in
    1 MiB slices of the mapping), so each token's bytes are its key for llama.cpp."""
    in_lengths = sum(int((lengths >> 8 * k & 0xFF == 0).sum()) for k in range(8))
    zeros = sum(buf[a:min(a + (1 << 20), toks.end)].count(b"\0") for a in range(toks.start, toks.end, 1 << 20))
    return zeros == in_lengths and lengths.all()


def _check_unique_tokens(toks: ArrayInfo, buf) -> None:
    """No two tokens with the same text: llama.cpp's vocabulary loader asserts it (a published Gemma GGUF had
    two: #25739). Only hashes are kept (8 bytes a token); texts are compared where two hashes are equal."""
    hashes, lengths = _raw_hashes(toks, buf)
    if not _raw_texts_are_keys(toks, buf, lengths):  # (rare: hash the keys themselves)
        hashes = np.fromiter((hash(t) for _, t in _token_texts(toks, buf)), np.int64, toks.length)
    ranked = np.sort(hashes)
    equal = set(ranked[1:][ranked[1:] == ranked[:-1]].tolist())
    seen = {}
    for i, text in _token_texts(toks, buf) if equal else ():
        if hash(text) in equal:
            if text in seen:
                raise Bad("tokenizer.ggml.tokens", f"has the token {text[:64]!r} twice (ids {seen[text]} and {i}), "
                                                   "which llama.cpp aborts on")
            seen[text] = i


def _check_byte_tokens(toks: ArrayInfo, buf) -> None:
    """Every token whose text is a byte token `<0x..>` is exactly `<0xHH>`: llama.cpp parses the hex digits of
    byte tokens (SPM, UGM, PLaMo-2 vocabularies) and writes the byte where they say (`<0x-1>`: a heap write out
    of bounds, #25969)."""
    for m in _BYTE_START.finditer(buf, toks.start, toks.end):  # (the mapping itself: no copy)
        p = m.start()
        if p >= toks.start + 8:
            n = struct.unpack_from("<Q", buf, p - 8)[0]
            # (the array's bytes only: a match that starts no token reads the same however much is mapped)
            text = bytes(buf[p:min(p + n, toks.end)]) if n <= 64 else b""
            if text.endswith(b">") and not _BYTE_TOKEN.fullmatch(text):
                raise Bad("tokenizer.ggml.tokens", f"has a malformed byte token {text!r}")
