"""Re-encode a GGUF model to F16: the registry's big-target workload.

`to_f16` dequantizes every quantized tensor with the `gguf` package and writes it as F16 (norms,
biases and other F32 tensors stay F32); metadata is copied with `general.file_type` set to
MOSTLY_F16. The result is the same model (the same text, about 1/3 of the Q4_K_M speed resident)
in a file 3.2x larger: a stand-in for a target too large for the device. Tensors are written one
at a time, so converting needs little memory beyond one tensor.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .progress import Progress

_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type")
MOSTLY_F16 = 1  # llama_ftype


def to_f16(src: os.PathLike, dst: os.PathLike, *, progress: bool = True) -> Path:
    """Write `src` re-encoded to F16 into `dst` (which must not be the final name: callers rename)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    try:  # the writer is closed whatever fails (a full disk): the caller deletes dst, which frees its space
        return _write(reader, w, src, dst, progress)
    finally:
        w.close()


def _write(reader, w, src: os.PathLike, dst: os.PathLike, progress: bool) -> Path:
    import gguf

    for name, field in reader.fields.items():
        if name.startswith(_SKIP_KEYS):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    w.add_file_type(MOSTLY_F16)

    F32 = gguf.GGMLQuantizationType.F32
    plan = []
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # numpy order: outermost first
        keep_f32 = t.tensor_type == F32 or len(shape) == 1
        dtype = np.float32 if keep_f32 else np.float16
        plan.append((t, shape, dtype))
        w.add_tensor_info(t.name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in plan)
    bar = Progress(total, f"re-encoding {Path(src).name} to F16", "MB", 1e6) if progress else None
    try:
        for t, shape, dtype in plan:
            data = t.data if t.tensor_type in (F32, gguf.GGMLQuantizationType.F16) else \
                gguf.quants.dequantize(t.data, t.tensor_type)
            out = np.ascontiguousarray(np.asarray(data).reshape(shape), dtype=dtype)
            w.write_tensor_data(out)
            if bar:
                bar.update(out.nbytes)
        w.fout[0].flush()
        os.fsync(w.fout[0].fileno())
    finally:
        if bar:
            bar.close()
    return Path(dst)
