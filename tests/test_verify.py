"""Tree verification and acceptance, end to end on real llama.cpp with the tiny pair:
lossless greedy, preserved sampling distribution, clean KV caches, BiLD's honesty."""
from dataclasses import replace

import numpy as np
import pytest

from edgecad import Engine
from edgecad.llama import Batch, Context, ContextParams, Model
from edgecad.sampling import SamplingParams, distribution, processed
from edgecad.tree import MODE_PARAMS, TokenTree, TreeParams
from edgecad.verify import accept_sampling, leaf_sequences
from helpers import PROMPTS, chi_square
NEAR_TIE = 1e-3  # top-2 logit gap below which batched and sequential numerics may order tokens differently


@pytest.fixture(scope="module")
def target_engine(tiny_target):
    with Engine(tiny_target, n_ctx=512, n_threads=2) as e:
        yield e


def top2_gap(model_path, tokens):
    """The target's top-2 logit gap after `tokens`, from a plain sequential context."""
    with Model(model_path) as m, Context(m, ContextParams(n_ctx=512)) as ctx, Batch(512) as b:
        s = np.sort(ctx.prefill(b, tokens, logits=True))
        return float(s[-1] - s[-2])


@pytest.mark.parametrize("mode", ["tree", "linear"])
def test_greedy_speculative_equals_target(tiny_pair, target_engine, mode):
    draft, target = tiny_pair
    exact, near_ties = 0, []
    with Engine(target, draft, mode=mode, n_ctx=512, n_threads=2) as e:
        e.check_kv = True  # also: no branch left in either KV cache after any step
        for prompt in PROMPTS:
            ours = e.create_completion(prompt, temperature=0.0, max_tokens=80)["edgecad"]
            ref = target_engine.create_completion(prompt, temperature=0.0, max_tokens=80)["edgecad"]["token_ids"]
            if ours["token_ids"] == ref:
                exact += 1
                continue
            k = next(i for i, (a, b) in enumerate(zip(ours["token_ids"], ref)) if a != b)
            gap = top2_gap(target, e.tokenize(prompt, special=True) + ref[:k])
            assert gap < NEAR_TIE, f"{mode} differs from target at token {k} of {prompt!r} (top-2 gap {gap:.4f})"
            near_ties.append((prompt, k, gap))
    print(f"{mode}: {exact}/{len(PROMPTS)} identical, near-ties: {near_ties}")
    assert exact >= len(PROMPTS) - 1


def test_a_large_wide_tree_on_slow_storage_equals_the_target(budget_pair, disk_dir):
    """Trees of up to 255 nodes, 16 wide (what the plan allows where passes read for long: test_memory), drafted
    beside the passes (the plan's pipeline on slow storage): still the target's greedy tokens, with both KV
    caches clean after every step."""
    from edgecad.plan import PagerParams
    draft, target = budget_pair
    with Engine(target, n_ctx=1024, n_threads=2, memory_budget=None) as ref_engine:
        ref = ref_engine.create_completion(PROMPTS[0], temperature=0.0, max_tokens=24)["edgecad"]["token_ids"]
    big = TreeParams(max_nodes=255, max_depth=32, max_width=16, branch_p=0.01, fallback="token", p_min=0.0)
    with Engine(target, draft, mode="tree", tree_params=big, target_budget="50%", n_ctx=1024, n_threads=2,
                pager=PagerParams(throttle_bps=60e6)) as e:
        assert e.pipeline  # (the passes wait on storage: drafting beside them)
        e.check_kv = True
        st = e.create_completion(PROMPTS[0], temperature=0.0, max_tokens=24)["edgecad"]
    assert st["token_ids"] == ref
    print("nodes per pass", st["tree_nodes_per_pass"], "tokens per pass", st["mean_accepted_per_pass"])
    assert st["tree_nodes_per_pass"] > 32  # (the tiny draft is unsure: wide trees)


def test_tree_makes_fewer_target_passes_than_linear(tiny_pair):
    draft, target = tiny_pair
    per_pass = {}
    for mode in ("tree", "linear", "target"):
        with Engine(target, draft if mode != "target" else None, mode=mode, n_ctx=512) as e:
            st = [e.create_completion(p, temperature=0.0, max_tokens=60)["edgecad"] for p in PROMPTS]
        per_pass[mode] = sum(s["n_tokens"] for s in st) / sum(s["target_passes"] for s in st)
        if mode != "target":
            assert all(s["draft_tokens"] >= s["accepted_tokens"] for s in st)
            assert all(s["accepted_tokens"] + s["target_passes"] >= s["n_tokens"] for s in st)
    assert per_pass["target"] == 1.0
    assert per_pass["tree"] > 1.3 * per_pass["linear"] > 1.3


SAMPLING_CASES = {  # mode, llama-cpp-python sampling arguments
    "tree top-k top-p": ("tree", dict(temperature=1.0, top_k=12, top_p=0.95, min_p=0.0)),
    "tree min-p repeat-penalty": ("tree", dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.08, repeat_penalty=1.5)),
    "linear top-k top-p min-p": ("linear", dict(temperature=1.0, top_k=12, top_p=0.9, min_p=0.02)),
}


@pytest.mark.parametrize("case", SAMPLING_CASES)
def test_sampling_keeps_the_target_distribution_at_depth_one_and_two(tiny_pair, case):
    """Over many seeds, the first sampled token follows the target's distribution after the prompt, and the
    second, given the first, the target's distribution after prompt + first (the repeat penalty counting the
    first): the second token is often a depth-2 node accepted in the first pass, so acceptance below the root,
    each node's own logits row and its own penalty history are all under test. The draft differs clearly
    from the target (TV > 0.15), so a sampler that leaked the draft's choices fails; chi_square states the
    power against a smaller bias."""
    mode, kw = SAMPLING_CASES[case]
    draft, target = tiny_pair
    sp = SamplingParams(**{k: v for k, v in kw.items()})
    prompt, n = "hello the world", 2500
    with Model(target) as tm, Model(draft) as dm:
        toks = tm.tokenize(prompt)
        dists = []
        for m in (tm, dm):
            with Context(m, ContextParams(n_ctx=256)) as ctx, Batch(64) as b:
                dists.append(distribution(ctx.prefill(b, toks, logits=True), sp))
    p1, q1 = dists
    assert 0.5 * np.abs(p1 - q1).sum() > 0.15
    params = (TreeParams(max_nodes=8, max_depth=3, max_width=3, branch_p=0.05) if mode == "tree" else  # a chain that
              replace(MODE_PARAMS["linear"], max_nodes=3, p_min=0.0))  # always reaches depth 2 (p_min 0.75 rarely does)
    first, pairs, deep = np.zeros_like(p1), [], 0
    with Engine(target, draft, mode=mode, tree_params=params, n_ctx=256) as e:
        e.check_kv = True
        for seed in range(n):
            st = e.create_completion(prompt, max_tokens=3, seed=seed, **kw)["edgecad"]
            t = st["token_ids"]
            first[t[0]] += 1
            pairs.append((t[0], t[1]))
            deep += st["target_passes"] == 1 and st["accepted_tokens"] >= 2  # depth >= 2 accepted in one pass
    assert deep > 0.05 * n, f"only {deep} of {n} completions accepted two drafted tokens in one pass"
    print(case, "first:", chi_square(first, p1 * n, tv=0.06))
    second_obs, second_exp = np.zeros_like(p1), np.zeros_like(p1)
    with Model(target) as tm, Context(tm, ContextParams(n_ctx=256)) as ctx, Batch(64) as b:
        after = {}
        for t1, t2 in pairs:
            if t1 not in after:
                after[t1] = distribution(processed(ctx.prefill(b, toks + [t1], logits=True), [t1], sp), sp)
            second_exp += after[t1]
            second_obs[t2] += 1
    print(case, "second:", chi_square(second_obs, second_exp, tv=0.08))


def test_rejection_sampling_is_exact_at_depth_two_with_each_node_s_own_row():
    """accept_sampling by Monte Carlo over its own randomness and the draft's draws, on trees of depth 2 whose
    every node has its own target distribution: the first emitted token follows the root's row, and the second,
    given an accepted first node, that node's row (reading any other row would fail)."""
    V, n = 4, 30000
    rng = np.random.default_rng(0)
    p_root, q_root = np.array([0.5, 0.3, 0.15, 0.05]), np.array([0.1, 0.2, 0.3, 0.4])
    p_node = {x: rng.dirichlet(np.ones(V)) for x in range(V)}  # the target after root + x
    q_node = {x: rng.dirichlet(np.ones(V)) for x in range(V)}  # the draft after root + x
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    first, second = np.zeros(V), np.zeros((V, V))
    for _ in range(n):
        t = TokenTree(16, root_token=0, root_pos=0)
        t.q[0] = q_root
        for x in rng.choice(V, size=2, p=q_root):
            t.draws[0].append(int(x))
            if int(x) not in t.children[0]:
                c = t.add(0, int(x), q_root[x], 1)
                t.q[c] = q_node[int(x)]
                for y in rng.choice(V, size=2, p=q_node[int(x)]):
                    t.draws[c].append(int(y))
                    if int(y) not in t.children[c]:
                        t.add(c, int(y), q_node[int(x)][y], 1)
        rows = [np.log(p_root)] + [np.log(p_node[int(t.token[i])]) if t.depth[i] == 1 else np.zeros(V)
                                   for i in range(1, t.n)]
        path, bonus = accept_sampling(t, np.array(rows), sp, rng)
        x = int(t.token[path[0]]) if path else bonus
        first[x] += 1
        if path:
            second[x, int(t.token[path[1]]) if len(path) > 1 else bonus] += 1
    chi_square(first, p_root * n, tv=0.02)
    for x in range(V):
        m = second[x].sum()
        assert m > 1000
        assert np.abs(second[x] / m - p_node[x]).max() < 0.03, (x, second[x] / m, p_node[x])


def test_leaf_sequences():
    t = TokenTree(6, 1, 0)
    a = t.add(0, 2, 1, 1)
    b = t.add(a, 3, 1, 1)
    c = t.add(a, 4, 1, 2)
    d = t.add(0, 5, 1, 3)
    seqs, leaf_seq = leaf_sequences(t)
    assert set(leaf_seq) == {b, c, d}
    assert sorted(seqs[0]) == [1, 2, 3] and sorted(seqs[a]) == sorted([leaf_seq[b], leaf_seq[c]])
    assert seqs[d] == [leaf_seq[d]]


def test_bild_says_it_is_not_lossless(tiny_pair):
    """BiLD keeps drafted tokens the target would not have chosen, and counts them: its count equals the
    mismatches a teacher-forced target pass finds in its output (give or take the near-ties there)."""
    from edgecad.fidelity import teacher_forced
    draft, target = tiny_pair
    divergent = 0
    with Engine(target, draft, mode="bild", n_ctx=512) as e, Engine(target, mode="target", n_ctx=512) as judge, \
            Batch(512) as b:
        e.check_kv = True
        for prompt in PROMPTS:
            st = e.create_completion(prompt, temperature=0.0, max_tokens=60)["edgecad"]
            assert st["lossless"] is False and st["mean_accepted_per_pass"] > 1.0
            fid = teacher_forced(judge.target_context, b, e.tokenize(prompt, special=True), st["token_ids"])
            assert abs((fid.n - fid.match) - st["bild_divergent_tokens"]) <= fid.near_ties, (prompt, fid, st)
            divergent += st["bild_divergent_tokens"]
    assert divergent > 0  # the tiny draft disagrees with the target often enough for BiLD to keep some


def test_stats_of_speculative_modes(tiny_pair):
    draft, target = tiny_pair
    with Engine(target, draft, mode="tree", n_ctx=512) as e:
        assert e.mode == "tree" and e.tree_params.cost_aware is False  # resident target: LLMCad's rule alone
        r = e.create_completion("abc", temperature=0.0, max_tokens=40)
        st = r["edgecad"]
    assert st["lossless"] is True and st["n_tokens"] == 40 and r["usage"]["completion_tokens"] == 40
    assert st["mean_accepted_per_pass"] == pytest.approx(40 / st["target_passes"])
    assert st["tree_nodes_per_pass"] == pytest.approx(st["draft_tokens"] / st["target_passes"])
    fb = st["fallback"]
    assert fb["updates"] >= 1 and 0.02 <= fb["min"] <= fb["final"] <= fb["max"] <= 0.9
    assert st["seconds_draft"] > 0 and st["seconds_target"] > 0 and st["draft_passes"] > 0


def test_speculative_mode_needs_a_draft(tiny_target):
    from edgecad.errors import EdgecadError
    with pytest.raises(EdgecadError, match="needs a draft"):
        Engine(tiny_target, mode="tree")
    with pytest.raises(EdgecadError, match="unknown mode"):
        Engine(tiny_target, mode="fast")


def test_sampling_from_kept_chains_keeps_the_target_distribution(paging_pair, disk_dir):
    """With the pipeline, a tree can start from a chain the draft drew during the previous target pass.
    Among completions where that happened, the token verified from such a tree follows the target's own
    distribution given the tokens before it: pooled chi-square of observed against expected counts.
    The target drafts for itself here: with the tiny pair's draft a chain is rarely kept (its first token
    must equal the target's bonus), and the test is about the kept chain's KV, positions and draws."""
    from edgecad.gguf_file import read_gguf
    from edgecad.measure import paging_plan
    from edgecad.plan import PagerParams

    import shutil

    _, target = paging_pair
    draft = shutil.copy(target, disk_dir / "self-draft.gguf")  # a file of its own: the pager finds one mapping
    info = read_gguf(target)
    pp = PagerParams(io="demand", throttle_bps=100e6, embd_allowance=64 << 10)  # the target waits: chains get drafted
    budget = paging_plan(info, 10 ** 9, pp).minimum + 12 * max(l.n_bytes for l in info.layers())
    params = TreeParams(max_nodes=1, max_depth=1, max_width=1)  # step 1: one node a; its chain x1, x2
    sp = SamplingParams(temperature=1.0, top_k=3, top_p=1.0)  # few candidates: chains are often kept
    prompt, n = "hello the world", 600
    kept = []
    with Engine(target, draft, mode="tree", tree_params=params, n_ctx=256, target_budget=budget, pager=pp,
                pipeline=True) as e:
        assert e.pipeline
        for seed in range(n):
            st = e.create_completion(prompt, max_tokens=4, temperature=1.0, top_k=3, top_p=1.0, min_p=0.0,
                                    seed=seed)["edgecad"]
            if st["reused_tokens"] >= 1 and st["n_tokens"] >= 3:  # the second tree started from the kept chain x1, x2
                kept.append(st["token_ids"][:3])
        toks = e.tokenize(prompt, special=True)
    assert len(kept) >= 100, f"only {len(kept)} completions went through a kept chain"  # (~380 here)
    observed, expected = {}, {}
    with Model(target) as tm, Context(tm, ContextParams(n_ctx=256)) as ctx, Batch(64) as b:
        cache = {}
        for t1, t2, t3 in kept:
            if (t1, t2) not in cache:
                cache[(t1, t2)] = distribution(ctx.prefill(b, toks + [t1, t2], logits=True), sp)
            p = cache[(t1, t2)]
            for t in np.flatnonzero(p):
                expected[int(t)] = expected.get(int(t), 0.0) + p[t]
            observed[t3] = observed.get(t3, 0) + 1
    assert set(observed) <= set(expected)  # never a token outside the target's top-3
    keys = sorted(expected)
    obs, exp = np.array([observed.get(k, 0) for k in keys], float), np.array([expected[k] for k in keys])
    print(f"{len(kept)} kept-chain completions:", chi_square(obs, exp, tv=0.3))
