"""Tree verification and acceptance, end to end on real llama.cpp with the tiny pair:
lossless greedy, preserved sampling distribution, clean KV caches, BiLD's honesty."""
import numpy as np
import pytest

from edgecad import Engine
from edgecad.llama import Batch, Context, ContextParams, Model
from edgecad.sampling import SamplingParams, distribution
from edgecad.tree import TokenTree, TreeParams
from edgecad.verify import accept_sampling, leaf_sequences

PROMPTS = ["hello the world", "Once upon a time", "abc", "def f(x):\n    return x", "in an inner on"]
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
        e._debug_kv = True  # also: no branch left in either KV cache after any step
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


def test_sampling_keeps_the_target_distribution(tiny_pair):
    """Over many seeds the first sampled token follows the target's own distribution (chi-square),
    although it is produced by multi-draft rejection sampling against a clearly different draft."""
    draft, target = tiny_pair
    sp = SamplingParams(temperature=1.0, top_k=20, top_p=0.95)
    prompt = "hello the world"
    with Model(target) as tm, Model(draft) as dm:
        toks = tm.tokenize(prompt)
        dists = []
        for m in (tm, dm):
            with Context(m, ContextParams(n_ctx=256)) as ctx, Batch(64) as b:
                dists.append(distribution(ctx.prefill(b, toks, logits=True), sp))
    p, q = dists
    tv_pq = 0.5 * np.abs(p - q).sum()
    assert tv_pq > 0.15  # a sampler that leaked the draft's choices would fail below
    n = 3000
    counts = np.zeros_like(p)
    accepted = 0
    params = TreeParams(max_nodes=6, max_depth=2, max_width=3, branch_p=0.05)
    with Engine(target, draft, mode="tree", tree_params=params, n_ctx=256) as e:
        e._debug_kv = True
        for seed in range(n):
            st = e.create_completion(prompt, max_tokens=2, temperature=1.0, top_k=20, top_p=0.95, min_p=0.0,
                                    seed=seed)["edgecad"]
            counts[st["token_ids"][0]] += 1
            accepted += st["accepted_tokens"] > 0
    assert 0.1 * n < accepted < 0.95 * n  # both accepted draws and residual samples were exercised
    expected = p * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    limit = dof + 4.0 * np.sqrt(2 * dof)  # ~ p < 0.001 for the chi-square with this many bins
    tv = 0.5 * np.abs(counts / n - p).sum()
    print(f"chi2 {chi2:.1f} (dof {dof}, limit {limit:.1f}), TV(empirical, target) {tv:.3f}, TV(draft, target) {tv_pq:.3f}")
    assert chi2 < limit and tv < 0.06
    assert counts[p == 0].sum() == 0  # never a token the target's top-k/top-p excludes


def test_rejection_sampling_is_exact_on_a_known_tree():
    """The output distribution of accept_sampling at the root, computed by Monte Carlo over its
    own randomness, equals the target distribution p for fixed draws from q."""
    p_logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    q = np.array([0.1, 0.2, 0.3, 0.4])
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    rng = np.random.default_rng(0)
    counts = np.zeros(4)
    n = 40000
    for _ in range(n):
        draws = list(rng.choice(4, size=2, p=q))
        t = TokenTree(4, root_token=0, root_pos=0)
        t.q[0] = q
        for x in draws:
            t.draws[0].append(int(x))
            if int(x) not in t.children[0]:
                t.add(0, int(x), q[x], 1)
        logits = np.tile(p_logits, (t.n, 1))
        path, bonus = accept_sampling(t, logits, sp, rng)
        counts[int(t.token[path[0]]) if path else bonus] += 1
    assert np.abs(counts / n - np.exp(p_logits)).max() < 0.01


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
    draft, target = tiny_pair
    with Engine(target, draft, mode="bild", n_ctx=512) as e:
        e._debug_kv = True
        st = e.create_completion("Once upon a time", temperature=0.0, max_tokens=60)["edgecad"]
    assert st["lossless"] is False and st["bild_divergent_tokens"] >= 0
    assert st["mean_accepted_per_pass"] > 1.0


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


def test_sampling_from_kept_chains_keeps_the_target_distribution(paging_pair, tmp_path):
    """With the pipeline, a tree can start from a chain the draft drew during the previous target pass.
    Among completions where that happened, the token verified from such a tree follows the target's own
    distribution given the tokens before it: pooled chi-square of observed against expected counts.
    The target drafts for itself here: with the tiny pair's draft a chain is rarely kept (its first token
    must equal the target's bonus), and the test is about the kept chain's KV, positions and draws."""
    from edgecad.gguf_file import read_gguf
    from edgecad.pager import PagerParams, plan_budget

    import shutil

    _, target = paging_pair
    draft = shutil.copy(target, tmp_path / "self-draft.gguf")  # a file of its own: the pager finds one mapping
    info = read_gguf(target)
    pp = PagerParams(io="demand", throttle_bps=100e6, embd_allowance=64 << 10)  # the target waits: chains get drafted
    budget = plan_budget(info, 10 ** 9, pp).minimum + 12 * max(l.n_bytes for l in info.layers())
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
    assert len(kept) >= 50, f"only {len(kept)} completions went through a kept chain"
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
    big = exp >= 5
    obs, exp = np.append(obs[big], obs[~big].sum()), np.append(exp[big], exp[~big].sum())
    if exp[-1] < 1e-9:
        obs, exp = obs[:-1], exp[:-1]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    limit = dof + 4.0 * np.sqrt(2 * dof)  # ~ p < 0.001
    print(f"{len(kept)} kept-chain completions: chi2 {chi2:.1f} (dof {dof}, limit {limit:.1f})")
    assert chi2 < limit
