"""The sampling distribution and draws from it."""
import numpy as np

from edgecad.sampling import SamplingParams, distribution, pick, sample_from
from helpers import chi_square


def test_distribution_filters():
    logits = np.array([5.0, 4.0, 3.0, 0.0, -1.0, 2.0])
    p = distribution(logits, SamplingParams(temperature=1.0, top_k=3, top_p=1.0))
    assert np.isclose(p.sum(), 1) and set(np.nonzero(p)[0]) == {0, 1, 2}
    full = np.exp(logits[:3] - 5) / np.exp(logits[:3] - 5).sum()
    assert np.allclose(p[:3], full)
    q = distribution(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.7))
    assert set(np.nonzero(q)[0]) == {0, 1}  # the smallest set with mass >= 0.7
    hot = distribution(logits, SamplingParams(temperature=10.0, top_k=0, top_p=1.0))
    cold = distribution(logits, SamplingParams(temperature=0.1, top_k=0, top_p=1.0))
    assert hot.max() < p.max() < cold.max()


def test_greedy_pick_is_argmax():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert pick(logits, SamplingParams(), np.random.default_rng(0)) == int(np.argmax(logits))


def test_draws_follow_the_distribution():
    p = np.array([0.5, 0.25, 0.125, 0.125, 0.0])
    rng = np.random.default_rng(1)
    counts = np.bincount([sample_from(p, rng) for _ in range(8000)], minlength=5)
    assert counts[4] == 0
    chi_square(counts, p * 8000, tv=0.03)


def test_the_sampling_arguments_are_declared_once():
    """edgecad.arguments.SAMPLING names each SamplingParams field once, and each is a keyword of both public
    methods (whose signatures are llama-cpp-python's: the one place besides the declaration a new one goes)."""
    import inspect
    from dataclasses import fields

    from edgecad import Engine
    from edgecad.arguments import SAMPLING
    names = [a.name for a in SAMPLING]
    assert sorted(names) == sorted(f.name for f in fields(SamplingParams))
    for method in (Engine.create_completion, Engine.create_chat_completion):
        assert set(names) <= set(inspect.signature(method).parameters), method


# ---------------------------------------------------------------------------- Llama's arguments, in every mode
# Greedy: each argument gives llama_cpp.Llama's own tokens on the same (F32, exact) model, in target, tree and
# linear modes, resident and paged: in a tree each node's logits go through the chain with its own path.

import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
from llama_cpp import Llama, LlamaGrammar, LogitsProcessorList  # noqa: E402

from edgecad import Engine  # noqa: E402
from edgecad.errors import RequestError  # noqa: E402
from helpers import PROMPTS  # noqa: E402

DIGITS = 'root ::= "[" [0-9]+ ("," [0-9]+)* "]"'
ARGS = {
    "logit_bias": dict(logit_bias={"97": 4.0, "101": -100.0, "32": 2.5}),
    "frequency_penalty": dict(frequency_penalty=1.5),
    "presence_penalty": dict(presence_penalty=2.0, repeat_penalty=1.2),
    "grammar": dict(grammar=DIGITS),
    "json": dict(grammar="json"),
}


def _grammar(args) -> dict:
    """The arguments with `grammar` as llama-cpp-python's LlamaGrammar ("json": its JSON grammar)."""
    from llama_cpp import llama_grammar
    kw = dict(args)
    if "grammar" in kw:
        kw["grammar"] = LlamaGrammar.from_string(llama_grammar.JSON_GBNF if kw["grammar"] == "json"
                                                 else kw["grammar"], verbose=False)
    return kw


def _theirs(llama, tokens, args, n=24) -> list[int]:
    """Llama's greedy tokens with these arguments (logit_bias as its create_completion applies it: a logits
    processor), up to n or an end of generation. (Its create_completion's text is not compared: on the tiny
    byte-level vocabulary it runs past max_tokens while it holds back partial UTF-8.)"""
    kw = _grammar(args)
    if "logit_bias" in kw:
        bias = {int(k): v for k, v in kw.pop("logit_bias").items()}

        def add_bias(ids, scores):
            out = np.copy(scores)
            for t, b in bias.items():
                out[t] = b + scores[t]
            return out
        kw["logits_processor"] = LogitsProcessorList([add_bias])
    llama.reset()
    out = []
    for t in itertools.islice(llama.generate(tokens, temp=0.0, **kw), n):
        out.append(t)
        if llama.token_eos() == t or t == llama.tokenize(b"<|im_end|>", add_bos=False, special=True)[0]:
            break
    return out


@pytest.mark.parametrize("mode,paged", [("target", False), ("tree", False), ("linear", False), ("tree", True),
                                        ("target", True)], ids=["target", "tree", "linear", "tree-paged",
                                                                "target-paged"])
def test_each_argument_gives_llama_s_greedy_tokens(request, mode, paged):
    draft, target = request.getfixturevalue("paging_pair" if paged else "tiny_pair")
    llama = Llama(str(target), n_ctx=512, n_threads=2, verbose=False)
    budget = {"target_budget": "50%"} if paged else {}
    with Engine(target, None if mode == "target" else draft, mode=mode, n_ctx=512, memory_budget=None,
                **budget) as e:
        assert e.memory_plan.paged == paged
        for name, args in ARGS.items():
            changed = 0
            for prompt in PROMPTS[:3]:
                plain = e.create_completion(prompt, max_tokens=24, temperature=0.0)
                ours = e.create_completion(prompt, max_tokens=24, temperature=0.0, **_grammar(args))
                theirs = _theirs(llama, e.tokenize(prompt, special=True), args)
                assert ours["edgecad"]["token_ids"] == theirs, (name, prompt)
                changed += ours["edgecad"]["token_ids"] != plain["edgecad"]["token_ids"]
                if name == "grammar":
                    text = ours["choices"][0]["text"]
                    assert text.startswith("[") and set(text) <= set("[],0123456789")
            assert changed, f"{name} changed no output: the test cannot tell it from no-op"


def test_json_mode_and_a_schema_give_output_that_parses(tiny_pair):
    draft, target = tiny_pair
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "n": {"type": "integer"}}, "required": ["name", "n"]}
    msgs = [{"role": "user", "content": "a person as JSON"}]
    with Engine(target, draft, mode="tree", n_ctx=512, memory_budget=None) as e:
        for fmt, check in (({"type": "json_object"}, lambda v: isinstance(v, dict)),
                           ({"type": "json_object", "schema": schema}, lambda v: set(v) >= {"name", "n"}
                            and isinstance(v["n"], int) and len(v["name"]) <= 6),
                           ({"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
                            lambda v: set(v) >= {"name", "n"})):
            tries, parsed = 4, 0
            for seed in range(tries):
                r = e.create_chat_completion(msgs, response_format=fmt, max_tokens=200, temperature=0.8, seed=seed)
                if r["choices"][0]["finish_reason"] == "length":
                    assert r["usage"]["completion_tokens"] == 200
                    continue  # cut by max_tokens: said, and nothing to parse
                assert check(json.loads(r["choices"][0]["message"]["content"])), r["choices"][0]
                parsed += 1
            # at least half the tries (and one) end by themselves and parse: cut outputs alone cannot pass
            assert parsed >= max(1, -(-tries // 2)), f"{fmt}: only {parsed} of {tries} outputs ended and parsed"
        with pytest.raises(RequestError, match="response_format"):
            e.create_chat_completion(msgs, response_format={"type": "xml"})
        with pytest.raises(RequestError, match="grammar does not parse"):
            e.create_completion("x", grammar="root ::= [a-")
        with pytest.raises(RequestError, match="vocabulary"):
            e.create_completion("x", logit_bias={"99999": 1.0})


def test_sampling_with_a_grammar_keeps_the_constrained_distribution(tiny_pair):
    """First token under a grammar, sampled in tree mode, against the target's masked distribution."""
    from edgecad.grammar import Grammar
    from edgecad.llama import Batch, Context, ContextParams, Model
    from edgecad.sampling import distribution, processed
    from helpers import chi_square

    draft, target = tiny_pair
    grammar = 'root ::= [a-h] [a-z]*'
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, grammar=grammar)
    prompt = "Once upon a"
    with Model(target) as m, Context(m, ContextParams(n_ctx=64)) as ctx, Batch(64) as b:
        toks = m.tokenize(prompt, add_special=True, parse_special=True)
        p = distribution(processed(ctx.prefill(b, toks, logits=True), [], sp, Grammar(m, grammar)), sp)
        allowed = [m.token_to_piece(int(t)).decode() for t in np.nonzero(p > 0)[0]]
    assert len(allowed) > 8 and all(re.fullmatch("[a-h][a-z]*", t) for t in allowed), allowed
    n = 2500
    with Engine(target, draft, mode="tree", n_ctx=64, memory_budget=None, seed=0) as e:
        firsts = [e.create_completion(prompt, max_tokens=1, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                      grammar=grammar)["edgecad"]["token_ids"][0] for _ in range(n)]
    counts = np.bincount(firsts, minlength=len(p))
    keep = p > 0
    chi_square(counts[keep], p[keep] * n, tv=0.08)


@pytest.mark.parametrize("mode", ["target", "tree", "linear"])
def test_logprobs_and_echo_as_llama_gives_them(tiny_pair, mode):
    """logprobs: each emitted token's log-probability and the top alternatives, from the row of target logits
    that gave it (a tree's rows are batched: equal within float32 noise); echo prepends the prompt."""
    draft, target = tiny_pair
    llama = Llama(str(target), n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    with Engine(target, None if mode == "target" else draft, mode=mode, n_ctx=512, memory_budget=None) as e:
        for prompt in PROMPTS[:3]:
            llama.reset()
            theirs = llama.create_completion(prompt, max_tokens=12, temperature=0.0, logprobs=3)["choices"][0]
            ours = e.create_completion(prompt, max_tokens=12, temperature=0.0, logprobs=3)
            lp, tlp = ours["choices"][0]["logprobs"], theirs["logprobs"]
            n = len(ours["edgecad"]["token_ids"])
            assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
            k = min(n, len(tlp["token_logprobs"]))
            assert k >= 8 and np.allclose(lp["token_logprobs"][:k], tlp["token_logprobs"][:k], atol=1e-3)
            for a, b in zip(lp["top_logprobs"][:k], tlp["top_logprobs"][:k]):  # (texts of partial UTF-8 collide)
                assert a.keys() == b.keys() and np.allclose([a[t] for t in b], list(b.values()), atol=1e-3)
            assert lp["text_offset"][0] == len(prompt)
            echoed = e.create_completion(prompt, max_tokens=12, temperature=0.0, echo=True)
            assert echoed["choices"][0]["text"] == prompt + ours["choices"][0]["text"]
            streamed = "".join(c["choices"][0]["text"] for c in
                               e.create_completion(prompt, max_tokens=12, temperature=0.0, echo=True, stream=True))
            assert streamed == echoed["choices"][0]["text"]
        chat = e.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=6, temperature=0.0,
                                        logprobs=True, top_logprobs=2)
        content = chat["choices"][0]["logprobs"]["content"]
        assert len(content) == chat["usage"]["completion_tokens"]
        assert all(c["logprob"] <= 0 and 1 <= len(c["top_logprobs"]) <= 3 for c in content)  # 2 and its own
        with pytest.raises(RequestError, match="echo"):
            e.create_completion("x", echo=True, logprobs=2)


@pytest.mark.parametrize("mode", ["target", "tree"])
def test_arguments_that_fight_the_grammar_give_errors_or_its_tokens_never_an_abort(tiny_pair, mode):
    """llama.cpp aborts the process when a grammar takes a token it forbids: a bias against the only token the
    grammar allows still gives that token; values that would make logits infinite are refused."""
    draft, target = tiny_pair
    with Engine(target, draft if mode == "tree" else None, mode=mode, n_ctx=128, memory_budget=None) as e:
        x = e.tokenize("x", add_bos=False)[0]
        out = e.create_completion("hello", grammar='root ::= "x"', logit_bias={x: -1e6}, temperature=0,
                                  max_tokens=4)
        assert out["edgecad"]["token_ids"][0] == x and out["choices"][0]["text"] == "x"
        for kw, name in ((dict(logit_bias={x: 1e39}), "logit_bias"), (dict(repeat_penalty=1e-39), "repeat_penalty"),
                         (dict(presence_penalty=float("nan")), "presence_penalty")):
            with pytest.raises(RequestError, match=name):
                e.create_completion("hello", grammar='root ::= "x"', temperature=0, **kw)
        with pytest.raises(RequestError, match="response_format"):
            e.create_chat_completion([{"role": "user", "content": "hi"}],
                                     response_format={"type": "json_schema", "json_schema": "x"})


# ---------------------------------------------------------------------------- the grammar with the pipeline
# A paged tree drafts chains beside its passes (edgecad.pipeline) and the next tree may start from one: the
# grammar must hold there as everywhere (the chain's tokens and its distributions become the next tree's nodes).

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}  # a JSON schema (as response_format gives one; its grammar by llama-cpp-python)


def _check_tree_against_grammar(tree, grammar) -> int:
    """Assert that every node of `tree` is a token `grammar` (in its state after the root) allows after the
    node's path: each parent's state cloned and advanced by the node's token. Returns the nodes checked."""
    states = {0: grammar.clone()}
    for i in range(1, tree.n):  # (a parent is always added before its children)
        par, tok = int(tree.parent[i]), int(tree.token[i])
        path = [int(tree.token[j]) for j in tree.path(i)]
        assert states[par].allowed(np.array([tok], dtype=np.int32))[0], (
            f"node {i} (depth {tree.depth[i]}, token {tok}) is forbidden by the grammar after its path {path}")
        states[i] = states[par].clone()
        states[i].accept(tok)
    return tree.n - 1


@pytest.mark.parametrize("chains", [False, True], ids=["trees", "kept-chains"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize("text", ["digits", "schema"])
def test_every_drafted_node_is_allowed_by_the_grammar_after_its_path(tiny_pair, text, greedy, chains):
    """The drafter masks each node's draft distribution with the grammar's state after the node's path, so no
    node of a tree is a token the grammar forbids there; with the pipeline's chains too (kept-chains: after
    each tree a chain is drafted past its best leaf, as Pipeline.verify does beside the target's pass, and the
    simulated target takes that branch and the chain's first token whenever the grammar allows it, so the next
    tree starts from the chain: its tokens and distributions become the next tree's nodes). It failed before
    the chains were masked: the chain's unmasked tokens, and alternatives drawn from its unmasked distributions,
    were nodes of the next tree."""
    from llama_cpp import llama_grammar

    from edgecad.drafter import Drafter
    from edgecad.grammar import Grammar
    from edgecad.llama import Context, ContextParams, Model
    from edgecad.pipeline import draft_chain
    from edgecad.tree import TreeParams

    draft, _ = tiny_pair
    gbnf = DIGITS if text == "digits" else llama_grammar.json_schema_to_gbnf(json.dumps(PERSON))
    params = TreeParams(max_nodes=16, max_depth=5, max_width=3, branch_p=0.05, threshold_init=0.0, cost_aware=False)
    sp = SamplingParams() if greedy else SamplingParams(temperature=1.0, top_k=20, top_p=1.0)
    rng = np.random.default_rng(0)
    trees = checked = seeded = 0
    with Model(draft) as m, Context(m, ContextParams(n_ctx=512, n_seq_max=33, n_threads=1)) as ctx:
        d = Drafter(ctx, params, n_seq_max=33, n_batch=64)
        anything = np.arange(m.n_vocab, dtype=np.int32)
        for prompt in itertools.cycle(PROMPTS):  # completions, each until the grammar ends it, 40 trees in all
            grammar = Grammar(m, gbnf)  # the completion's: in its state after the root (the prompt is not under it)
            d.start(m.tokenize(prompt))
            while trees < 40:
                reused = d.reused_tokens
                tree = d.draft(16, 5, sp, rng, threshold=0.0, grammar=grammar)
                trees += 1
                checked += _check_tree_against_grammar(tree, grammar)
                seeded += d.reused_tokens > reused  # this tree started from a kept chain
                chain = draft_chain(d, tree, sp, rng, 6, lambda: False) if chains else None
                leaf = chain.leaf if chain else max(tree.leaves(), key=lambda i: tree.conf[i])
                path = tree.path(leaf)
                state = grammar.clone()
                for i in path:
                    state.accept(int(tree.token[i]))
                ok = [int(t) for t in np.flatnonzero(state.allowed(anything)) if not m.is_eog(int(t))]
                if any(m.is_eog(int(tree.token[i])) for i in path) or not ok:
                    break  # the completion ends here
                # the target's bonus: the chain's first token where the grammar allows it (the chain is kept)
                bonus = chain.tokens[0] if chain and chain.tokens[0] in ok else int(rng.choice(ok))
                for tok in [int(tree.token[i]) for i in path] + [bonus]:
                    grammar.accept(tok)
                d.accept(tree, path, bonus, chain)
            if trees == 40:
                break
        d.close()
    print(f"{checked} nodes in {trees} trees, {seeded} of them started from a kept chain")
    assert checked >= 2 * trees
    if chains:
        assert seeded >= 5, f"only {seeded} of {trees} trees started from a kept chain"


@pytest.mark.parametrize("mode", ["tree", "linear"])
def test_a_grammar_with_the_pipeline_gives_llama_s_greedy_tokens(paging_pair, mode):
    """A paged target on throttled storage with the pipeline on: chains are drafted beside each pass and later
    trees start from them (reused_tokens > 0 under each grammar, so the kept chains did take part), and the
    greedy tokens under a grammar are llama_cpp.Llama's under the same grammar on the same (F32, exact) model."""
    from edgecad.plan import PagerParams

    draft, target = paging_pair
    llama = Llama(str(target), n_ctx=512, n_threads=1, verbose=False)  # (one thread each: fast on a loaded machine)
    pager = PagerParams(io="demand", throttle_bps=50e6, embd_allowance=64 << 10)  # passes wait on storage
    with Engine(target, draft, mode=mode, n_ctx=512, n_threads=1, target_budget="50%", pager=pager,
                pipeline=True) as e:
        assert e.memory_plan.paged and e.pipeline
        e.check_kv = True  # after every step: both KV caches hold only the accepted path (and a kept chain)
        for name in ("grammar", "json"):
            reused = chains = 0
            for prompt in PROMPTS[:3]:
                st = e.create_completion(prompt, max_tokens=24, temperature=0.0, **_grammar(ARGS[name]))["edgecad"]
                assert st["token_ids"] == _theirs(llama, e.tokenize(prompt, special=True), ARGS[name]), (name, prompt)
                reused, chains = reused + st["reused_tokens"], chains + st["chain_tokens"]
            print(f"{mode} {name}: {chains} chain tokens drafted beside passes, {reused} reused by later trees")
            assert reused > 0, f"{name}: no tree started from a kept chain ({chains} chain tokens drafted)"


def test_sampling_with_a_grammar_and_kept_chains_keeps_the_masked_distribution(paging_pair):
    """The first two tokens the grammar leaves free, sampled with the pipeline on, against the target's masked
    joint distribution computed exactly. The grammar forces "x" first, so the first tree (one node: "x") is
    taken whole: the next token is the bonus after a depth-1 node (that node's row, the grammar advanced along
    the path), drawn while a chain (two draft tokens, masked) is drafted past "x"; when the bonus is the chain's
    first token, the next tree starts from the chain and the token after is verified against the chain's second
    draw and its distribution (multi-draft rejection sampling). The draft differs from the target there (TV
    > 0.2), so a sampler that leaked the chain's draws or used a distribution other than the one they were drawn
    from fails."""
    from edgecad.gguf_file import read_gguf
    from edgecad.grammar import Grammar
    from edgecad.llama import Batch, Context, ContextParams, Model
    from edgecad.measure import paging_plan
    from edgecad.plan import PagerParams
    from edgecad.sampling import distribution, processed
    from edgecad.tree import TreeParams

    draft, target = paging_pair
    gbnf = 'root ::= "x" [a-z]+'
    kw = dict(temperature=2.0, top_k=4, top_p=1.0, min_p=0.0)
    sp = SamplingParams(**kw, grammar=gbnf)
    prompt, n = "Once upon a time", 1000

    def masked(m, ctx, b, toks, path):  # the model's distribution after prompt + path, masked by the grammar
        g = Grammar(m, gbnf)
        for t in path:
            g.accept(t)
        return distribution(processed(ctx.prefill(b, toks + path, logits=True), path, sp, g), sp)

    with Model(target) as tm, Model(draft) as dm, Context(tm, ContextParams(n_ctx=64, n_threads=1)) as tc, \
            Context(dm, ContextParams(n_ctx=64, n_threads=1)) as dc, Batch(64) as b:
        toks, x = tm.tokenize(prompt), tm.tokenize("x", add_special=False)[0]
        p2 = masked(tm, tc, b, toks, [x])
        support = [int(t) for t in np.flatnonzero(p2)]
        p3 = {t: masked(tm, tc, b, toks, [x, t]) for t in support}
        q3 = {t: masked(dm, dc, b, toks, [x, t]) for t in support}
    assert len(support) == 4 and sum(p2[t] * 0.5 * np.abs(p3[t] - q3[t]).sum() for t in support) > 0.2
    cells = [(a, int(c)) for a in support for c in np.flatnonzero(p3[a])]  # the joint's support
    expected = np.array([p2[a] * p3[a][c] for a, c in cells]) * n

    info = read_gguf(target)
    pager = PagerParams(io="demand", throttle_bps=200e6, embd_allowance=64 << 10)  # 4 streamed layers: passes wait
    budget = paging_plan(info, 10 ** 9, pager).minimum + 12 * max(l.n_bytes for l in info.layers())
    observed, kept = dict.fromkeys(cells, 0), 0
    with Engine(target, draft, mode="tree", tree_params=TreeParams(max_nodes=1, max_depth=1, max_width=1),
                n_ctx=256, n_threads=1, target_budget=budget, pager=pager, pipeline=True) as e:
        assert e.pipeline
        e.check_kv = True
        for seed in range(n):  # (4 tokens: the first pass drafts a chain of two only when two more are wanted)
            st = e.create_completion(prompt, max_tokens=4, seed=seed, grammar=gbnf, **kw)["edgecad"]
            t1, t2, t3 = st["token_ids"][:3]
            assert t1 == x and (t2, t3) in observed, st["token_ids"]
            observed[(t2, t3)] += 1
            kept += st["reused_tokens"] > 0  # the tree that verified t3 started from the chain
    assert kept > 0.3 * n, f"only {kept} of {n} completions verified their third token in a kept chain's tree"
    print(f"{kept} of {n} through a kept chain:",
          chi_square([observed[c] for c in cells], expected, tv=0.12))
