"""Why a paged pass computes slower than a resident one: target-only 1-token passes, 2 vs 1 compute threads
(with 1, the IO thread has a core of its own), files dropped from the page cache before each run.

    python scripts/eval_paged_compute.py [TARGET] [SHARE|none] [prefetch|demand]
    python scripts/eval_paged_compute.py qwen2.5-coder-1.5b-f16 45%          # paged, reads overlap compute
    python scripts/eval_paged_compute.py qwen2.5-coder-1.5b-f16 45% demand   # paged, no read overlaps compute
    python scripts/eval_paged_compute.py qwen2.5-coder-1.5b-f16 none         # resident
"""
import sys

from edgecad import Engine, cgroup, registry
from edgecad.plan import PagerParams
from edgecad.prompts import load_prompts

target = registry.resolve(sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-1.5b-f16")
share = sys.argv[2] if len(sys.argv) > 2 else "45%"
io = sys.argv[3] if len(sys.argv) > 3 else "prefetch"
prompt = load_prompts(None)[0]["prompt"]
for threads in (2, 1, 2, 1):  # interleaved: the machine's speed drifts between runs
    cgroup.drop_file_cache([target])
    budget = {} if share == "none" else {"target_budget": share}
    with Engine(target, None, mode="target", n_ctx=2048, n_threads=threads,
                pager=PagerParams(measure=False, io=io), **budget) as e:
        s = e.create_completion(prompt, max_tokens=10, temperature=0)["edgecad"]
    passes = s["target_passes"] - s["prompt_passes"]
    per = lambda k: s[k] / passes  # noqa: E731
    print(f"threads {threads}: pass {per('seconds'):.3f} s, compute {per('target_compute_seconds'):.3f} s, "
          f"IO wait {per('io_wait_seconds'):.3f} s, {per('bytes_read') / 1e6:.0f} MB streamed per pass", flush=True)
