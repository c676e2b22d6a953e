"""Read a GGUF file's header: metadata, tensor table, and the byte ranges of each layer.

gguf.GGUFReader materialises every token and merge (about 7 s on the 1.5B
target); this reader skips long arrays and parses the same header in a fraction
of that, keeping the gguf package's tables for types and block sizes. It is
also the check that gives clear errors for a missing, non-GGUF or truncated
file before llama.cpp sees it.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelFileError

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 64  # arrays longer than this keep only their length
_U64 = struct.Struct("<Q")


def _block(name: str) -> int | None:
    """The block (layer) number of a tensor named blk.<n>.*, else None."""
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Tensor:
    name: str
    type_name: str          # ggml type, e.g. "Q4_K"
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    offset: int             # absolute file offset of the data
    n_bytes: int


@dataclass(frozen=True)
class LayerRange:
    index: int   # block number (blk.<index>.*)
    start: int   # first byte in the file
    end: int     # one past the last byte
    n_tensors: int

    @property
    def n_bytes(self) -> int:
        return self.end - self.start


@dataclass
class GGUFInfo:
    path: Path
    file_size: int
    version: int
    metadata: dict            # key -> value; arrays longer than 64 -> ArrayInfo (length, element type)
    tensors: list[Tensor]
    data_offset: int          # absolute offset of the tensor data section
    alignment: int = 32
    vocab_digest: str = ""    # sha256 of the raw tokenizer.ggml.tokens array: equal digests = same vocabulary
    array_types: dict = field(default_factory=dict)  # key -> the GGUF element type of its array value
    remote_bytes: int = 0     # bytes of layers held by remote devices (local_part): computed in every pass, not here
    _by_name: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._by_name = {t.name: t for t in self.tensors}

    @property
    def pass_bytes(self) -> int:
        """Bytes of weights a pass computes over: the file's, with the layers remote devices hold."""
        return self.file_size + self.remote_bytes

    def tensor(self, name: str) -> Tensor | None:
        return self._by_name.get(name)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    def arch_value(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def n_layer(self) -> int:
        return int(self.arch_value("block_count", len(self.layers())))

    @property
    def tied_output(self) -> bool:
        """True when there is no output.weight: the output reuses token_embd."""
        return "output.weight" not in self._by_name

    @property
    def vocab_size(self) -> int:
        toks = self.metadata.get("tokenizer.ggml.tokens")
        return toks.length if isinstance(toks, ArrayInfo) else len(toks or ())

    def layers(self) -> list[LayerRange]:
        """Byte range of every block; a block's tensors must be contiguous in the file."""
        spans: dict[int, list[Tensor]] = {}
        for t in self.tensors:
            i = _block(t.name)
            if i is not None:
                spans.setdefault(i, []).append(t)
        out = []
        for i in sorted(spans):
            ts = spans[i]
            out.append(LayerRange(i, min(t.offset for t in ts), max(t.offset + t.n_bytes for t in ts), len(ts)))
        return out

    def non_layer_tensors(self) -> list[Tensor]:
        return [t for t in self.tensors if not t.name.startswith("blk.")]

    def local_part(self, first_remote: int) -> GGUFInfo:
        """The model as this device holds it when layers first_remote.. live on remote devices (edgecad.rpc):
        their tensors, bytes and KV cache are the remote devices'. The file is the same."""
        kept = [t for t in self.tensors if (i := _block(t.name)) is None or i < first_remote]
        gone = sum(t.n_bytes for t in self.tensors) - sum(t.n_bytes for t in kept)
        meta = {**self.metadata, f"{self.architecture}.block_count": first_remote}
        return replace(self, file_size=self.file_size - gone, metadata=meta, tensors=kept, _by_name={},
                       remote_bytes=self.remote_bytes + gone)

    def type_bytes(self) -> Counter:
        c: Counter = Counter()
        for t in self.tensors:
            c[t.type_name] += t.n_bytes
        return c


# ---------------------------------------------------------------------------- the gate
# A file reaches llama.cpp's parser only once this reader has checked it: every count, length, offset and size
# against the file's size and llama.cpp's own limits, and the shapes of known attacks on llama.cpp's loader.
# Each check and its reason: docs/model-files.md.

MAX_KV = 1 << 16          # key-value pairs (real models: ~30-60)
MAX_TENSORS = 1 << 16     # tensors (real models: hundreds; the largest MoE: a few thousand)
MAX_DIMS = 4              # GGML_MAX_DIMS
MAX_LAYERS = 512          # LLAMA_MAX_LAYERS: llama.cpp aborts on a larger block_count
MAX_VOCAB = 1 << 21       # tokens (real vocabularies: 32k-262k)
MAX_ALIGNMENT = 1 << 16   # general.alignment (32 by default)
MAX_STRING = 16 << 20     # bytes of a metadata string (chat templates: tens of KB)
MAX_NAME = 64             # GGML_MAX_NAME: a tensor name is shorter
_MIN_SIZE = {_STRING: 8, _ARRAY: 12}  # bytes an element takes at least (a length, or a type and a length)
# keys llama.cpp reads as arrays of one element type: a narrower type makes it read past the array (#26690)
_TYPED_ARRAYS = {"tokenizer.ggml.tokens": _STRING, "tokenizer.ggml.merges": _STRING,
                 "tokenizer.ggml.scores": 6, "tokenizer.ggml.token_type": 5}
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
               8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}


class _Bad(Exception):
    """A field of the file that fails a check: (what, why)."""


class _NeedMore(Exception):
    """The header goes on past the mapped prefix of the file: map more of it and parse again."""


@dataclass(frozen=True)
class ArrayInfo:
    """A long metadata array, kept as its length and element type (and where its bytes are)."""
    length: int
    etype: int
    start: int  # file offset of its first element
    end: int    # one past its last byte


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.pos, self.size = buf, 0, size  # buf: the first len(buf) bytes of a file of `size`
        self.array_types: dict = {}  # key -> element type of its array (short arrays are materialised)

    def left(self) -> int:
        return self.size - self.pos

    def need(self, end: int) -> None:
        """The next read ends at `end`: past the prefix but inside the file, map more. (Past the file, the read
        itself fails as a truncated file's does.)"""
        if len(self.buf) < end <= self.size:
            raise _NeedMore

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(self.pos + n)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def length(self, what: str, each: int = 1) -> int:
        """A u64 count of items of at least `each` bytes: it must fit in what is left of the file."""
        n = self.unpack("<Q")
        if n * each > self.left():
            raise _Bad(what, f"declares {n:,} items that need more than the {self.left():,} bytes left in the file")
        return n

    def string(self, what: str) -> str:
        n = self.length(what)
        if n > MAX_STRING:
            raise _Bad(what, f"is a string of {n:,} bytes (at most {MAX_STRING:,})")
        self.need(self.pos + n)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string(f"the value of {key}")
        if vtype != _ARRAY:
            raise _Bad(key, f"has an unknown value type {vtype}")
        etype = self.unpack("<I")
        if etype == _ARRAY:
            raise _Bad(key, "is an array of arrays, which GGUF readers do not support")
        if etype not in _SCALARS and etype != _STRING:
            raise _Bad(key, f"is an array of unknown element type {etype}")
        size = struct.calcsize(_SCALARS[etype]) if etype in _SCALARS else _MIN_SIZE[etype]
        n = self.length(f"the array {key}", size)
        self.array_types[key] = etype
        if n <= _KEEP_ARRAY:
            return [self.value(etype, key) for _ in range(n)]
        start = self.pos
        if etype == _STRING:
            u64, buf, pos = _U64.unpack_from, self.buf, self.pos
            try:
                for _ in range(n):  # (a length past the end fails the next unpack, or the check below)
                    pos += 8 + u64(buf, pos)[0]
            except struct.error:
                self.need(pos + 8)
                raise
            if pos > self.size:
                raise _Bad(f"the array {key}", "has a string that runs past the end of the file")
            self.need(pos)
            self.pos = pos
        else:
            self.pos += n * size
        return ArrayInfo(n, etype, start, self.pos)


def _tensor_bytes(type_id: int, shape: tuple[int, ...]) -> tuple[str, int]:
    try:
        qtype = GGMLQuantizationType(type_id)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Bad("a tensor", f"has an unknown ggml type {type_id}") from None
    if shape[0] % block:
        raise _Bad("a tensor", f"has rows of {shape[0]} values, not a multiple of {qtype.name}'s block of {block}")
    n = 1
    for d in shape:
        n *= d
    if n >= 1 << 63:
        raise _Bad("a tensor", f"has {n:,} elements: its size overflows")
    return qtype.name, n // block * type_size


PREFIX = 16 << 20  # bytes read_gguf maps first: a header longer than that (a vocabulary of millions) doubles it


def read_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Parse and check a GGUF header; raise ModelFileError naming the file, the field and the fix on any problem
    (the gate in front of every llama.cpp load). Only a prefix of the file is mapped, grown while the header goes
    on past it: a 32-bit process cannot map a model over 2 GiB whole (nor need to, for a few MB of header)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path} (check the path, or fetch a model with `edgecad models fetch`)")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory, not a GGUF model file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelFileError(f"{path} is not a GGUF file (no GGUF magic): give a llama.cpp .gguf model")
        size = os.fstat(f.fileno()).st_size
        length = min(size, PREFIX)
        while True:
            try:
                buf = mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ)
            except (ValueError, OSError, OverflowError) as e:
                raise ModelFileError(f"cannot map {path}: {e}") from None
            try:
                return _gate(buf, path, size)
            except _NeedMore:
                length = min(size, 2 * length)
            finally:
                buf.close()


def parse_header(buf, path: str | os.PathLike = "<bytes>") -> GGUFInfo:
    """The gate on a whole file's bytes (a mapping, or bytes: the fuzzer's entry point): its GGUFInfo, or
    ModelFileError, and nothing else, for any input."""
    return _gate(buf, Path(path), len(buf))


def _gate(buf, path: Path, size: int) -> GGUFInfo:
    """parse_header on the first len(buf) bytes of a file of `size` bytes; _NeedMore when the header goes on past
    them (never when buf is the whole file). Every check against the file's size uses `size`."""
    try:
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise ModelFileError(f"{path} is not a GGUF file (no GGUF magic): give a llama.cpp .gguf model")
        info = _parse(path, buf, size)
        _check(info, buf)
        return info
    except _Bad as e:
        what, why = e.args
        raise ModelFileError(f"{path}: {what} {why}: this file is not a model llama.cpp can load safely; "
                             "fetch or download it again, or use another file") from None
    except MemoryError:
        raise ModelFileError(f"{path}: reading its header needs more memory than this device has: this file is not "
                             "a model llama.cpp can load here") from None
    except (struct.error, IndexError, OverflowError, ValueError):
        raise ModelFileError(
            f"{path} has a corrupt or truncated GGUF header (it ends at byte {size} before the header does): "
            "the download or copy was cut short, fetch or convert it again"
        ) from None


def _parse(path: Path, buf, size: int) -> GGUFInfo:
    c = _Cursor(buf, size)
    c.pos = 4
    version = c.unpack("<I")
    if version not in (2, 3):
        raise ModelFileError(f"{path} is GGUF version {version}; edgecad reads versions 2 and 3")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    if n_kv > MAX_KV or n_kv * 13 > c.left():
        raise _Bad("the header", f"declares {n_kv:,} key-value pairs (at most {MAX_KV:,}, and what the file holds)")
    if n_tensors > MAX_TENSORS or n_tensors * 25 > c.left():
        raise _Bad("the header", f"declares {n_tensors:,} tensors (at most {MAX_TENSORS:,}, and what the file holds)")
    meta, vocab_digest = {}, ""
    for _ in range(n_kv):
        key = c.string("a metadata key")
        if key in meta:
            raise _Bad(f"the key {key}", "appears twice")
        start, vtype = c.pos, c.unpack("<I")
        if key == "general.alignment" and vtype != 4:  # llama.cpp asserts (aborts) on any other type
            raise _Bad(key, f"has type {_TYPE_NAMES.get(vtype, vtype)}, where GGUF and llama.cpp need uint32")
        meta[key] = c.value(vtype, key)
        if key == "tokenizer.ggml.tokens":
            c.need(c.pos)  # (an array of scalars is skipped unread)
            with memoryview(buf)[start:c.pos] as raw:  # (no copy of what may be megabytes)
                vocab_digest = hashlib.sha256(raw).hexdigest()
    raw = []
    for _ in range(n_tensors):
        name = c.string("a tensor name")
        if len(name.encode()) >= MAX_NAME:
            raise _Bad(f"the tensor {name[:MAX_NAME]}...", f"has a name of {len(name.encode())} bytes (llama.cpp: "
                                                          f"under {MAX_NAME})")
        n_dims = c.unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f"the tensor {name}", f"has {n_dims} dimensions (1..{MAX_DIMS})")
        shape = tuple(c.unpack("<Q") for _ in range(n_dims))
        if min(shape) < 1 or max(shape) >= 1 << 62:
            raise _Bad(f"the tensor {name}", f"has a dimension out of range: {shape}")
        type_id, off = c.unpack("<I"), c.unpack("<Q")
        raw.append((name, shape, type_id, off))
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise _Bad("general.alignment", f"is {alignment!r}: it must be a power of two up to {MAX_ALIGNMENT:,}")
    data_offset = (c.pos + alignment - 1) // alignment * alignment
    tensors, names = [], set()
    for name, shape, type_id, off in raw:
        if name in names:
            raise _Bad(f"the tensor {name}", "appears twice")
        names.add(name)
        try:
            tname, nbytes = _tensor_bytes(type_id, shape)
        except _Bad as e:
            raise _Bad(f"the tensor {name}", e.args[1]) from None
        if off % alignment:
            raise _Bad(f"the tensor {name}", f"starts at data offset {off:,}, not a multiple of the alignment "
                                             f"{alignment}")
        tensors.append(Tensor(name, tname, shape, data_offset + off, nbytes))
    end = max((t.offset + t.n_bytes for t in tensors), default=data_offset)
    if end > size:
        raise ModelFileError(
            f"{path} is truncated: its tensors need {end} bytes but the file has {size}; "
            "the download or copy was cut short, fetch it again"
        )
    return GGUFInfo(path, size, version, meta, tensors, data_offset, alignment, vocab_digest, c.array_types)


_BYTE_TOKEN = re.compile(rb"<0x[0-9A-Fa-f]{2}>")
_BYTE_START = re.compile(rb"<0x")


def _check(g: GGUFInfo, buf) -> None:
    """What llama.cpp assumes of a model's header and does not check itself (each with its reason in
    docs/model-files.md)."""
    spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in g.tensors)
    for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
        if b_start < a_end:
            raise _Bad(f"the tensor {b}", f"overlaps the tensor {a}")
    arch = g.metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise _Bad("general.architecture", "is missing or not a string")
    n_layer = g.metadata.get(f"{arch}.block_count")
    if n_layer is not None and (not isinstance(n_layer, int) or isinstance(n_layer, bool) or
                                not 0 <= n_layer <= MAX_LAYERS):
        raise _Bad(f"{arch}.block_count", f"is {n_layer!r}: llama.cpp holds at most {MAX_LAYERS} layers")
    for key, etype in _TYPED_ARRAYS.items():
        v = g.metadata.get(key)
        if v is None:
            continue
        got = g.array_types.get(key)
        if got != etype:
            raise _Bad(key, f"is {'an array of ' + _TYPE_NAMES.get(got, '?') if got is not None else 'not an array'}"
                            f", where llama.cpp reads an array of {_TYPE_NAMES[etype]}")
    toks = g.metadata.get("tokenizer.ggml.tokens")
    if toks is not None:
        n = g.vocab_size
        if not 0 < n <= MAX_VOCAB:
            raise _Bad("tokenizer.ggml.tokens", f"has {n:,} tokens (1..{MAX_VOCAB:,})")
        for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            v = g.metadata.get(key)
            if v is not None and (v.length if isinstance(v, ArrayInfo) else len(v)) != n:
                raise _Bad(key, f"has a length other than the vocabulary's {n:,} tokens")
        for name in ("token_embd.weight", "output.weight"):
            t = g.tensor(name)
            if t is not None and (len(t.shape) < 2 or t.shape[1] != n):
                raise _Bad(f"the tensor {name}", f"has shape {t.shape}, not one row per token ({n:,})")
        if g.metadata.get("tokenizer.ggml.model") not in ("gpt2", "bert"):  # (BPE and WPM texts are only text)
            _check_byte_tokens(toks, buf)


def _check_byte_tokens(toks, buf) -> None:
    """Every token whose text is a byte token `<0x..>` is exactly `<0xHH>`: llama.cpp parses the hex digits of
    byte tokens (SPM, UGM, PLaMo-2 vocabularies) and writes the byte where they say (`<0x-1>`: a heap write out
    of bounds, #25969)."""
    texts = toks if isinstance(toks, list) else None
    if texts is None:
        for m in _BYTE_START.finditer(buf, toks.start, toks.end):  # (the mapping itself: no copy)
            p = m.start()
            if p >= toks.start + 8:
                n = struct.unpack_from("<Q", buf, p - 8)[0]
                # (the array's bytes only: a match that starts no token reads the same however much is mapped)
                text = bytes(buf[p:min(p + n, toks.end)]) if n <= 64 else b""
                if text.endswith(b">") and not _BYTE_TOKEN.fullmatch(text):
                    raise _Bad("tokenizer.ggml.tokens", f"has a malformed byte token {text!r}")
        return
    for t in texts:
        if t.startswith("<0x") and t.endswith(">") and not _BYTE_TOKEN.fullmatch(t.encode()):
            raise _Bad("tokenizer.ggml.tokens", f"has a malformed byte token {t!r}")
