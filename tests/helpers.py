"""Helpers shared by the tests: the prompt set, the pager's budget for a tiny target, the one chi-square test."""
from __future__ import annotations

import math
import os
import signal
import threading
from contextlib import contextmanager

import numpy as np

# The prompts the tests complete: plain words, code, repetition (several tests take a prefix of this list).
PROMPTS = ["hello the world", "Once upon a time", "def f(x):\n    return", "in an inner on", "abc abc abc"]


def budget_for(target, params, pinned_layers: int = 3) -> int:
    """A target budget that pins the essentials and `pinned_layers` layers and streams the rest."""
    from edgecad.gguf_file import read_gguf
    from edgecad.measure import paging_plan
    info = read_gguf(target)
    layer = max(l.n_bytes for l in info.layers())
    return paging_plan(info, 10 ** 9, params).minimum + pinned_layers * layer


@contextmanager
def sigint_after(seconds: float):
    """A real SIGINT to this process `seconds` into the block (the C library's flag and Python's KeyboardInterrupt,
    as a terminal's Ctrl-C), unless the block ends first: the timer is then cancelled, so a late SIGINT never
    reaches pytest itself (it would stop the whole run). Wrap it in pytest.raises(KeyboardInterrupt) where the
    signal must land: a block that ends first then fails its test."""
    t = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    t.start()
    try:
        yield
    finally:
        t.cancel()
        t.join()


def _chi2_quantile(dof: int, p: float = 0.999) -> float:
    """The chi-square distribution's p-quantile (Wilson-Hilferty: within 1% for dof >= 3)."""
    z = {0.999: 3.0902, 0.99: 2.3263}[p]
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(observed, expected, *, tv: float, min_power: float = 0.9) -> str:
    """Pearson's test of observed counts against expected counts (same support; bins expected below 5 are
    pooled). Fails when the counts are off at p < 0.001, and fails the test's design when its draws are too
    few to see a bias of total variation `tv` with probability min_power: the statistic is then a
    non-central chi-square whose non-centrality n * chi2(p'||p) is at least 4 n tv^2 (Cauchy-Schwarz).
    Returns a summary to print."""
    obs, exp = np.asarray(observed, float), np.asarray(expected, float)
    n = obs.sum()
    assert abs(exp.sum() - n) < 1e-6 * n, "expected counts must add up to the observed total"
    assert obs[exp == 0].sum() == 0, f"{obs[exp == 0].sum():.0f} draws of tokens the target never gives"
    big = exp >= 5
    o, e = np.append(obs[big], obs[~big].sum()), np.append(exp[big], exp[~big].sum())
    if e[-1] < 1e-9:
        o, e = o[:-1], e[:-1]
    dof = len(o) - 1
    assert dof >= 2, "too few bins for a chi-square test"
    chi2, limit = float(((o - e) ** 2 / e).sum()), _chi2_quantile(dof)
    rng = np.random.default_rng(0)
    power = float((rng.noncentral_chisquare(dof, 4 * n * tv ** 2, 20000) > limit).mean())
    summary = (f"chi2 {chi2:.1f} (dof {dof}, limit {limit:.1f} at p=0.001), n {n:.0f}, "
               f"power {power:.2f} against TV {tv}")
    assert power >= min_power, f"the test is too weak: {summary}"
    assert chi2 < limit, f"the draws do not follow the expected distribution: {summary}"
    return summary


# ---------------------------------------------------------------------------- crafted model files

_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_value(vtype: int, value, etype: int = None) -> bytes:
    """A GGUF value's bytes (type not included): a scalar, a string, or an array of `etype` elements."""
    import struct
    if vtype == 8:
        b = value.encode() if isinstance(value, str) else value
        return struct.pack("<Q", len(b)) + b
    if vtype == 9:
        return struct.pack("<IQ", etype, len(value)) + b"".join(gguf_value(etype, v) for v in value)
    return struct.pack(_FMT[vtype], value)


def craft_gguf(src, dst, *, set_kv: dict = None, drop=(), tensors=None, counts=None, raw_kv: bytes = b""):
    """Write a copy of the GGUF `src` with its header changed: set_kv {key: (type, value[, etype])} replaces or
    adds key-values, drop removes keys, tensors(list of [name, shape, type, offset]) edits the tensor infos in
    place, counts=(n_tensors, n_kv) overrides the header's counts (None: the true one), raw_kv is appended to the
    key-values as is.
    The tensor data is copied unchanged (tensor offsets are relative to it)."""
    import struct

    import gguf
    r = gguf.GGUFReader(str(src))
    kv = []
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in drop or f.name in (set_kv or {}):
            continue
        kv.append(b"".join(p.tobytes() for p in f.parts))
    for key, spec in (set_kv or {}).items():
        vtype, value = spec[0], spec[1]
        kv.append(gguf_value(8, key) + struct.pack("<I", vtype) + gguf_value(vtype, value, *spec[2:]))
    infos = [[t.name, [int(x) for x in t.shape], int(t.tensor_type), int(t.data_offset - r.data_offset)]
             for t in r.tensors]
    if tensors is not None:
        tensors(infos)
    ti = b"".join(gguf_value(8, n) + struct.pack("<I", len(s)) + b"".join(struct.pack("<Q", d) for d in s)
                  + struct.pack("<IQ", t, o) for n, s, t, o in infos)
    n_tensors, n_kv = counts or (None, None)
    n_tensors = len(infos) if n_tensors is None else n_tensors
    n_kv = len(kv) + bool(raw_kv) if n_kv is None else n_kv
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(kv) + raw_kv + ti
    head += bytes(-len(head) % 32)
    with open(src, "rb") as f:
        f.seek(r.data_offset)
        data = f.read()
    with open(dst, "wb") as f:
        f.write(head + data)
    return dst
