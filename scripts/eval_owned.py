"""Issue 35's probe: does a pass compute slower from the page cache than from memory the engine owns?

One process, the target mapped as a paged target is (no repacking), everything resident. 1-token passes are timed
with the weights in four states (cache and churn interleaved, two rounds; then the owned states, two rounds each:
moving the memory is one-way):
  cache     the file's pages in the page cache, mapped by llama.cpp (what a pinned layer is)
  owned     the same address range replaced by anonymous memory holding the same bytes (mremap over the mapping:
            tensor pointers do not change), transparent huge pages refused (MADV_NOHUGEPAGE)
  owned-thp the same with MADV_HUGEPAGE
  churn     page cache, but each pass the streamed half of the layers is evicted (MADV_DONTNEED +
            POSIX_FADV_DONTNEED) and read back (MADV_POPULATE_READ) before it runs: the pager's work, done
            between passes here (no overlap) so that its cost to the compute shows alone
The logits of every state are compared with the first's (the bytes are the same: they must be equal).

    python scripts/eval_owned.py [TARGET] [PASSES]     # default: the default target, 16 passes per state
"""
import ctypes
import mmap
import os
import sys
import time

import numpy as np

from edgecad import registry
from edgecad.gguf_file import read_gguf
from edgecad.llama import Batch, Context, ContextParams, Model, ModelParams
from edgecad.pager import file_mappings, new_mapping

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mmap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
libc.mremap.restype = ctypes.c_void_p
libc.madvise.argtypes, libc.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_POPULATE_READ = 14, 15, 22
PAGE = mmap.PAGESIZE


def check(ok, what):
    if not ok:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def own(addr: int, length: int, huge: bool) -> None:
    """Replace [addr, addr+length) (page aligned) by anonymous memory holding the same bytes."""
    buf = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    check(buf not in (None, ctypes.c_void_p(-1).value), "mmap")
    check(libc.madvise(buf, length, MADV_HUGEPAGE if huge else MADV_NOHUGEPAGE) == 0, "madvise")
    ctypes.memmove(buf, addr, length)
    moved = libc.mremap(buf, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, addr)
    check(moved == addr, "mremap")


def time_passes(ctx: Context, batch: Batch, prompt: list, n: int) -> tuple[float, np.ndarray]:
    ctx.prefill(batch, prompt)
    times, tok = [], prompt[-1]
    for i in range(n):
        batch.clear()
        batch.add(tok, len(prompt) + i, (0,), True)
        t0 = time.perf_counter()
        ctx.decode(batch)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), ctx.logits(0).copy()


def main():
    target = registry.resolve(sys.argv[1] if len(sys.argv) > 1 else registry.DEFAULT_TARGET)
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    info = read_gguf(target)
    before = file_mappings(target)
    with open(target, "rb") as f:  # everything in the page cache
        while f.read(64 << 20):
            pass
    model = Model(target, ModelParams(use_mmap=True, use_extra_bufts=False))
    addr, map_off, map_len = new_mapping(target, before)
    layers = info.layers()
    lo = -(-info.data_offset // PAGE) * PAGE  # the tensor data, page aligned inside the mapping
    hi = (map_off + map_len) // PAGE * PAGE
    streamed = layers[len(layers) // 2:]
    ctx = Context(model, ContextParams(n_ctx=512, n_batch=512, n_threads=2))
    batch = Batch(512)
    prompt = model.tokenize("def fibonacci(n):\n    ")
    fd = os.open(target, os.O_RDONLY)

    def churn():
        for l in streamed:
            a, b = -(-l.start // PAGE) * PAGE, l.end // PAGE * PAGE
            libc.madvise(addr + a - map_off, b - a, mmap.MADV_DONTNEED)
            os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_DONTNEED)
        for l in streamed:
            a, b = l.start // PAGE * PAGE, -(-l.end // PAGE) * PAGE
            check(libc.madvise(addr + a - map_off, b - a, MADV_POPULATE_READ) == 0, "populate")

    results, ref = {}, None
    for rnd in range(2):
        for state in ("cache", "churn"):
            if state == "churn":
                # the pager's eviction and reads between passes: time the passes only
                t, logits = 0.0, None
                ctx.prefill(batch, prompt)
                ts = []
                for i in range(n):
                    churn()
                    batch.clear()
                    batch.add(prompt[-1], len(prompt) + i, (0,), True)
                    t0 = time.perf_counter()
                    ctx.decode(batch)
                    ts.append(time.perf_counter() - t0)
                t, logits = float(np.median(ts)), ctx.logits(0).copy()
            else:
                t, logits = time_passes(ctx, batch, prompt, n)
            results.setdefault(state, []).append(t)
            ref = logits if ref is None else ref
            print(f"{state:<10} {t * 1e3:7.1f} ms per 1-token pass, logits equal: {np.array_equal(logits, ref)}",
                  flush=True)
    for state, huge in (("owned", False), ("owned-thp", True)):
        own(addr + lo - map_off, hi - lo, huge)
        for rnd in range(2):
            t, logits = time_passes(ctx, batch, prompt, n)
            results.setdefault(state, []).append(t)
            print(f"{state:<10} {t * 1e3:7.1f} ms per 1-token pass, logits equal: {np.array_equal(logits, ref)}",
                  flush=True)
    with open("/proc/self/smaps_rollup") as f:
        thp = next((line.split()[1] for line in f if line.startswith("AnonHugePages")), "?")
    print(f"AnonHugePages {thp} kB")
    base = min(results["cache"])
    for state, ts in results.items():
        print(f"{state:<10} best {min(ts) * 1e3:7.1f} ms = {min(ts) / base:.2f}x the page cache's")
    os.close(fd)
    ctx.close()
    batch.close()
    model.close()


if __name__ == "__main__":
    main()
