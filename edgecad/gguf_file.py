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
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelFileError

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 64  # arrays longer than this keep only their length


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
    metadata: dict            # key -> value; long arrays -> ("array", length)
    tensors: list[Tensor]
    data_offset: int          # absolute offset of the tensor data section
    alignment: int = 32
    vocab_digest: str = ""    # sha256 of the raw tokenizer.ggml.tokens array: equal digests = same vocabulary
    _by_name: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._by_name = {t.name: t for t in self.tensors}

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
        return toks[1] if isinstance(toks, tuple) else len(toks or ())

    def layers(self) -> list[LayerRange]:
        """Byte range of every block; a block's tensors must be contiguous in the file."""
        spans: dict[int, list[Tensor]] = {}
        for t in self.tensors:
            m = re.match(r"blk\.(\d+)\.", t.name)
            if m:
                spans.setdefault(int(m.group(1)), []).append(t)
        out = []
        for i in sorted(spans):
            ts = spans[i]
            out.append(LayerRange(i, min(t.offset for t in ts), max(t.offset + t.n_bytes for t in ts), len(ts)))
        return out

    def non_layer_tensors(self) -> list[Tensor]:
        return [t for t in self.tensors if not t.name.startswith("blk.")]

    def type_bytes(self) -> Counter:
        c: Counter = Counter()
        for t in self.tensors:
            c[t.type_name] += t.n_bytes
        return c


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string runs past end of file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        n = struct.unpack_from("<Q", self.buf, self.pos)[0]
        self.pos += 8 + n

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if n <= _KEEP_ARRAY:
                return [self.value(etype) for _ in range(n)]
            if etype == _STRING:
                for _ in range(n):
                    self.skip_string()
            elif etype in _SCALARS:
                self.pos += n * struct.calcsize(_SCALARS[etype])
            else:
                for _ in range(n):
                    self.value(etype)
            if self.pos > len(self.buf):
                raise struct.error("array runs past end of file")
            return ("array", n)
        raise ValueError(f"unknown GGUF value type {vtype}")


def _tensor_bytes(type_id: int, shape: tuple[int, ...]) -> tuple[str, int]:
    qtype = GGMLQuantizationType(type_id)
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return qtype.name, n // block * type_size


def read_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Parse a GGUF header; raise ModelFileError naming the file and the fix on any problem."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path} (check the path, or fetch a model with `edgecad models fetch`)")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory, not a GGUF model file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelFileError(f"{path} is not a GGUF file (no GGUF magic): give a llama.cpp .gguf model")
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError) as e:
            raise ModelFileError(f"cannot map {path}: {e}") from None
    try:
        c = _Cursor(buf)
        c.pos = 4
        version = c.unpack("<I")
        if version not in (2, 3):
            raise ModelFileError(f"{path} is GGUF version {version}; edgecad reads versions 2 and 3")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        meta, vocab_digest = {}, ""
        for _ in range(n_kv):
            key = c.string()
            start = c.pos
            meta[key] = c.value(c.unpack("<I"))
            if key == "tokenizer.ggml.tokens":
                vocab_digest = hashlib.sha256(buf[start:c.pos]).hexdigest()
        raw = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.unpack("<I")
            shape = tuple(c.unpack("<Q") for _ in range(n_dims))
            type_id, off = c.unpack("<I"), c.unpack("<Q")
            raw.append((name, shape, type_id, off))
        alignment = int(meta.get("general.alignment", 32))
        data_offset = (c.pos + alignment - 1) // alignment * alignment
    except (struct.error, IndexError, ValueError):
        raise ModelFileError(
            f"{path} has a corrupt or truncated GGUF header (it ends at byte {size} before the header does): "
            "the download or copy was cut short, fetch or convert it again"
        ) from None
    finally:
        buf.close()
    tensors = []
    for name, shape, type_id, off in raw:
        try:
            tname, nbytes = _tensor_bytes(type_id, shape)
        except (ValueError, KeyError):
            raise ModelFileError(f"{path}: tensor {name} has unknown ggml type {type_id}") from None
        tensors.append(Tensor(name, tname, shape, data_offset + off, nbytes))
    end = max((t.offset + t.n_bytes for t in tensors), default=data_offset)
    if end > size:
        raise ModelFileError(
            f"{path} is truncated: its tensors need {end} bytes but the file has {size}; "
            "the download or copy was cut short, fetch it again"
        )
    return GGUFInfo(path, size, version, meta, tensors, data_offset, alignment, vocab_digest)

