"""Weight repacking: one llama_decode of B tokens, resident target, repacked (llama.cpp's default) vs plain mapped.

    python scripts/eval_repack.py models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
"""
import statistics, time, sys
from edgecad.llama import Model, ModelParams, Context, ContextParams, Batch
path = sys.argv[1]
res = {}
for rep in (True, False):
    m = Model(path, ModelParams(use_mmap=True, use_extra_bufts=rep))
    c = Context(m, ContextParams(n_ctx=512, n_batch=512, n_seq_max=1, n_threads=2))
    b = Batch(512, 1)
    c.prefill(b, list(range(100, 164)))
    for B in (1, 4, 17, 33):
        ts = []
        for _ in range(5):
            b.clear()
            for j in range(B):
                b.add(200 + j, 64 + j, (0,), True)
            t = time.perf_counter(); c.decode(b); ts.append(time.perf_counter() - t)
            c.seq_rm(0, 64, -1)
        res[(rep, B)] = statistics.median(ts[1:])
    c.close(); b.close(); m.close()
for B in (1, 4, 17, 33):
    print(f"B={B:>2}: repacked {res[(True,B)]*1e3:6.1f} ms, mapped {res[(False,B)]*1e3:6.1f} ms, gain {res[(False,B)]/res[(True,B)]:.2f}x")
