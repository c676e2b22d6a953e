"""Engine: target-only decoding against llama-cpp-python's Llama, sampling, stops, streaming, bad input."""
import itertools
import mmap
import os

import pytest
from llama_cpp import Llama

import edgecad
from edgecad import Engine
from edgecad.errors import (EdgecadError, ModelFileError, ModelNotFetchedError, PromptTooLongError, RequestError,
                            UnknownModelError, VocabularyMismatchError)

from helpers import PROMPTS, sigint_after


@pytest.fixture(scope="module")
def engine(tiny_target):
    with Engine(tiny_target, n_ctx=512, n_threads=2, seed=0) as e:
        yield e


@pytest.fixture(scope="module")
def reference(tiny_target):
    return Llama(str(tiny_target), n_ctx=512, n_threads=2, verbose=False)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_llama_cpp_python(engine, reference, prompt):
    ours = engine.create_completion(prompt, temperature=0.0, max_tokens=40)
    reference.reset()
    toks = reference.tokenize(prompt.encode(), add_bos=False, special=True)
    assert toks == engine.tokenize(prompt, special=True)
    theirs = list(itertools.islice(reference.generate(toks, temp=0.0), 40))
    assert ours["edgecad"]["token_ids"] == theirs
    assert ours["usage"] == {"prompt_tokens": len(toks), "completion_tokens": 40, "total_tokens": len(toks) + 40}
    assert ours["choices"][0]["finish_reason"] == "length"
    assert ours["choices"][0]["text"] == engine.detokenize(theirs).decode("utf-8", errors="ignore")


def test_sampling_is_reproducible_by_seed(engine):
    run = lambda seed: engine.create_completion("Once", max_tokens=30, temperature=1.0, top_k=0, top_p=1.0,
                                                seed=seed)["edgecad"]["token_ids"]
    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c
    greedy = engine.create_completion("Once", max_tokens=30, temperature=0.0)["edgecad"]["token_ids"]
    assert a != greedy  # temperature 1 over 265 tokens does not follow the argmax for 30 tokens


def test_stop_string_cuts_text(engine):
    full = engine.create_completion("hello the world", temperature=0.0, max_tokens=40)["choices"][0]["text"]
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full.find(full[i:i + 2]) == i)
    out = engine.create_completion("hello the world", temperature=0.0, max_tokens=40, stop=[stop, "\x00never"])
    assert out["choices"][0]["text"] == full[:full.find(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 40


def test_stream_chunks_join_to_the_completion(engine):
    full = engine.create_completion("in an inner", temperature=0.0, max_tokens=30)
    chunks = list(engine.create_completion("in an inner", temperature=0.0, max_tokens=30, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["edgecad"]["token_ids"] == full["edgecad"]["token_ids"]


def test_stats(engine):
    st = engine.create_completion("abc", temperature=0.0, max_tokens=12)["edgecad"]
    assert st["mode"] == "target" and st["n_tokens"] == 12 and len(st["token_ids"]) == 12
    assert st["target_passes"] == 12  # one per token: the prompt's pass gives the first
    assert st["mean_accepted_per_pass"] == 1.0 and st["draft_tokens"] == 0 and st["lossless"] is True
    assert 0 < st["seconds_target"] <= st["seconds"]
    assert st["seconds"] > 0 and st["tokens_per_second"] > 0


def test_generation_stops_at_the_end_of_the_context(tiny_target):
    with Engine(tiny_target, n_ctx=256) as e:
        prompt = "x" * 200
        n_prompt = len(e.tokenize(prompt, special=True))
        out = e.create_completion(prompt, temperature=0.0, max_tokens=500)
        assert out["choices"][0]["finish_reason"] == "length"
        assert n_prompt + out["usage"]["completion_tokens"] <= e.n_ctx + 1


def test_prompt_too_long(tiny_target):
    with Engine(tiny_target, n_ctx=256) as e:
        with pytest.raises(PromptTooLongError, match=r"prompt has \d+ tokens but the context holds 256"):
            e.create_completion("y" * 400, temperature=0.0)


def test_empty_prompt(engine):
    with pytest.raises(EdgecadError, match="empty"):
        engine.create_completion("", temperature=0.0)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        Engine(tmp_path / "absent.gguf")


def test_not_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("this is not a model")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        Engine(p)


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_gguf(tmp_path, tiny_target, keep):
    data = tiny_target.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: int(len(data) * keep)] if keep > 0.5 else data[:2000])
    with pytest.raises(ModelFileError, match="truncated"):
        Engine(p)


def test_unknown_registry_name():
    with pytest.raises(UnknownModelError, match="qwen2.5-coder-1.5b"):
        Engine("no-such-model")


def test_registry_model_not_fetched(empty_models_dir):
    with pytest.raises(ModelNotFetchedError, match="edgecad models fetch qwen2.5-coder-1.5b"):
        Engine("qwen2.5-coder-1.5b")


def test_draft_with_another_vocabulary(tiny_target, other_vocab_model):
    with pytest.raises(VocabularyMismatchError, match="vocabulary"):
        Engine(tiny_target, other_vocab_model, mode="target")


def test_errors_are_edgecad_errors():
    for cls in (ModelFileError, UnknownModelError, PromptTooLongError, VocabularyMismatchError):
        assert issubclass(cls, edgecad.EdgecadError)


def llama_program(llm) -> dict:
    """A program written against llama-cpp-python's `Llama`: completion, streaming, chat, tokens."""
    out = {"call": llm("Once upon a time", max_tokens=12, temperature=0.0)["choices"][0]["text"]}
    out["stream"] = "".join(c["choices"][0]["text"] for c in llm.create_completion(
        "hello the world", max_tokens=12, temperature=0.0, stream=True))
    out["stop"] = llm.create_completion("hello the world", max_tokens=12, temperature=0.0, stop=["e"])
    out["stop"] = (out["stop"]["choices"][0]["text"], out["stop"]["choices"][0]["finish_reason"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    r = llm.create_chat_completion(messages=messages, max_tokens=10, temperature=0.0)
    out["chat"] = (r["object"], r["choices"][0]["message"]["role"], r["choices"][0]["message"]["content"],
                   r["choices"][0]["finish_reason"], r["usage"]["completion_tokens"])
    chunks = list(llm.create_chat_completion(messages=messages, max_tokens=10, temperature=0.0, stream=True))
    out["chat_stream"] = ([c["object"] for c in chunks][:1], chunks[0]["choices"][0]["delta"],
                          "".join(c["choices"][0]["delta"].get("content", "") for c in chunks),
                          chunks[-1]["choices"][0]["finish_reason"])
    toks = llm.tokenize(b"hello the world")
    out["tokens"] = (toks, llm.detokenize(toks))
    return out


def test_a_llama_cpp_python_program_runs_unchanged(tiny_target):
    ref = llama_program(Llama(str(tiny_target), n_ctx=256, n_threads=2, verbose=False))
    with Engine(tiny_target, mode="target", n_ctx=256, n_threads=2, memory_budget=None) as e:
        ours = llama_program(e)
    # llama-cpp-python generates one token past max_tokens when the text so far ends in bytes that are
    # not valid UTF-8 (the tiny models emit random bytes): its text may then be ours plus that token
    for k in ("stream", "stop"):
        a, b = (ours[k][0], ref[k][0]) if k == "stop" else (ours[k], ref[k])
        assert b.startswith(a) and len(b.encode()) - len(a.encode()) <= 4, (k, a, b)
        ours[k] = ref[k]
    assert ours == ref
    assert ours["chat"][2] == ours["chat_stream"][2] and ours["chat_stream"][1] == {"role": "assistant"}


def test_unsupported_arguments_are_refused_by_name(engine):
    with pytest.raises(EdgecadError, match=r"mirostat_mode=2 is not supported by edgecad: leave mirostat_mode"):
        engine.create_completion("hi", mirostat_mode=2)
    with pytest.raises(RequestError, match=r"tools\[0\] is .*: give \{\"type\": \"function\"") as e:  # (tools are
        engine.create_chat_completion([{"role": "user", "content": "hi"}], tools=[{"type": "function"}])  # taken:
    assert e.value.param == "tools"  # a malformed one is refused naming them: tests/test_tools.py)
    with pytest.raises(EdgecadError, match=r"top_p=5 is out of range: use a value > 0 and <= 1"):
        engine.create_completion("hi", top_p=5)


@pytest.mark.parametrize("name, bad", [("temperature", -1), ("top_p", 0), ("min_p", 2), ("repeat_penalty", 0),
                                       ("frequency_penalty", 2e6), ("presence_penalty", -2e6), ("top_k", 1.5)])
def test_each_sampling_argument_out_of_range_is_refused_by_name(engine, name, bad):
    """Both public methods pass their sampling arguments to the one check (edgecad.arguments.SAMPLING)."""
    for create, first in ((engine.create_completion, "hi"),
                          (engine.create_chat_completion, [{"role": "user", "content": "hi"}])):
        with pytest.raises(RequestError, match=rf"^{name}={bad!r} is out of range: use ") as err:
            create(first, **{name: bad})
        assert err.value.param == name


@pytest.mark.parametrize("mode", ["target", "tree"])
def test_a_second_call_sharing_a_prefix_decodes_only_the_new_tokens(tiny_pair, mode):
    draft, target = tiny_pair
    first = "Once upon a time, in an inner"
    with Engine(target, draft if mode == "tree" else None, mode=mode, n_ctx=512, memory_budget=None) as e:
        a = e.create_completion(first, max_tokens=16, temperature=0.0)
        second = first + a["choices"][0]["text"] + " and then"
        b = e.create_completion(second, max_tokens=16, temperature=0.0)
        n_first = len(e.tokenize(first, special=True))
    with Engine(target, draft if mode == "tree" else None, mode=mode, n_ctx=512, memory_budget=None) as fresh:
        c = fresh.create_completion(second, max_tokens=16, temperature=0.0)
    assert a["edgecad"]["prompt_tokens_reused"] == 0 and c["edgecad"]["prompt_tokens_reused"] == 0
    assert b["edgecad"]["prompt_tokens_reused"] >= n_first  # the first prompt (and some answer) was kept
    assert b["edgecad"]["token_ids"] == c["edgecad"]["token_ids"]


def test_no_target_means_the_default_pair(empty_models_dir):
    with pytest.raises(ModelNotFetchedError, match="edgecad models fetch qwen2.5-coder"):
        Engine()


@pytest.mark.parametrize("mode", ["target", "tree"])
def test_repeat_penalty_matches_llama_cpp_python(tiny_pair, mode):
    """Greedy with a repeat penalty gives Llama's tokens; in a tree each node is penalized by its own path."""
    draft, target = tiny_pair
    ref = Llama(str(target), n_ctx=256, n_threads=2, verbose=False)
    with Engine(target, draft if mode == "tree" else None, mode=mode, n_ctx=256, memory_budget=None) as e:
        for prompt in PROMPTS[:3]:
            toks = e.tokenize(prompt, special=True)
            ref.reset()
            theirs = list(itertools.islice(ref.generate(toks, temp=0.0, repeat_penalty=1.5), 30))
            plain = e.create_completion(prompt, max_tokens=30, temperature=0.0)["edgecad"]["token_ids"]
            ours = e.create_completion(prompt, max_tokens=30, temperature=0.0, repeat_penalty=1.5)["edgecad"]
            assert ours["token_ids"] == theirs
            assert ours["token_ids"] != plain or len(set(plain)) == len(plain)  # the penalty changed something


# ---------------------------------------------------------------------------- reliability

def _gguf_cuts(data: bytes) -> list[int]:
    """Points to truncate a GGUF at: in the magic, the header, the metadata, the tensor index, the data."""
    return [3, 20, 200, 5000, len(data) // 2, len(data) - 1]


@pytest.mark.parametrize("case", ["empty", "random", "random-after-magic", "wrong-architecture", "directory",
                                  *[f"cut-{i}" for i in range(6)]])
def test_bad_model_files_are_one_clear_error(tmp_path, tiny_target, case):
    data = tiny_target.read_bytes()
    p = tmp_path / "bad.gguf"
    if case == "empty":
        p.write_bytes(b"")
    elif case == "random":
        p.write_bytes(os.urandom(100_000))
    elif case == "random-after-magic":
        p.write_bytes(data[:8] + os.urandom(100_000))
    elif case == "wrong-architecture":
        p.write_bytes(data.replace(b"qwen2", b"zzzz9"))
    elif case == "directory":
        p.mkdir()
    else:
        p.write_bytes(data[:_gguf_cuts(data)[int(case.split("-")[1])]])
    with pytest.raises(ModelFileError) as e:
        Engine(p, n_ctx=64)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_model(tmp_path, tiny_target):
    p = tmp_path / "locked.gguf"
    p.write_bytes(tiny_target.read_bytes())
    p.chmod(0)
    with pytest.raises(ModelFileError, match="permission"):
        Engine(p)


@pytest.mark.parametrize("change", ["truncate", "replace"])
def test_a_resident_model_changed_on_disk_is_an_error_not_a_crash(disk_dir, tiny_pair, change):
    draft, target = tiny_pair
    tmp_path = disk_dir / f"changed-{change}"
    tmp_path.mkdir(exist_ok=True)
    t, d = tmp_path / "t.gguf", tmp_path / "d.gguf"
    t.write_bytes(target.read_bytes())
    d.write_bytes(draft.read_bytes())
    with Engine(t, d, mode="tree", n_ctx=256, memory_budget=None) as e:
        e.create_completion("hello", temperature=0.0, max_tokens=4)
        victim = d if change == "truncate" else t
        if change == "truncate":
            os.truncate(victim, victim.stat().st_size // 3)
        else:
            (tmp_path / "new.gguf").write_bytes(victim.read_bytes())
            os.replace(tmp_path / "new.gguf", victim)
        with pytest.raises(ModelFileError, match="changed or vanished"):
            e.create_completion("hello", temperature=0.0, max_tokens=4)


def test_two_threads_share_one_engine_one_completion_at_a_time(tiny_pair):
    import threading
    draft, target = tiny_pair
    prompts = PROMPTS[:4]
    with Engine(target, draft, mode="tree", n_ctx=512, memory_budget=None) as e:
        ref = {p: e.create_completion(p, temperature=0.0, max_tokens=24)["edgecad"]["token_ids"] for p in prompts}
        got, errors = {}, []

        def worker(i):
            try:
                for k in range(6):
                    p = prompts[(i + k) % len(prompts)]
                    got.setdefault(p, []).append(e.create_completion(p, temperature=0.0, max_tokens=24)
                                                 ["edgecad"]["token_ids"])
            except Exception as x:  # noqa: BLE001 (reported below)
                errors.append(x)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
        assert all(ids == ref[p] for p, runs in got.items() for ids in runs)
        first = e.create_completion("hello the world", max_tokens=8, stream=True)
        next(first)
        with pytest.raises(EdgecadError, match="another completion of this Engine is still streaming"):
            list(e.create_completion("abc", max_tokens=4, stream=True))
        first.close()
        assert e.create_completion("hello the world", temperature=0.0, max_tokens=24)["edgecad"]["token_ids"] == \
            ref["hello the world"]


@pytest.mark.parametrize("storage", ["throttled", "native"])
def test_ctrl_c_at_any_moment_of_a_paged_tree_leaves_the_engine_usable(paging_pair, storage):
    """A real SIGINT (the C flag and Python's KeyboardInterrupt, as a terminal's Ctrl-C) at random moments of
    paged tree completions: throttled, most land while a pass waits on storage; native, while the target or the
    draft computes. Each time the engine stays usable, both caches hold only the accepted path, and the next
    completion is the target's own."""
    import random
    from edgecad.plan import PagerParams
    draft, target = paging_pair
    p = PagerParams(throttle_bps=40e6 if storage == "throttled" else None, embd_allowance=64 << 10)
    with Engine(target, draft, mode="tree", n_ctx=512, target_budget="50%", pager=p) as e:
        runs = [e.create_completion("Once upon a time", temperature=0.0, max_tokens=24)["edgecad"] for _ in range(3)]
        ref, took = runs[0], sorted(st["seconds"] + st["prompt_seconds"] for st in runs[1:])[0]  # warm: prompt kept
        e.check_kv = True  # check both KV caches after every step
        rnd, interrupted, tries = random.Random(0), 0, 0
        while interrupted < 6 and tries < 40:  # random moments of a completion: most of them interrupt it
            tries += 1
            try:
                with sigint_after(rnd.uniform(0.002, took)):
                    e.create_completion("Once upon a time", temperature=0.0, max_tokens=24)
            except KeyboardInterrupt:
                interrupted += 1
            st = e.create_completion("Once upon a time", temperature=0.0, max_tokens=24)["edgecad"]
            assert st["token_ids"] == ref["token_ids"]
        assert interrupted >= 6, f"{interrupted} of {tries} SIGINTs interrupted a completion"


NO_NETWORK_CHILD = """
import sys
from edgecad import Engine
draft, target = sys.argv[1], sys.argv[2]
with Engine(target, draft, mode="tree", n_ctx=256) as e:
    assert e.create_completion("hello", temperature=0.0, max_tokens=8)["usage"]["completion_tokens"] == 8
    e.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=4)
with Engine(target, draft, n_ctx=256, target_budget="50%") as e:  # paged, the pager's threads too
    e.create_completion("hello", temperature=0.0, max_tokens=8, stream=False)
print("generated")
"""


def test_generation_needs_no_network(paging_pair, tmp_path):
    """Every socket call of the whole process (Python, llama.cpp, the pager's threads), seen by the kernel
    through strace, in a network namespace with no interface up: a generation, a chat turn and a paged
    generation open no socket and connect nowhere."""
    import shutil
    import subprocess
    import sys
    if shutil.which("strace") is None or shutil.which("unshare") is None:
        pytest.skip("needs strace and unshare (util-linux) to watch every socket call in a namespace without network")
    draft, target = paging_pair
    log = tmp_path / "strace.txt"
    r = subprocess.run(["unshare", "--net", "strace", "-f", "-qq", "-e", "trace=socket,connect,sendto,sendmsg",
                        "-e", "signal=none", "-o", str(log), sys.executable, "-c", NO_NETWORK_CHILD, str(draft),
                        str(target)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and ("Operation not permitted" in r.stderr or "ptrace" in r.stderr):
        pytest.skip(f"cannot watch a process here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0 and "generated" in r.stdout, r.stderr[-3000:]
    calls = [l for l in log.read_text().splitlines() if l.strip()]
    assert calls == [], "socket calls at run time:\n" + "\n".join(calls[:20])


def test_300_generations_do_not_leak(tiny_pair, paging_pair):
    """Mixed modes, budgets, stops, streams and chat turns on three engines: after a warm-up, the process's
    RSS grows by under 5% and no branch sequence is ever left in a KV cache; then 20 engine loads."""
    import psutil
    from edgecad.plan import PagerParams
    draft, target = tiny_pair
    proc, prompts = psutil.Process(), PROMPTS[:4]
    engines = [Engine(target, mode="target", n_ctx=256, memory_budget=None),
               Engine(target, draft, mode="tree", n_ctx=512, memory_budget=None),
               Engine(paging_pair[1], paging_pair[0], mode="tree", n_ctx=512, target_budget="50%",
                      pager=PagerParams(embd_allowance=64 << 10))]
    try:
        messages, rss = [], []
        for i in range(300):
            e, p = engines[i % 3], prompts[i % 4]
            if i % 10 == 9:
                messages = messages[-6:] + [{"role": "user", "content": p}]
                r = e.create_chat_completion(messages, max_tokens=6, temperature=0.0)
                messages.append(r["choices"][0]["message"])
            elif i % 5 == 4:
                list(e.create_completion(p, max_tokens=12, temperature=0.7, seed=i, stop=["e"], stream=True))
            else:
                e.create_completion(p, max_tokens=12, temperature=0.0 if i % 2 else 0.8, seed=i)
            for ctx in (e.target_context, e.draft_context):
                if ctx is not None:
                    assert all(ctx.seq_pos_max(s) == -1 for s in range(1, ctx.params.n_seq_max))
            if i in (59, 299):
                rss.append(proc.memory_info().rss)
        assert rss[1] < rss[0] * 1.05, f"RSS grew from {rss[0] / 1e6:.1f} to {rss[1] / 1e6:.1f} MB"
    finally:
        for e in engines:
            e.close()
    loads = []
    for i in range(20):
        with Engine(paging_pair[1], paging_pair[0], mode="tree", n_ctx=256, target_budget="50%",
                    pager=PagerParams(embd_allowance=64 << 10)) as e:
            e.create_completion("hi", max_tokens=2)
        if i in (4, 19):
            loads.append(proc.memory_info().rss)
    assert loads[1] < loads[0] * 1.05, f"RSS grew from {loads[0] / 1e6:.1f} to {loads[1] / 1e6:.1f} MB over loads"


def test_near_ties_are_counted_where_the_target_met_them(tiny_target):
    """Target mode decodes one token at a time; a teacher-forced pass one token at a time has the same
    numerics, so it finds exactly the near-ties the completion counted."""
    from edgecad.fidelity import teacher_forced
    from edgecad.llama import Batch
    with Engine(tiny_target, mode="target", n_ctx=512) as e:
        total = 0
        for prompt in PROMPTS[:3]:
            st = e.create_completion(prompt, temperature=0.0, max_tokens=120)["edgecad"]
            with Batch(1) as b:
                fid = teacher_forced(e.target_context, b, e.tokenize(prompt, special=True), st["token_ids"])
            assert st["near_ties"] == fid.near_ties
            total += st["near_ties"]
        assert total > 0  # the tiny models do meet near-ties: the count is not trivially zero


# ---------------------------------------------------------------------------- end of generation, stop strings
# On the quantized pair: Q4 numerics, weight repacking, and outputs that end with an end-of-generation token.

@pytest.fixture(scope="module")
def q_judge(quantized_pair):
    """The quantized target alone: its greedy tokens, and its logits to tell a near-tie."""
    with Engine(quantized_pair[1], mode="target", n_ctx=512, memory_budget=None) as e:
        yield e


def _same_or_near_tie(judge, prompt, ours, ref):
    """ours equals ref, or they part where the target's top-2 logits are within NEAR_TIE_EPS (the README's
    guarantee: batched and one-token numerics may order a near-tie differently)."""
    from edgecad.fidelity import NEAR_TIE_EPS, top2_gap
    from edgecad.llama import Batch
    if ours == ref:
        return
    k = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    with Batch(512) as b:
        gap = top2_gap(judge.target_context.prefill(b, judge.tokenize(prompt, special=True) + ref[:k], logits=True))
    assert gap < NEAR_TIE_EPS, f"{prompt!r}: parts from the target at token {k} where its top-2 gap is {gap:.3f}"


def test_a_quantized_target_ends_where_llama_cpp_python_ends(quantized_pair, q_judge):
    """Greedy on a Q4_0 target (repacked weights): the same text, finish_reason 'stop' at the end-of-generation
    token, and usage without it, as llama-cpp-python's Llama."""
    ref = Llama(str(quantized_pair[1]), n_ctx=512, n_threads=2, verbose=False)
    ended = 0
    for prompt in PROMPTS:
        ours = q_judge.create_completion(prompt, temperature=0.0, max_tokens=60)
        theirs = ref.create_completion(prompt, temperature=0.0, max_tokens=60)
        if theirs["choices"][0]["finish_reason"] != "stop":
            continue  # (past max_tokens Llama may add a token to complete UTF-8: compared elsewhere)
        ended += 1
        assert ours["choices"][0]["finish_reason"] == "stop"
        assert ours["choices"][0]["text"] == theirs["choices"][0]["text"]
        assert ours["usage"] == theirs["usage"]
        assert q_judge.target_context.model.is_eog(ours["edgecad"]["token_ids"][-1])
        assert ours["usage"]["completion_tokens"] == ours["edgecad"]["n_tokens"] - 1  # the end token not counted
    assert ended >= 3


def _complete(e, prompt, stream, **kw):
    """A completion, joined from its chunks when streamed (checking the chunks' shape on the way)."""
    if not stream:
        return e.create_completion(prompt, **kw)
    chunks = list(e.create_completion(prompt, stream=True, **kw))
    assert all(c["choices"][0]["finish_reason"] is None and "usage" not in c for c in chunks[:-1])
    out = chunks[-1]
    out["choices"][0]["text"] = "".join(c["choices"][0]["text"] for c in chunks)
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("mode", ["target", "tree", "linear", "bild"])
def test_end_of_generation_in_every_mode(quantized_pair, q_judge, mode, stream):
    """Every mode stops at the end-of-generation token (in tree modes it may sit inside an accepted path or be
    the bonus token): finish_reason 'stop', the end token last in token_ids and not in usage or text; the
    lossless modes emit the target's tokens (up to a near-tie)."""
    draft, target = quantized_pair
    ended, where = 0, set()
    with Engine(target, draft if mode != "target" else None, mode=mode, n_ctx=512, memory_budget=None) as e:
        e.check_kv = mode != "target"
        for prompt in PROMPTS:
            ref = q_judge.create_completion(prompt, temperature=0.0, max_tokens=60)["edgecad"]["token_ids"]
            out = _complete(e, prompt, stream, temperature=0.0, max_tokens=60)
            ids, ch = out["edgecad"]["token_ids"], out["choices"][0]
            if mode != "bild":
                _same_or_near_tie(q_judge, prompt, ids, ref)
            if ch["finish_reason"] == "length":
                assert len(ids) == 60 and not any(map(e.target_context.model.is_eog, ids))
                continue
            ended += 1
            assert ch["finish_reason"] == "stop" and e.target_context.model.is_eog(ids[-1])
            assert not any(map(e.target_context.model.is_eog, ids[:-1]))
            assert out["usage"]["completion_tokens"] == len(ids) - 1
            assert ch["text"] == e.detokenize(ids[:-1]).decode("utf-8", errors="ignore")
            if mode != "target":  # each pass emits its accepted drafted tokens, then the target's bonus token,
                st = out["edgecad"]  # unless the end token was a drafted one: then nothing after it
                bonuses = len(ids) - st["accepted_tokens"]
                assert bonuses in (st["target_passes"], st["target_passes"] - 1), st
                where.add("in the path" if bonuses < st["target_passes"] else "the bonus")
    assert ended >= 3
    if mode == "tree":
        assert where == {"in the path", "the bonus"}  # both ways of ending, with this pair and these prompts


@pytest.mark.parametrize("mode", ["target", "tree", "linear", "bild"])
def test_stop_strings_are_never_streamed(quantized_pair, mode):
    """A stop string ends the output before it: no chunk ever carries any of its text (a possible start is
    held back until the next token rules it out), the chunks join to the text before it, in every mode."""
    draft, target = quantized_pair
    with Engine(target, draft if mode != "target" else None, mode=mode, n_ctx=512, memory_budget=None) as e:
        full = e.create_completion("Once upon a time", temperature=0.0, max_tokens=60)["choices"][0]["text"]
        assert len(full) > 12
        for start in (3, len(full) // 2):
            stop = full[start:start + 3]
            cut = full.find(stop)
            chunks = list(e.create_completion("Once upon a time", temperature=0.0, max_tokens=60, stop=[stop, "\x00x"],
                                              stream=True))
            texts = [c["choices"][0]["text"] for c in chunks]
            assert "".join(texts) == full[:cut]
            assert all(stop not in t for t in texts)
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
            assert chunks[-1]["usage"]["completion_tokens"] < 60


def test_a_chat_ends_at_the_template_s_end_of_turn_as_llama_cpp_python(quantized_pair):
    """The chat template's end of turn (<|im_end|>, an end-of-generation token) ends the answer: the same
    message, finish_reason and usage as llama-cpp-python's create_chat_completion, streamed or not."""
    draft, target = quantized_pair
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    ref = Llama(str(target), n_ctx=512, n_threads=2, verbose=False).create_chat_completion(
        messages, temperature=0.0, max_tokens=80)
    assert ref["choices"][0]["finish_reason"] == "stop"
    with Engine(target, draft, mode="tree", n_ctx=512, memory_budget=None) as e:
        ours = e.create_chat_completion(messages, temperature=0.0, max_tokens=80)
        chunks = list(e.create_chat_completion(messages, temperature=0.0, max_tokens=80, stream=True))
    assert ours["choices"][0]["message"] == ref["choices"][0]["message"]
    assert ours["choices"][0]["finish_reason"] == "stop" and ours["usage"] == ref["usage"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ref["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# The quantized target paged, as every user runs a Q4 file: the resident target alone is the judge.

@pytest.fixture(scope="module")
def q_paged_judge(quantized_pair):
    """The quantized target alone, resident, on one thread (a loaded machine slows llama.cpp's threads that wait on
    each other far more), and its greedy tokens for each prompt (60 at most)."""
    with Engine(quantized_pair[1], mode="target", n_ctx=512, n_threads=1, memory_budget=None) as e:
        yield e, {p: e.create_completion(p, temperature=0.0, max_tokens=60)["edgecad"]["token_ids"] for p in PROMPTS}


PAGED = [("target", "prefetch", False), ("target", "demand", False)] + [
    (mode, io, pipeline) for mode in ("tree", "linear") for io in ("prefetch", "demand") for pipeline in (False, True)]


@pytest.mark.parametrize("mode,io,pipeline", PAGED,
                         ids=[f"{m}-{io}{'-pipeline' if pl else ''}" for m, io, pl in PAGED])
def test_a_paged_quantized_target_gives_the_resident_target_s_tokens(quantized_pair, q_paged_judge, mode, io,
                                                                      pipeline):
    """The Q4_0 target streamed inside a target budget (2 of its 8 layers pinned, the rest read every pass) by
    prefetch or demand reads, in target, tree and linear modes, the tree modes also with the pipeline on (storage
    throttled to an SD card's 45 MB/s: chains drafted beside the passes), both KV caches checked after every step:
    the greedy tokens are the resident target's (the judge, one token per pass) up to a near-tie, as edgecad bench
    scores a row. A teacher-forced pass of the judge over each output finds no token that is not its argmax
    outside a near-tie; where the output parts from the judge's own, the judge's top-2 gap there is a near-tie
    and the completion counted one; the completion's near-tie count is the teacher-forced pass's (between its
    counts at half and at twice the near-tie margin: batched and one-token numerics differ slightly); most
    prompts give exactly the judge's tokens."""
    from edgecad.fidelity import NEAR_TIE_EPS, teacher_forced
    from edgecad.llama import Batch
    from edgecad.plan import PagerParams
    from helpers import budget_for

    draft, target = quantized_pair
    judge, refs = q_paged_judge
    p = PagerParams(io=io, embd_allowance=64 << 10, **(dict(storage="sd") if pipeline else {}))
    budget = budget_for(target, p, pinned_layers=2)
    exact, parted, totals = 0, [], dict(near_ties=0, chain_tokens=0, reused_tokens=0)
    with Engine(target, draft if mode != "target" else None, mode=mode, n_ctx=512, n_threads=1,
                target_budget=budget, pager=p, pipeline=pipeline if mode != "target" else None) as e, \
            Batch(512) as b:
        plan = e.budget_plan
        assert e.memory_plan.paged and e.pipeline == pipeline and len(plan.streamed_layers) == 6
        e.check_kv = True  # (tree modes: after every step, both caches hold only the accepted path)
        for prompt in PROMPTS:
            ref = refs[prompt]
            st = e.create_completion(prompt, temperature=0.0, max_tokens=60)["edgecad"]
            ids, toks = st["token_ids"], judge.tokenize(prompt, special=True)
            assert st["bytes_read"] >= plan.streamed_bytes  # streamed: every pass reads the streamed layers
            assert st["peak_resident_target_bytes"] <= budget + mmap.PAGESIZE * len(plan.streamed_layers)
            judged = {eps: teacher_forced(judge.target_context, b, toks, ids, eps=eps)
                      for eps in (NEAR_TIE_EPS / 2, NEAR_TIE_EPS, 2 * NEAR_TIE_EPS)}
            fid = judged[NEAR_TIE_EPS]
            assert fid.mismatch_clear == 0, f"{prompt!r}: {fid} (a token the judge would not choose, gap clear)"
            assert judged[NEAR_TIE_EPS / 2].near_ties <= st["near_ties"] <= judged[2 * NEAR_TIE_EPS].near_ties, (
                prompt, st["near_ties"], fid)
            if ids == ref:
                exact += 1
            else:
                _same_or_near_tie(judge, prompt, ids, ref)  # they part only where the judge met a near-tie
                assert st["near_ties"] > 0, f"{prompt!r} parts from the judge but counted no near-tie"
                parted.append(prompt)
            for k in totals:
                totals[k] += st[k]
    print(f"{mode} {io} pipeline={pipeline}: {exact}/{len(PROMPTS)} exact, parted at a near-tie: {parted}, {totals}")
    assert exact >= len(PROMPTS) - 1
    assert totals["near_ties"] > 0  # Q4 numerics do meet near-ties on these prompts: the count is under test
    if pipeline:
        assert totals["chain_tokens"] > 0  # drafting happened beside the target's passes


def test_closing_while_another_thread_computes_a_stream_s_chunk_waits_for_it(paging_pair):
    """An open stream does not hold close() up (a paused stream's reader may never come back), but a chunk that
    another thread is computing at that moment finishes before the contexts are freed; the stream's next chunk
    then says the engine was closed, in one line (before: close freed the contexts under the running decode)."""
    import threading
    from edgecad.plan import PagerParams
    draft, target = paging_pair
    p = PagerParams(io="demand", throttle_bps=20e6, embd_allowance=64 << 10)  # a pass takes ~0.2 s
    e = Engine(target, draft, mode="tree", n_ctx=512, target_budget="50%", pager=p)
    stream = e.create_completion("Once upon a time", temperature=0.0, max_tokens=200, stream=True)
    next(stream)
    chunk_started, out = threading.Event(), []

    def read():
        try:
            chunk_started.set()
            for _ in stream:
                pass
            out.append("ended")
        except EdgecadError as x:
            out.append(str(x))

    th = threading.Thread(target=read)
    th.start()
    chunk_started.wait()
    e.close()  # while the reader's thread computes
    th.join(60)
    assert not th.is_alive() and len(out) == 1
    assert out[0] == "ended" or "closed" in out[0], out
