"""Rewrite a GGUF model into a new file: the registry's derived workloads.

`to_f16` re-encodes to F16: it dequantizes every quantized tensor with the `gguf` package and writes
it as F16 (norms, biases and other F32 tensors stay F32), with `general.file_type` set to
MOSTLY_F16. The result is the same model (the same text, about 1/3 of the Q4_K_M speed resident)
in a file 3.2x larger: a stand-in for a target too large for the device.

`widen_ffn` widens every layer's gated feed-forward (ffn_gate, ffn_up, ffn_down) to a larger
intermediate size `n_ff` with zero neurons, working on the quantized bytes without dequantizing: an
all-zero block of any ggml type decodes to exactly 0 (its scale is 0), so ffn_gate and ffn_up get
rows of zero bytes, each row of ffn_down zero blocks at its end, and `{arch}.feed_forward_length`
says `n_ff`. The new neurons give silu(0) * 0 = 0 into zero columns: the same outputs as the
source, with the file size and compute of a model whose feed-forward is that wide (a 7B-class
target from the 1.5B, tensor types unchanged).

Both copy the rest of the metadata and write tensors one at a time, so converting needs little
memory beyond one tensor.
"""
from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .errors import EdgecadError
from .progress import Progress

_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type")
MOSTLY_F16 = 1  # llama_ftype
_FFN = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(weight|bias)")


class _Tensor(NamedTuple):
    """A tensor of the new file: what its info says (as GGUFWriter.add_tensor_info takes it) and its data."""
    name: str
    shape: tuple[int, ...]       # numpy order; with dtype uint8 and a raw_dtype, the shape of its bytes
    dtype: np.dtype
    nbytes: int
    raw_dtype: object            # gguf.GGMLQuantizationType, or None: the type dtype names
    data: Callable[[], np.ndarray]


def to_f16(src: os.PathLike, dst: os.PathLike, *, progress: bool = True) -> Path:
    """Write `src` re-encoded to F16 into `dst` (which must not be the final name: callers rename)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    F32 = gguf.GGMLQuantizationType.F32
    plan = []
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # numpy order: outermost first
        dtype = np.dtype(np.float32 if t.tensor_type == F32 or len(shape) == 1 else np.float16)
        plan.append(_Tensor(t.name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, None,
                            partial(_as_float, t, shape, dtype)))
    return _rewrite(reader, dst, plan, f"re-encoding {Path(src).name} to F16", MOSTLY_F16, {}, progress)


def _as_float(t, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    import gguf

    data = t.data if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else \
        gguf.quants.dequantize(t.data, t.tensor_type)
    return np.ascontiguousarray(np.asarray(data).reshape(shape), dtype=dtype)


def widen_ffn(src: os.PathLike, dst: os.PathLike, *, n_ff: int, progress: bool = True) -> Path:
    """Write `src` with its feed-forward widened to `n_ff` zero-padded neurons into `dst` (which must not be the
    final name: callers rename). EdgecadError, before anything is written, for a model without a gated
    feed-forward to widen or an `n_ff` that is not larger than its width or not a multiple of its types' blocks."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    key = f"{reader.fields['general.architecture'].contents()}.feed_forward_length"
    old = _ffn_width(reader, key, Path(src).name)
    _check_width(reader, n_ff, old, Path(src).name)
    plan = []
    for t in reader.tensors:
        data = t.data  # numpy order: rows of bytes (quantized) or of values (F32, F16)
        m = _FFN.fullmatch(t.name)
        if m is None or m[3] == "bias":  # (ffn_down's bias: n_embd wide)
            shape, widen = data.shape, None
        elif m[2] == "down":  # each row: its old / block blocks, then zero blocks (a block: `per_block` items)
            block = gguf.GGML_QUANT_SIZES[t.tensor_type][0]
            per_block = data.shape[-1] // (old // block)
            shape, widen = (*data.shape[:-1], n_ff // block * per_block), (..., slice(0, data.shape[-1]))
        else:  # gate, up: old rows, then rows of zeros
            shape, widen = (n_ff, *data.shape[1:]), slice(0, old)
        nbytes = int(np.prod(shape)) * data.dtype.itemsize
        plan.append(_Tensor(t.name, tuple(int(x) for x in shape), data.dtype, nbytes, t.tensor_type,
                            partial(_widened, data, shape, widen)))
    file_type = reader.fields["general.file_type"].contents() if "general.file_type" in reader.fields else None
    return _rewrite(reader, dst, plan, f"widening {Path(src).name}'s feed-forward to {n_ff}", file_type,
                    {key: n_ff}, progress)


def _widened(data: np.ndarray, shape: tuple[int, ...], where) -> np.ndarray:
    """`data` as is (where None), else zeros of `shape` holding `data` at `where`."""
    if where is None:
        return data
    out = np.zeros(shape, data.dtype)
    out[where] = data
    return out


def _ffn_width(reader, key: str, name: str) -> int:
    """The feed-forward width of a model whose every layer has a gated feed-forward without biases, as its
    tensors and its metadata agree; else the EdgecadError that says why it cannot be widened."""
    found: dict[str, set[str]] = {}
    widths = set()
    for t in reader.tensors:
        if m := _FFN.fullmatch(t.name):
            if m[3] == "bias" and m[2] != "down":
                raise EdgecadError(f"{name} has feed-forward biases ({t.name}): widening keeps neurons zero only "
                                   "without them")
            if m[3] == "weight":
                found.setdefault(m[1], set()).add(m[2])
                widths.add(int(t.shape[0] if m[2] == "down" else t.shape[1]))  # (ggml order: innermost first)
    if not found:
        raise EdgecadError(f"{name} has no feed-forward tensors (blk.N.ffn_gate/ffn_up/ffn_down.weight) to widen")
    if lacking := next((f"layer {i} has no ffn_{p}" for i, parts in found.items()
                        for p in ("gate", "up", "down") if p not in parts), None):
        raise EdgecadError(f"{name}: {lacking}; only a gated feed-forward (gate, up, down) widens with zero neurons")
    meta = reader.fields[key].contents() if key in reader.fields else None
    if len(widths) != 1 or meta != min(widths):
        raise EdgecadError(f"{name}'s feed-forward widths ({sorted(widths)} in its tensors, {key} = {meta}) "
                           "are not one width: it cannot be widened")
    return widths.pop()


def _check_width(reader, n_ff: int, old: int, name: str) -> None:
    """EdgecadError unless n_ff is larger than the old width and a whole number of blocks of every ffn type."""
    import gguf

    if n_ff <= old:
        raise EdgecadError(f"n_ff {n_ff} does not widen {name}: its feed-forward is {old} wide; give a larger width")
    for t in reader.tensors:
        block = gguf.GGML_QUANT_SIZES[t.tensor_type][0]
        if _FFN.fullmatch(t.name) and n_ff % block:
            raise EdgecadError(f"n_ff {n_ff} is not a multiple of {block}, the block size of {t.tensor_type.name} "
                               f"({t.name} in {name}): give a multiple of {block}")


def _rewrite(reader, dst: os.PathLike, plan: list[_Tensor], label: str, file_type: int | None,
             replace: dict, progress: bool) -> Path:
    """Write into `dst` the metadata of `reader` (the values of `replace`'s keys replaced, general.file_type
    `file_type` last) and the tensors of `plan`, one at a time, synced."""
    import gguf

    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    try:  # the writer is closed whatever fails (a full disk): the caller deletes dst, which frees its space
        for name, field in reader.fields.items():
            if name.startswith(_SKIP_KEYS):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, replace.get(name, field.contents()), vtype, sub_type=sub)
        if file_type is not None:
            w.add_file_type(file_type)
        for t in plan:
            w.add_tensor_info(t.name, t.shape, t.dtype, t.nbytes, raw_dtype=t.raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        bar = Progress(sum(t.nbytes for t in plan), label, "MB", 1e6) if progress else None
        try:
            for t in plan:
                out = t.data()
                w.write_tensor_data(out)
                if bar:
                    bar.update(out.nbytes)
            w.fout[0].flush()
            os.fsync(w.fout[0].fileno())
        finally:
            if bar:
                bar.close()
    finally:
        w.close()
    return Path(dst)
