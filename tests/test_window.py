"""Chats that outlive their context (edgecad.window): the oldest turns dropped, the system prompt and the last turns
kept, the kept turns' KV reused, the answers the target's own tokens; through the API and the server (real
llama.cpp on the tiny pair)."""
import math

import httpx
import pytest

from edgecad import Engine
from edgecad.errors import PromptTooLongError, RequestError
from edgecad.window import KEEP, turn_starts

from test_server import Served

N_CTX, MAX_TOKENS = 256, 8
SYSTEM = {"role": "system", "content": "You are brief."}


def question(i: int) -> dict:
    """A user message of ~50 tokens (the tiny vocabulary has few merges: about a token per byte)."""
    return {"role": "user", "content": f"question {i}: in an inner on the other hand, hello the world"}


def test_turn_starts():
    u, a, s, t = ({"role": r, "content": ""} for r in ("user", "assistant", "system", "tool"))
    assert turn_starts([s, s, u, a, u, a, t, a, u]) == [2, 4, 8]
    assert turn_starts([a, u, a]) == [0, 1]  # (a first message of another role opens the first turn)
    assert turn_starts([s]) == []


def test_a_chat_goes_on_past_its_context_with_the_last_turns_kept(tiny_pair):
    draft, target = tiny_pair
    with Engine(target, draft, mode="tree", n_ctx=N_CTX, memory_budget=None, context_overflow="drop_oldest") as e, \
            Engine(target, mode="target", n_ctx=N_CTX, memory_budget=None) as judge:
        messages, before, drops = [SYSTEM], None, 0
        for i in range(12):
            messages.append(question(i))
            r = e.create_chat_completion(messages, max_tokens=MAX_TOKENS, temperature=0)
            st = r["edgecad"]
            d = st["dropped_messages"]
            kept = [SYSTEM] + messages[1 + d:]
            # whole turns, the oldest first: the prompt is the system prompt and the last turns
            assert d % 2 == 0 and kept[1]["role"] == "user"
            assert st["prompt_tokens"] == len(judge.chat_tokens(kept)[0])
            assert st["prompt_tokens"] + MAX_TOKENS <= N_CTX
            if before is not None and d == before[0]:  # no new drop: the whole last prompt's KV is reused
                assert st["prompt_tokens_reused"] >= before[1] - 1
            elif d:  # a drop: down to KEEP of the context (one turn more would not be), the system prompt reused
                drops += 1
                assert st["prompt_tokens"] + MAX_TOKENS <= KEEP * N_CTX
                one_more = [SYSTEM] + messages[1 + d - 2:]
                assert len(judge.chat_tokens(one_more)[0]) + MAX_TOKENS > KEEP * N_CTX
                assert 0 < st["prompt_tokens_reused"] < st["prompt_tokens"]
            # the answer is the target's own greedy answer to the kept conversation
            assert st["token_ids"] == judge.create_chat_completion(kept, max_tokens=MAX_TOKENS, temperature=0)[
                "edgecad"]["token_ids"]
            before = (d, st["prompt_tokens"])
            messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
        assert drops >= 2 and len(judge.chat_tokens(messages)[0]) > 2 * N_CTX  # it outlived its context twice
        # by default (and asked per call) a chat longer than the context is refused, as a completion is
        with pytest.raises(PromptTooLongError, match="the context holds 256"):
            judge.create_chat_completion(messages + [question(99)], max_tokens=MAX_TOKENS)
        with pytest.raises(PromptTooLongError):
            e.create_chat_completion(messages + [question(99)], max_tokens=MAX_TOKENS, context_overflow="error")
        with pytest.raises(RequestError, match="context_overflow='shift' is not one of"):
            e.create_chat_completion(messages, context_overflow="shift")


def test_a_lone_question_longer_than_the_context_is_still_refused(tiny_target):
    with Engine(tiny_target, mode="target", n_ctx=N_CTX, memory_budget=None, context_overflow="drop_oldest") as e:
        long = [SYSTEM, question(0), {"role": "assistant", "content": "ok"}, {"role": "user", "content": "x" * 400}]
        with pytest.raises(PromptTooLongError):
            e.create_chat_completion(long, max_tokens=MAX_TOKENS)
        # and a conversation that continues from it drops the turns it must: the long question too
        r = e.create_chat_completion(long + [{"role": "assistant", "content": "no"}, question(1)],
                                     max_tokens=MAX_TOKENS, temperature=0)
        assert r["edgecad"]["dropped_messages"] == 4


def test_a_long_chat_is_fitted_in_a_few_renders(tiny_target):
    """2,000 turns past a 256-token context: where to start is a binary search over the turns (a render per step),
    not a render per dropped turn; the same turns are kept as one by one, and a call that goes on renders once."""
    with Engine(tiny_target, mode="target", n_ctx=N_CTX, memory_budget=None, context_overflow="drop_oldest") as e:
        window, renders = e._window, []
        formatter = window.formatter()

        def counted(**kw):
            renders.append(len(kw["messages"]))
            return formatter(**kw)

        window._formatter = counted
        messages = [SYSTEM]
        for i in range(2000):
            messages += [question(i), {"role": "assistant", "content": f"answer {i}"}]
        messages.append(question(2000))
        tokens, _, d = window.fit(messages, MAX_TOKENS, "drop_oldest")
        assert 0 < len(renders) <= 2 * math.ceil(math.log2(2001)) + 1
        # down to KEEP of the context, and one turn more would not be (as the turn-by-turn drop chose)
        kept = [SYSTEM] + messages[1 + d:]
        assert d % 2 == 0 and kept[1]["role"] == "user" and tokens == e.chat_tokens(kept)[0]
        assert len(tokens) + MAX_TOKENS <= KEEP * N_CTX
        assert len(e.chat_tokens([SYSTEM] + messages[1 + d - 2:])[0]) + MAX_TOKENS > KEEP * N_CTX
        renders.clear()
        more = messages + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]
        assert window.fit(more, MAX_TOKENS, "drop_oldest")[2] == d and len(renders) == 1
        assert max(renders) < 20  # (the kept turns only: the whole conversation is not rendered again)


def test_a_refused_request_leaves_where_a_chat_keeps_from(tiny_target):
    """A request refused for its arguments does not move where the chat keeps from: the chat's next call keeps the
    same turns and reuses its whole last prompt."""
    with Engine(tiny_target, mode="target", n_ctx=N_CTX, memory_budget=None, context_overflow="drop_oldest") as e:
        messages = [SYSTEM]
        for i in range(6):
            messages += [question(i), {"role": "assistant", "content": "ok"}]
        st = e.create_chat_completion(messages + [question(6)], max_tokens=MAX_TOKENS, temperature=0)["edgecad"]
        assert st["dropped_messages"] > 0
        for bad in ({"temperature": -1.0}, {"response_format": {"type": "xml"}}, {"logit_bias": {"x": 1}}):
            with pytest.raises(RequestError):
                e.create_chat_completion([SYSTEM, question(98), {"role": "assistant", "content": "ok"}, question(99)],
                                         max_tokens=MAX_TOKENS, **bad)
        # the chat goes on with a question that the kept turns still leave room for, past KEEP of the context
        messages += [question(6), {"role": "assistant", "content": "ok"}]
        kept = [SYSTEM] + messages[1 + st["dropped_messages"]:]
        n = next(n for n in range(1, 200)
                 if len(e.chat_tokens(kept + [{"role": "user", "content": "and " * n}])[0]) + MAX_TOKENS > KEEP * N_CTX)
        messages.append({"role": "user", "content": "and " * n})
        assert len(e.chat_tokens(kept + messages[-1:])[0]) + MAX_TOKENS <= N_CTX
        after = e.create_chat_completion(messages, max_tokens=MAX_TOKENS, temperature=0)["edgecad"]
        assert after["dropped_messages"] == st["dropped_messages"]
        assert after["prompt_tokens_reused"] >= st["prompt_tokens"] - 1


def test_the_server_drops_the_oldest_turns_when_told(tiny_target):
    s = Served("--target", tiny_target, "--mode", "target", "--n-ctx", N_CTX, "--context-overflow", "drop_oldest")
    try:
        messages = [SYSTEM]
        for i in range(10):
            messages.append(question(i))
            r = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                           json={"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            messages.append(body["choices"][0]["message"])
        assert body["edgecad"]["dropped_messages"] >= 2 and body["usage"]["prompt_tokens"] + MAX_TOKENS <= N_CTX
    finally:
        assert s.stop() == 0, s.log
