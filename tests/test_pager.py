"""The pager on the tiny pair (16-layer target on a real disk): exactness, residency, eviction,
budget errors, file changes, throttle."""
import mmap
import os
import shutil

import pytest

from edgecad import Engine, native
from edgecad.cgroup import drop_file_cache
from edgecad.errors import EdgecadError, ModelFileError
from edgecad.gguf_file import read_gguf
from edgecad.measure import paging_plan, read_bandwidth
from edgecad.plan import PagerParams

from helpers import PROMPTS as ALL_PROMPTS, budget_for, sigint_after

PAGE = mmap.PAGESIZE
PROMPTS = ALL_PROMPTS[:3]
SMALL = dict(embd_allowance=64 << 10)  # the tiny embeddings are 68 KB


@pytest.fixture(scope="module")
def reference(paging_pair):
    draft, target = paging_pair
    with Engine(target, n_ctx=512) as e:
        return {p: e.create_completion(p, temperature=0.0, max_tokens=40)["edgecad"]["token_ids"] for p in PROMPTS}


@pytest.mark.parametrize("memory", ["owned", "cache"])
@pytest.mark.parametrize("io", ["prefetch", "demand"])
@pytest.mark.parametrize("mode", ["target", "tree"])
def test_paging_never_changes_the_tokens_and_holds_the_budget(paging_pair, reference, io, mode, memory):
    draft, target = paging_pair
    p = PagerParams(io=io, memory=memory, **SMALL)
    budget = budget_for(target, p)
    with Engine(target, draft if mode == "tree" else None, mode=mode, n_ctx=512, target_budget=budget, pager=p) as e:
        plan = e.budget_plan
        for prompt in PROMPTS:
            st = e.create_completion(prompt, temperature=0.0, max_tokens=40)["edgecad"]
            assert st["token_ids"] == reference[prompt]
            assert st["target_budget_bytes"] == budget
            peak = st["peak_resident_target_bytes"]
            assert plan.pinned_bytes * 0.9 < peak <= budget + PAGE * len(plan.streamed_layers)
            assert st["bytes_read"] >= plan.streamed_bytes  # every pass reads the streamed layers
            assert st["io_wait_seconds"] > 0 and st["target_compute_seconds"] > 0
        # streamed layers are really evicted: the page cache holds at most the window of them; owned, none of
        # them but the page of a layer's first norm, read through the mapping when its layer's read is not done
        info = read_gguf(target)
        held = sum(native.file_resident(target, l.start, l.n_bytes) for l in info.layers()
                   if l.index in plan.streamed_layers)
        assert held <= (plan.window_bytes if memory == "cache" else 2 * PAGE * len(plan.streamed_layers))
        assert held < plan.streamed_bytes / 2
        assert (e.pager.stats()["owned_bytes"] > 0) == (memory == "owned")
        assert e.pager.stats()["owned_weights"] == (e.pager.n_weights if memory == "owned" else 0)


@pytest.mark.parametrize("mode", ["target", "tree"])
def test_the_owned_residency_pages_where_the_platform_cannot_tell_the_mapping(paging_pair, reference, mode,
                                                                              monkeypatch):
    """As on macOS (no /proc/self/maps): the pager is given no mapping; it learns which tensors are the file's from
    their ggml buffer, and gives the same tokens inside the same budget."""
    import edgecad.residency
    monkeypatch.setattr(edgecad.residency, "finds_mappings", lambda: False)
    draft, target = paging_pair
    p = PagerParams(**SMALL)
    budget = budget_for(target, p)
    with Engine(target, draft if mode == "tree" else None, mode=mode, n_ctx=512, target_budget=budget, pager=p) as e:
        for prompt in PROMPTS:
            st = e.create_completion(prompt, temperature=0.0, max_tokens=40)["edgecad"]
            assert st["token_ids"] == reference[prompt]
            assert e.budget_plan.pinned_bytes * 0.9 < st["peak_resident_target_bytes"] <= budget
            assert st["bytes_read"] >= e.budget_plan.streamed_bytes
        # every weight the pager holds was found in the graph and pointed at its memory (else it would have been
        # read through llama.cpp's mapping, giving the same tokens)
        assert e.pager.stats()["owned_weights"] == e.pager.n_weights > 0


def test_budget_above_the_model_keeps_it_resident(paging_pair, reference, capsys):
    _, target = paging_pair
    with Engine(target, n_ctx=512, target_budget="200%", verbose=True) as e:
        assert e.budget_plan is None and e.pager is None and e.memory_plan.config == "target"
        st = e.create_completion(PROMPTS[0], temperature=0.0, max_tokens=40)["edgecad"]
    assert "configuration target " in capsys.readouterr().err
    assert st["token_ids"] == reference[PROMPTS[0]] and st["peak_resident_target_bytes"] is None


def test_too_small_budget(paging_pair):
    _, target = paging_pair
    with pytest.raises(EdgecadError, match=r"target budget 0.1 MB is below the minimum of [\d.]+ MB"):
        Engine(target, target_budget=100_000)


@pytest.mark.parametrize("memory", ["owned", "cache"])
@pytest.mark.parametrize("change", ["grow", "truncate"])
def test_a_changed_file_is_an_error_not_a_crash(paging_pair, disk_dir, change, memory):
    _, target = paging_pair
    path = disk_dir / f"changing-{change}.gguf"
    shutil.copy(target, path)
    p = PagerParams(memory=memory, **SMALL)
    e = Engine(path, n_ctx=512, target_budget=budget_for(path, p), pager=p)
    e.create_completion("abc", temperature=0.0, max_tokens=4)
    if change == "grow":
        with open(path, "ab") as f:
            f.write(b"\0" * 4096)
    else:
        os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(ModelFileError, match="changed"):
        e.create_completion("abc", temperature=0.0, max_tokens=4)
    e.close()


def test_throttle_limits_the_read_rate(paging_pair):
    _, target = paging_pair
    rate = 40e6
    p = PagerParams(io="demand", throttle_bps=rate, **SMALL)
    with Engine(target, n_ctx=512, target_budget=budget_for(target, p), pager=p) as e:
        st = e.create_completion("abc", temperature=0.0, max_tokens=6)["edgecad"]
    # The throttle spaces the starts of consecutive reads by their size / rate, so the completion
    # lasts at least (bytes read - the last read) / rate. A lower bound: a slow machine only adds time.
    layer = max(read_gguf(target).layers(), key=lambda l: l.n_bytes).n_bytes
    assert st["bytes_read"] > 2 * layer
    assert st["prompt_seconds"] + st["seconds"] >= (st["bytes_read"] - layer) / rate


def test_read_bandwidth(paging_pair):
    _, target = paging_pair
    assert read_bandwidth(target) > 0


def test_the_pipeline_drafts_during_passes_and_keeps_chains(paging_pair, reference):
    """While the target waits on (throttled) storage the draft drafts chains during its passes, and
    later trees start from them: outputs stay the target's and both KV caches stay clean."""
    draft, target = paging_pair
    p = PagerParams(io="demand", throttle_bps=50e6, **SMALL)
    budget = budget_for(target, p)
    totals = {}
    for pipeline in (True, False):
        with Engine(target, draft, mode="tree", n_ctx=512, target_budget=budget, pager=p, pipeline=pipeline) as e:
            assert e.pipeline == pipeline
            e.check_kv = True  # after every step: only sequence 0 left, holding what each side should
            sts = [e.create_completion(prompt, temperature=0.0, max_tokens=40)["edgecad"] for prompt in PROMPTS]
        assert [st["token_ids"] for st in sts] == [reference[prompt] for prompt in PROMPTS]
        totals[pipeline] = {k: sum(st[k] for st in sts) for k in ("draft_layers_in_pass", "chain_tokens", "reused_tokens")}
    on, off = totals[True], totals[False]
    assert on["draft_layers_in_pass"] > 0 and on["chain_tokens"] > 0  # drafting happened during target passes
    assert on["reused_tokens"] > 0  # and trees started from what was drafted then
    assert off == {"draft_layers_in_pass": 0, "chain_tokens": 0, "reused_tokens": 0}


def test_the_pipeline_is_off_for_a_resident_target(paging_pair):
    draft, target = paging_pair
    with Engine(target, draft, mode="tree", n_ctx=256, memory_budget=None, pipeline=True) as e:
        assert not e.pipeline  # nothing to wait for: drafting beside the target would only slow it
        st = e.create_completion("hello", temperature=0.0, max_tokens=8)["edgecad"]
        assert st["chain_tokens"] == 0 and st["draft_layers_in_pass"] == 0


def test_the_pipeline_runs_to_the_end_of_a_small_context(paging_pair):
    """Chains and kept chains never take more draft KV cells than the context has left."""
    draft, target = paging_pair
    p = PagerParams(io="demand", throttle_bps=50e6, **SMALL)
    with Engine(target, draft, mode="tree", n_ctx=64, target_budget=budget_for(target, p), pager=p,
                pipeline=True) as e:
        e.check_kv = True
        for prompt in PROMPTS:
            st = e.create_completion(prompt, temperature=0.0, max_tokens=0)["edgecad"]  # until the context is full
            assert st["prompt_tokens"] + st["n_tokens"] >= 63


def _load_model(target, lazy: bool):
    """Load `target` as the engine loads a paged target, under lazy_load or not."""
    from edgecad.llama import Model, ModelParams
    from edgecad.pager import lazy_load
    with lazy_load(target, enabled=lazy) as how:
        model = Model(target, ModelParams(use_mmap=True, use_extra_bufts=False))
    return model, how


def test_a_lazy_load_maps_the_model_without_reading_it(paging_pair, disk_dir):
    """By mincore on the file, right after llama.cpp's load returns: lazy, the header and what the kernel
    reads ahead of it; not lazy (the control), the whole file."""
    target = disk_dir / "lazy-target.gguf"  # a file of its own: no other test's mapping or read in flight
    shutil.copy(paging_pair[1], target)
    with open(target, "rb+") as f:
        os.fsync(f.fileno())  # written back, so that dropping it from the page cache can succeed
    info = read_gguf(target)
    slack = 1 << 20  # the kernel's read-ahead past the header llama.cpp parses with fread
    drop_file_cache([target])
    model, how = _load_model(target, lazy=True)
    assert how.applied, how.reason
    assert how.populate_dropped == 1 and how.willneed_dropped > info.file_size - info.data_offset
    assert native.file_resident(target) <= info.data_offset + slack
    model.close()
    drop_file_cache([target])
    model, how = _load_model(target, lazy=False)  # the slots are restored: llama.cpp reads it all again
    assert not how.applied and native.file_resident(target) >= info.file_size - PAGE
    model.close()


@pytest.mark.parametrize("mode", ["target", "tree"])
def test_a_paged_load_reads_only_what_the_plan_keeps(paging_pair, reference, mode, monkeypatch):
    draft, target = paging_pair
    info = read_gguf(target)
    p = PagerParams(**SMALL)
    budget = budget_for(target, p)
    slack = 1 << 20
    read = {}
    for guard in ("0", "1"):
        monkeypatch.setenv("EDGECAD_LOAD_GUARD", guard)
        drop_file_cache([target, draft])
        with Engine(target, draft if mode == "tree" else None, mode=mode, n_ctx=512, target_budget=budget,
                    pager=p) as e:
            plan = e.budget_plan
            kept = info.data_offset + plan.pinned_bytes + plan.window_bytes
            assert e.lazy_load.applied == (guard == "1")
            assert native.file_resident(target) <= kept + slack  # the budget holds from the start
            read[guard] = e.load_bytes_read
            st = e.create_completion(PROMPTS[0], temperature=0.0, max_tokens=40)["edgecad"]
            assert st["token_ids"] == reference[PROMPTS[0]]
            assert st["peak_resident_target_bytes"] <= budget + PAGE * len(plan.streamed_layers)
    if read["1"] is None:
        pytest.skip("this kernel does not count the bytes a process reads (/proc/self/io)")
    draft_bytes = os.path.getsize(draft) if mode == "tree" else 0
    assert read["0"] >= info.file_size + draft_bytes - slack  # llama.cpp reads the whole target
    assert read["1"] <= kept + draft_bytes + slack  # lazily: what the plan keeps


def test_the_end_of_a_prompt_is_decoded_in_the_first_tree_s_pass(paging_pair, reference):
    """A paged target streams its weights once per pass: a prompt takes as few passes as carry it, its last tokens
    beside the first tree (shrunk to the room left when a whole tree would not fit) instead of a pass of their
    own. A prompt longer than a batch takes its earlier chunks first; the output is the target's either way, with
    both KV caches clean."""
    draft, target = paging_pair
    p = PagerParams(**SMALL)
    with Engine(target, draft, mode="tree", n_ctx=1024, target_budget=budget_for(target, p), pager=p) as e:
        e.check_kv = True
        cap, nodes = e._batch.capacity, e.tree_params.max_nodes
        a, b = e.tokenize("hello", add_bos=False)[0], e.tokenize("world", add_bos=False)[0]
        fits = [a] * (cap - nodes // 2)  # a batch, but not beside a whole tree
        longer = [b] * (cap + nodes)     # more than a batch (and nothing in common with `fits`)
        done = {}
        for prompt in (PROMPTS[0], PROMPTS[0], fits, longer):
            before = e.pager.stats()["passes"]
            st = done[str(prompt)] = e.create_completion(prompt, temperature=0.0, max_tokens=40)["edgecad"]
            fresh = st["prompt_tokens"] - st["prompt_tokens_reused"]  # its head's new tokens and the root
            assert e.pager.stats()["passes"] - before == st["target_passes"] + (fresh - 1) // cap, (prompt, st)
            if isinstance(prompt, str):
                assert st["token_ids"] == reference[prompt]
        f, g = done[str(fits)], done[str(longer)]
        assert cap - nodes - 1 < f["prompt_tokens"] - f["prompt_tokens_reused"] - 1 < cap  # the tree shrank
        assert g["prompt_tokens_reused"] == 0 and (g["prompt_tokens"] - 1) // cap >= 1  # a pass before the tree's
    with Engine(target, n_ctx=1024) as ref:
        for prompt in (fits, longer):
            ids = ref.create_completion(prompt, temperature=0.0, max_tokens=40)["edgecad"]["token_ids"]
            assert done[str(prompt)]["token_ids"] == ids, prompt[:4]


@pytest.mark.parametrize("memory", ["owned", "cache"])
def test_an_io_error_surfaces_and_the_next_completion_works(paging_pair, reference, memory):
    from edgecad.errors import NativeError
    draft, target = paging_pair
    p = PagerParams(memory=memory, **SMALL)
    with Engine(target, draft, mode="tree", n_ctx=512, target_budget=budget_for(target, p), pager=p) as e:
        e.check_kv = True
        for _ in range(2):
            e.pager.inject_fault()
            with pytest.raises(NativeError, match="injected fault"):
                e.create_completion(PROMPTS[1], temperature=0.0, max_tokens=40)
            st = e.create_completion(PROMPTS[1], temperature=0.0, max_tokens=40)["edgecad"]
            assert st["token_ids"] == reference[PROMPTS[1]]
            assert st["peak_resident_target_bytes"] <= e.budget_plan.budget + PAGE * len(e.budget_plan.streamed_layers)


def test_ctrl_c_stops_a_pass_that_waits_on_storage(paging_pair, reference):
    """A SIGINT while a paged pass waits for its layers (storage throttled to 5 MB/s: a pass takes ~0.7 s)
    stops the pass there, not at its end: fewer layer boundaries than a whole pass; the engine goes on."""
    _, target = paging_pair
    p = PagerParams(io="demand", throttle_bps=5e6, **SMALL)
    with Engine(target, n_ctx=512, target_budget=budget_for(target, p), pager=p) as e:
        n_layers = read_gguf(target).n_layer
        before = e.pager.stats()["boundaries"]
        with pytest.raises(KeyboardInterrupt), sigint_after(0.2):
            e.create_completion(PROMPTS[2], temperature=0.0, max_tokens=40)
        assert e.pager.stats()["boundaries"] - before < n_layers  # the prompt's pass did not run to its end
        st = e.create_completion(PROMPTS[2], temperature=0.0, max_tokens=4)["edgecad"]
        assert st["token_ids"] == reference[PROMPTS[2]][:4]


def test_a_load_under_a_storage_profile_takes_that_storage_s_time(paging_pair, monkeypatch):
    """What a load reads from storage (here llama.cpp's whole-file read, the lazy load off) is charged at the
    profile's rate: a lower bound, which a slow machine only exceeds."""
    _, target = paging_pair
    rate = 20e6
    monkeypatch.setenv("EDGECAD_LOAD_GUARD", "0")
    drop_file_cache([target])
    p = PagerParams(throttle_bps=rate, **SMALL)
    with Engine(target, mode="target", n_ctx=256, target_budget=budget_for(target, p), pager=p) as e:
        if e.load_bytes_read is None:
            pytest.skip("this kernel does not count the bytes a process reads (/proc/self/io)")
        size = read_gguf(target).file_size  # (a few pages may stay cached: another test's engine maps them)
        assert e.load_bytes_read >= 0.9 * size
        assert e.load_seconds >= 0.9 * size / rate


def test_a_pass_whose_end_a_ctrl_c_skipped_does_not_hold_the_pipeline_s_draft(paging_pair, reference):
    """A Ctrl-C landing between a paged decode and its end left the pager "in a pass"; the pipeline's draft
    then waited at the gate forever on the next completion (before: this test hung until its timeout).
    begin_pass() without an end stands for that skipped end."""
    draft, target = paging_pair
    p = PagerParams(io="demand", throttle_bps=50e6, **SMALL)
    with Engine(target, draft, mode="tree", n_ctx=512, target_budget=budget_for(target, p), pager=p,
                pipeline=True) as e:
        e.check_kv = True
        e.create_completion(PROMPTS[0], temperature=0.0, max_tokens=4)  # the prompt is cached: no target decode
        e.pager.begin_pass()                                              # comes before the draft's
        st = e.create_completion(PROMPTS[0], temperature=0.0, max_tokens=40)["edgecad"]
        assert st["token_ids"] == reference[PROMPTS[0]]


def test_a_ctrl_c_while_the_pipeline_waits_for_its_chain_returns_only_once_the_chain_is_done(paging_pair):
    """Settling the pipeline (the end of every verify, and before the draft is used again) waits until the chain's
    thread is done with the draft's context, a Ctrl-C inside the wait or not. Before, it waited in Thread.join,
    which an interrupt can end with the thread still running (CPython 3.11 marks it stopped), and the next decode
    in the draft's context crashed llama.cpp (CI, twice, in the Ctrl-C test of test_engine). The thread here stands
    for a chain inside a draft decode: it finishes 0.4 s later whatever it is told."""
    import threading
    import time
    draft, target = paging_pair
    p = PagerParams(**SMALL)
    with Engine(target, draft, mode="tree", n_ctx=512, target_budget=budget_for(target, p), pager=p,
                pipeline=True) as e:
        pl, ended = e._decoder.pipeline, threading.Event()
        pl._done, pl._finished = threading.Event(), threading.Event()

        def chain():
            time.sleep(0.4)
            ended.set()
            pl._finished.set()

        pl._thread = threading.Thread(target=chain)
        pl._thread.start()
        with pytest.raises(KeyboardInterrupt), sigint_after(0.1):
            pl.settle()
        assert ended.is_set() and pl._thread is None  # (not before the chain was done)
        assert e.create_completion(PROMPTS[0], temperature=0.0, max_tokens=8)["edgecad"]["n_tokens"] == 8


def test_freeing_the_model_closes_its_pager_first(paging_pair):
    """The IO thread advises addresses of llama.cpp's mapping: whatever order a garbage collector finalizes
    them in, the model closes its pager before the mapping goes (before: the pager outlived it)."""
    from edgecad.pager import Pager, file_mappings, new_mapping
    _, target = paging_pair
    p = PagerParams(**SMALL)
    info = read_gguf(target)
    before = file_mappings(target)
    model, _ = _load_model(target, lazy=True)
    pager = Pager(model, info, paging_plan(info, budget_for(target, p), p), new_mapping(target, before))
    assert pager.handle
    model.close()
    assert not pager.handle


@pytest.mark.parametrize("mode", ["target", "tree"])
def test_ctrl_c_while_the_storage_stalls_stops_the_pass_and_the_engine_goes_on(paging_pair, reference, mode):
    """Storage stalls (1 byte/s) mid-completion: a real SIGINT stops the pass that waits for it and the read
    the IO thread is stuck in; the next completion settles again (before: its settle waited for the stuck
    read, for days) and gives the target's tokens, both caches holding only the accepted path."""
    draft, target = paging_pair
    p = PagerParams(**SMALL)
    with Engine(target, draft if mode == "tree" else None, mode=mode, n_ctx=512,
                target_budget=budget_for(target, p), pager=p) as e:
        e.check_kv = True
        assert e.create_completion(PROMPTS[1], temperature=0.0, max_tokens=40)["edgecad"]["token_ids"] == \
            reference[PROMPTS[1]]
        e.pager.set_throttle(1.0)
        with pytest.raises(KeyboardInterrupt), sigint_after(0.5):
            e.create_completion(PROMPTS[2], temperature=0.0, max_tokens=40)
        e.pager.set_throttle(0.0)
        st = e.create_completion(PROMPTS[2], temperature=0.0, max_tokens=40)["edgecad"]
        assert st["token_ids"] == reference[PROMPTS[2]]
    # (the engine closed without waiting for a read: see test_native.py for close during a stalled read)


TRUNCATE_CHILD = """
import os, sys, threading
from edgecad import Engine
from edgecad.errors import ModelFileError
from edgecad.plan import PagerParams
path, budget, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
p = PagerParams(io="demand", throttle_bps=2e6, embd_allowance=64 << 10)  # a pass reads ~3 MB: ~1.5 s
e = Engine(path, sys.argv[4] if mode == "tree" else None, mode=mode, n_ctx=512, target_budget=budget, pager=p)
e.create_completion("abc", temperature=0.0, max_tokens=2)
size = os.path.getsize(path)
threading.Timer(0.5, os.truncate, (path, size - 4096)).start()  # the output matrix's last page: read last
try:
    e.create_completion("Once upon a time", temperature=0.0, max_tokens=200)
    print("no error")
except ModelFileError as x:
    print("error:", x)
"""


@pytest.mark.parametrize("mode", ["target", "tree"])
def test_a_file_truncated_while_a_pass_streams_it_stops_that_pass(paging_pair, disk_dir, mode):
    """The completion's own check passed before the file changed; the IO thread's check (fstat before every
    read) finds the change mid-pass and aborts the graph before it touches a page past the new end (SIGBUS).
    In a child process: a SIGBUS there fails this test instead of killing the suite."""
    import subprocess
    import sys
    draft, target = paging_pair
    path = disk_dir / f"truncated-mid-pass-{mode}.gguf"
    shutil.copy(target, path)
    budget = budget_for(path, PagerParams(**SMALL))
    r = subprocess.run([sys.executable, "-c", TRUNCATE_CHILD, str(path), str(budget), mode, str(draft)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "changed size while the engine was paging it" in r.stdout, r.stdout + r.stderr[-2000:]


# ---------------------------------------------------------------------------- mincore's blind spot

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a file and read it as another user")
def test_mincore_cannot_see_another_user_s_file_and_the_pager_says_so(paging_pair):
    """Linux >= 5.2 shows a file's page-cache residency only to its owner or a process that may write it; to
    anyone else every page reads resident. Shown as the user nobody on a root-owned 0644 copy of the model, right
    after a cache drop; mincore_sees says so, and a paged engine run as nobody reports no residency figure.""" 
    import json
    import subprocess
    import sys
    import tempfile
    d = tempfile.mkdtemp(dir="/var/tmp")  # (pytest's own directories are private to root)
    try:
        os.chmod(d, 0o755)
        path = os.path.join(d, "model.gguf")
        shutil.copy(paging_pair[1], path)
        os.chmod(path, 0o644)
        with open(path, "rb") as f:
            os.fsync(f.fileno())  # (dirty pages cannot be dropped)
        child = f"""
import json, os
from edgecad import Engine, native
from edgecad.cgroup import drop_file_cache
from edgecad.pager import mincore_sees
from edgecad.plan import PagerParams
path = {path!r}
drop_file_cache([path])
out = {{"root": [mincore_sees(path), native.file_resident(path)]}}
with Engine(path, n_ctx=128, target_budget="60%", memory_budget=None) as e:  # as root (and every import done:
    st = e.create_completion("hello", max_tokens=4, temperature=0)["edgecad"]  # the stdlib is root's)
out["root"].append(st["peak_resident_target_bytes"])
for f in os.listdir(os.environ["EDGECAD_CACHE"]):
    os.chmod(os.path.join(os.environ["EDGECAD_CACHE"], f), 0o666)
os.setgid(65534); os.setuid(65534)
drop_file_cache([path])
out["nobody"] = [mincore_sees(path), native.file_resident(path), os.path.getsize(path)]
with Engine(path, n_ctx=128, target_budget="60%", memory_budget=None, pager=PagerParams(memory="cache")) as e:
    st = e.create_completion("hello", max_tokens=4, temperature=0)["edgecad"]  # as nobody: the page cache's figures
out["stats"] = [st["config"], st["peak_resident_target_bytes"], st["bytes_read"]]
with Engine(path, n_ctx=128, target_budget="60%", memory_budget=None) as e:  # the owned residency's: its own count
    st = e.create_completion("hello", max_tokens=4, temperature=0)["edgecad"]
out["owned"] = [st["peak_resident_target_bytes"], st["target_budget_bytes"]]
print(json.dumps(out))
"""
        cache = os.path.join(d, "cache")
        os.mkdir(cache, 0o777)
        os.chmod(cache, 0o777)
        r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, cwd="/",
                           env={**os.environ, "EDGECAD_CACHE": cache})
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["root"][0] is True and out["root"][1] < 64 * 1024  # the owner sees the drop
        assert out["root"][2] > 0  # and a paged engine's peak
        sees, resident, size = out["nobody"]
        assert sees is False
        assert resident >= size - PAGE, out  # the kernel's answer to anyone else: all of it (the fault)
        config, peak, read = out["stats"]
        assert config == "target-paged" and read > 0 and peak is None  # paged, and no false figure
        peak, budget = out["owned"]  # owned slots are counted, not seen: a figure, and inside the budget
        assert peak is not None and 0 < peak <= budget, out
    finally:
        shutil.rmtree(d, ignore_errors=True)
