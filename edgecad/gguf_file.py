"""Read a GGUF file's header: metadata, tensor table, and the byte ranges of each layer.

gguf.GGUFReader materialises every token and merge (about 7 s on the 1.5B
target); this reader skips long arrays and parses the same header in a fraction
of that, keeping the gguf package's tables for types and block sizes. It is
also the check that gives clear errors for a missing, non-GGUF or truncated
file before llama.cpp sees it: read_gguf parses through the gate
(edgecad.gguf_gate: the header's budget, and what llama.cpp would abort on).
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
from .gguf_gate import (MAX_ALIGNMENT, MAX_DIMS, MAX_HEADER, MAX_KV, MAX_NAME, MAX_TENSORS, TYPE_NAMES, ArrayInfo,
                        Bad, Cursor, check)

GGUF_MAGIC = b"GGUF"


def mb(n: float) -> str:
    """A size as edgecad prints a model's: "1,234.5 MB" (`edgecad inspect`, `models list`, a paging plan)."""
    return f"{n / 1e6:,.1f} MB"


def block_of(name: str) -> int | None:
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
    metadata: dict            # key -> value; string arrays and arrays longer than 64 -> ArrayInfo (length, element
                              # type), strings over 1 MiB -> StringInfo
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
    def recurrent(self) -> bool:
        """Some layers keep a recurrent state (Mamba, RWKV; hybrids: Jamba, Falcon-H1, Qwen3-Next, LFM2...): their
        cache holds one state per sequence, which cannot drop its last tokens (llama.cpp's memory_recurrent)."""
        a = self.architecture
        return any(k.startswith(f"{a}.{p}.") for k in self.metadata for p in ("ssm", "wkv", "shortconv", "kda"))

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
            i = block_of(t.name)
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
        kept = [t for t in self.tensors if (i := block_of(t.name)) is None or i < first_remote]
        gone = sum(t.n_bytes for t in self.tensors) - sum(t.n_bytes for t in kept)
        meta = {**self.metadata, f"{self.architecture}.block_count": first_remote}
        return replace(self, file_size=self.file_size - gone, metadata=meta, tensors=kept, _by_name={},
                       remote_bytes=self.remote_bytes + gone)

    def type_bytes(self) -> Counter:
        c: Counter = Counter()
        for t in self.tensors:
            c[t.type_name] += t.n_bytes
        return c

    def describe(self) -> str:
        """What `edgecad inspect` shows of the file: architecture, tokenizer, quantisation, layer by layer."""
        m, layers = self.metadata, self.layers()
        out = [f"file            {self.path} ({mb(self.file_size)}, GGUF v{self.version})",
               f"name            {m.get('general.name', '?')}",
               f"architecture    {self.architecture}: {self.n_layer} layers, n_embd "
               f"{self.arch_value('embedding_length')}, n_ff {self.arch_value('feed_forward_length')}, heads "
               f"{self.arch_value('attention.head_count')}/{self.arch_value('attention.head_count_kv')} (q/kv), "
               f"context {self.arch_value('context_length')}",
               f"tokenizer       {m.get('tokenizer.ggml.model', '?')} (pre {m.get('tokenizer.ggml.pre', '?')}), "
               f"{self.vocab_size} tokens",
               f"output          {'tied to token_embd' if self.tied_output else 'own output.weight'}",
               "quantisation    " + ", ".join(f"{k} {mb(v)}" for k, v in self.type_bytes().most_common()),
               "non-layer       " + ", ".join(f"{t.name} {t.type_name} {mb(t.n_bytes)}"
                                              for t in self.non_layer_tensors())]
        if layers:
            sizes = [l.n_bytes for l in layers]
            out.append(f"layers          {len(layers)} x {mb(min(sizes))} .. {mb(max(sizes))}, {mb(sum(sizes))} in all")
            out += [f"  blk.{l.index:<3} offset {l.start:>13,}  {mb(l.n_bytes):>10}  ({l.n_tensors} tensors)"
                    for l in layers]
        return "\n".join(out)



def _tensor_bytes(type_id: int, shape: tuple[int, ...]) -> tuple[str, int]:
    try:
        qtype = GGMLQuantizationType(type_id)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise Bad("a tensor", f"has an unknown ggml type {type_id}") from None
    if shape[0] % block:
        raise Bad("a tensor", f"has rows of {shape[0]} values, not a multiple of {qtype.name}'s block of {block}")
    n = 1
    for d in shape:
        n *= d
    if n >= 1 << 63:
        raise Bad("a tensor", f"has {n:,} elements: its size overflows")
    return qtype.name, n // block * type_size


PREFIX = 16 << 20  # bytes read_gguf maps first: a header longer than that (a vocabulary of millions) maps more


class _Mapping:
    """The first bytes of an open file, mapped read-only; grow() maps more (doubling), closing the old mapping."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size, self.buf = f, path, size, None
        self.grow(min(size, PREFIX))

    def grow(self, end: int):
        length = len(self.buf) if self.buf is not None else end
        while length < end:
            length *= 2
        try:
            buf = mmap.mmap(self.f.fileno(), min(self.size, length, max(end, MAX_HEADER)), access=mmap.ACCESS_READ)
        except (ValueError, OSError, OverflowError) as e:
            raise ModelFileError(f"cannot map {self.path}: {e}") from None
        self.close()
        self.buf = buf
        return buf

    def close(self) -> None:
        if self.buf is not None:
            self.buf.close()


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
        m = _Mapping(f, path, size)
        try:
            return _gate(m.buf, path, size, m.grow)
        finally:
            m.close()


def parse_header(buf, path: str | os.PathLike = "<bytes>") -> GGUFInfo:
    """The gate on a whole file's bytes (a mapping, or bytes: the fuzzer's entry point): its GGUFInfo, or
    ModelFileError, and nothing else, for any input."""
    return _gate(buf, Path(path), len(buf))


def _gate(buf, path: Path, size: int, grow=None) -> GGUFInfo:
    """parse_header on the first len(buf) bytes of a file of `size` bytes, mapping more with grow(end) when the
    header goes on past them. Every check against the file's size uses `size`."""
    try:
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise ModelFileError(f"{path} is not a GGUF file (no GGUF magic): give a llama.cpp .gguf model")
        c = Cursor(buf, size, grow)
        info = _parse(path, c)
        check(info, c.buf)
        info.vocab_digest = _vocab_digest(info.metadata.get("tokenizer.ggml.tokens"), c.buf)
        return info
    except Bad as e:
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


def _vocab_digest(toks, buf) -> str:
    """sha256 of the raw tokenizer.ggml.tokens value (its type, count and strings): equal digests, same vocabulary."""
    if not isinstance(toks, ArrayInfo):
        return ""
    with memoryview(buf)[toks.start - 12:toks.end] as raw:  # (no copy of what may be megabytes)
        return hashlib.sha256(raw).hexdigest()


def _parse(path: Path, c: Cursor) -> GGUFInfo:
    """The header in GGUF's order (version, counts, key-value pairs, tensor infos), read through the gate's
    cursor; its tensors must end inside the file."""
    c.pos = 4
    version = c.unpack("<I")
    if version not in (2, 3):
        raise ModelFileError(f"{path} is GGUF version {version}; edgecad reads versions 2 and 3")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    if n_kv > MAX_KV or n_kv * 13 > c.left():
        raise Bad("the header", f"declares {n_kv:,} key-value pairs (at most {MAX_KV:,}, and what the file holds)")
    if n_tensors > MAX_TENSORS or n_tensors * 25 > c.left():
        raise Bad("the header", f"declares {n_tensors:,} tensors (at most {MAX_TENSORS:,}, and what the file holds)")
    meta = {}
    for _ in range(n_kv):
        key = c.string("a metadata key")
        if key in meta:
            raise Bad(f"the key {key}", "appears twice")
        vtype = c.unpack("<I")
        if key == "general.alignment" and vtype != 4:  # llama.cpp asserts (aborts) on any other type
            raise Bad(key, f"has type {TYPE_NAMES.get(vtype, vtype)}, where GGUF and llama.cpp need uint32")
        meta[key] = c.value(vtype, key)
    raw = []
    for _ in range(n_tensors):
        name = c.string("a tensor name")
        if len(name.encode()) >= MAX_NAME:
            raise Bad(f"the tensor {name[:MAX_NAME]}...", f"has a name of {len(name.encode())} bytes (llama.cpp: "
                                                         f"under {MAX_NAME})")
        n_dims = c.unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise Bad(f"the tensor {name}", f"has {n_dims} dimensions (1..{MAX_DIMS})")
        shape = tuple(c.unpack("<Q") for _ in range(n_dims))
        if min(shape) < 1 or max(shape) >= 1 << 62:
            raise Bad(f"the tensor {name}", f"has a dimension out of range: {shape}")
        type_id, off = c.unpack("<I"), c.unpack("<Q")
        raw.append((name, shape, type_id, off))
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise Bad("general.alignment", f"is {alignment!r}: it must be a power of two up to {MAX_ALIGNMENT:,}")
    data_offset = (c.pos + alignment - 1) // alignment * alignment
    tensors = _tensors(raw, data_offset, alignment)
    end = max((t.offset + t.n_bytes for t in tensors), default=data_offset)
    if end > c.size:
        raise ModelFileError(
            f"{path} is truncated: its tensors need {end} bytes but the file has {c.size}; "
            "the download or copy was cut short, fetch it again"
        )
    return GGUFInfo(path, c.size, version, meta, tensors, data_offset, alignment, "", c.array_types)


def _tensors(raw: list, data_offset: int, alignment: int) -> list[Tensor]:
    """The tensor infos (name, shape, type id, offset in the data section) as Tensors: no name twice, a known
    ggml type, an aligned offset."""
    tensors, names = [], set()
    for name, shape, type_id, off in raw:
        if name in names:
            raise Bad(f"the tensor {name}", "appears twice")
        names.add(name)
        try:
            tname, nbytes = _tensor_bytes(type_id, shape)
        except Bad as e:
            raise Bad(f"the tensor {name}", e.args[1]) from None
        if off % alignment:
            raise Bad(f"the tensor {name}", f"starts at data offset {off:,}, not a multiple of the alignment "
                                            f"{alignment}")
        tensors.append(Tensor(name, tname, shape, data_offset + off, nbytes))
    return tensors

