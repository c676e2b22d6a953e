"""Tool calling (edgecad.tools): the real server (tree mode, tiny models) driven by the openai client and by raw
server-sent events (httpx), and the Python API. The target carries Qwen2.5's own chat template (tiny.QWEN25),
which renders tools and asks for calls in the Hermes format; a template that does not render tools gets the
fallback. The tiny models' weights are random: "required" and a named function hold the answer to a call by a
grammar (so it parses whatever the weights), and a call in "auto" comes from the model because a request grammar
makes it write one (the parser does not know that)."""
import json

import httpx
import numpy as np
import openai
import pytest

from edgecad import Engine, tiny
from edgecad.errors import RequestError
from edgecad.grammar import Grammar
from edgecad.llama import Model
from edgecad.tools import HermesCalls, answer_grammar, tools_for

from test_server import Served

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, for the next days",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer"}}, "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                   "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
MODEL = "tiny-qwen"  # the server's name for its model
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# a conversation after a call: the assistant's call (arguments as OpenAI sends them: a JSON string), its result
AFTER = ASK + [{"role": "assistant", "content": None, "tool_calls": [{
    "id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21, \"sky\": \"clear\"}"}]


@pytest.fixture(scope="module")
def qwen_target(tiny_dir):
    """The tiny target (the draft's vocabulary and weights) with Qwen2.5's chat template."""
    return tiny.write_model(tiny_dir / "tiny-qwen-target.gguf", tiny.TINY_TARGET, name="edgecad-tiny-qwen-target",
                            chat_template=tiny.QWEN25)


@pytest.fixture(scope="module")
def server(qwen_target, tiny_draft):
    s = Served("--target", qwen_target, "--draft", tiny_draft, "--mode", "tree", "--n-ctx", 2048, "--alias", MODEL)
    yield s
    assert s.stop() == 0, s.log


def _valid(call: dict) -> dict:
    """A call's arguments, parsed, checked against its function's schema (tests' schemas: enums and integers)."""
    args = json.loads(call["arguments"])
    if call["name"] == "get_weather":
        assert args["city"] in ("Paris", "Rome") and isinstance(args["days"], int) and set(args) == {"city", "days"}
    else:
        assert call["name"] == "get_time" and args == {"zone": args["zone"]} and args["zone"] in ("UTC", "CET")
    return args


def _streamed_calls(chunks) -> dict:
    """The calls of an openai client's chat stream, their pieces joined by index."""
    calls = {}
    for ch in chunks:
        for c in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            have = calls.setdefault(c.index, {"id": c.id, "name": "", "arguments": ""})
            have["name"] += c.function.name or ""
            have["arguments"] += c.function.arguments or ""
    return calls


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_required_and_named_calls_parse_streamed_and_not(server, qwen_target, choice):
    """One call, in OpenAI's shape, arguments valid under the function's schema; the stream's call is the same
    call (greedy: the same tokens), and the tokens are the target's own greedy tokens under the grammar."""
    c = server.client()
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                  max_tokens=200, temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None and len(ch.message.tool_calls) == 1
    call = ch.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(choice, dict):
        assert call.function.name == "get_time"
    args = _valid(call.function.model_dump())
    chunks = list(c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                            max_tokens=200, temperature=0, stream=True))
    calls = _streamed_calls(chunks)
    assert list(calls) == [0] and calls[0]["id"].startswith("call_") and calls[0]["name"] == call.function.name
    assert json.loads(calls[0]["arguments"]) == args
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""
    with Engine(qwen_target, mode="target", n_ctx=2048, memory_budget=None) as e:  # the tree is lossless
        ref = e.create_chat_completion(ASK, tools=TOOLS, tool_choice=choice, max_tokens=200, temperature=0)
    assert r.model_extra["edgecad"]["token_ids"] == ref["edgecad"]["token_ids"]
    assert ref["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == call.function.arguments
    # log-probabilities of a call's tokens come with its chunk
    chunks = list(c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                            max_tokens=200, temperature=0, stream=True, logprobs=True))
    lps = [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert len(lps) == r.usage.completion_tokens and all(t.logprob <= 0 for t in lps)


CALL_GRAMMAR = ('root ::= "Let me look.\\n<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": '
                '{\\"city\\": \\"Rome\\", \\"days\\": " [1-9] "}}\\n</tool_call>"')


def test_auto_answers_freely_and_parses_the_calls_the_model_writes(server):
    """auto: a plain answer is content (no calls); an answer the model writes as text and a Hermes call (a request
    grammar makes the random weights write it) is content plus a tool call, streamed (raw events) and not."""
    c = server.client()
    r = c.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=16, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    r = server.post("/v1/chat/completions", {"messages": ASK, "tools": TOOLS, "tool_choice": "auto",
                                             "grammar": CALL_GRAMMAR, "max_tokens": 200, "temperature": 0})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    assert ch["finish_reason"] == "tool_calls" and ch["message"]["content"] == "Let me look."
    (call,) = ch["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and _valid(call["function"])["city"] == "Rome"
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "messages": ASK, "tools": TOOLS, "grammar": CALL_GRAMMAR, "max_tokens": 200, "temperature": 0,
            "stream": True}) as resp:
        data = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d)["choices"][0] for d in data[:-1]]
    assert events[0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["delta"].get("content") or "" for e in events) == "Let me look."
    deltas = [t for e in events for t in e["delta"].get("tool_calls") or []]
    assert len(deltas) == 1 and deltas[0]["index"] == 0 and deltas[0]["type"] == "function"
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"].startswith("call_")
    assert json.loads(deltas[0]["function"]["arguments"]) == json.loads(call["function"]["arguments"])
    assert events[-1]["finish_reason"] == "tool_calls" and events[-1]["delta"] == {}


def test_the_answer_after_a_tool_result(server, qwen_target):
    """The call and its result render as the template renders them (the call's arguments as an object, the result
    in a <tool_response> block), and the answer completes, streamed and not."""
    with Engine(qwen_target, mode="target", n_ctx=2048, memory_budget=None) as e:
        tokens, _ = e.chat_tokens(AFTER)
        prompt = e.detokenize(tokens, special=True).decode()
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
            in prompt)
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21, "sky": "clear"}\n</tool_response><|im_end|>' \
        in prompt and prompt.endswith("<|im_start|>assistant\n")
    c = server.client()
    r = c.chat.completions.create(model=MODEL, messages=AFTER, tools=TOOLS, max_tokens=12, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > len(tokens)  # (the tools listed too)
    chunks = list(c.chat.completions.create(model=MODEL, messages=AFTER, tools=TOOLS, max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content


def _refused(server, body: dict, param: str) -> str:
    r = server.post("/v1/chat/completions", {"messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert e["param"] == param and "\n" not in e["message"], e
    return e["message"]


def test_refusals_are_one_line_400s_naming_the_param(server):
    named = {"type": "function", "function": {"name": "get_stock"}}
    msg = _refused(server, {"tools": TOOLS, "tool_choice": named}, "tool_choice")
    assert "get_stock" in msg and "get_weather, get_time" in msg
    assert "not understood" in _refused(server, {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice")
    bare = {"type": "function", "function": "get_time"}  # (the function's name, not an object: was a 500)
    assert "not understood" in _refused(server, {"tools": TOOLS, "tool_choice": bare}, "tool_choice")
    assert "tools[0]" in _refused(server, {"tools": [{"type": "function"}]}, "tools")
    assert "tools[1]" in _refused(server, {"tools": [WEATHER, {"type": "code_interpreter"}]}, "tools")
    bad_name = {"type": "function", "function": {"name": "get weather!", "parameters": {}}}
    assert "letters, digits" in _refused(server, {"tools": [bad_name]}, "tools")
    bad_params = {"type": "function", "function": {"name": "f", "parameters": "none"}}
    assert "JSON schema" in _refused(server, {"tools": [bad_params]}, "tools")
    assert "twice" in _refused(server, {"tools": [WEATHER, WEATHER]}, "tools")
    assert "needs tools" in _refused(server, {"tool_choice": "required"}, "tools")
    assert "not both" in _refused(server, {"tools": TOOLS, "functions": [TIME["function"]]}, "functions")
    assert "grammar" in _refused(server, {"tools": TOOLS, "tool_choice": "required", "grammar": 'root ::= "a"'},
                                 "tool_choice")
    unknown_ref = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}}}
    assert "parameters of 'f'" in _refused(server, {"tools": [unknown_ref], "tool_choice": "required"}, "tools")
    huge = {"type": "function", "function": {"name": "f", "parameters": {  # (the converter wrote 10**9 copies)
        "type": "object", "properties": {"s": {"type": "string", "minLength": 10 ** 9}}}}}
    assert "minLength" in _refused(server, {"tools": [huge], "tool_choice": "required"}, "tools")
    many = [{"type": "function", "function": {"name": f"f{i}", "parameters": {  # (~20,000 characters each)
        "type": "array", "items": {"type": "integer"}, "minItems": 1000}}} for i in range(20)]
    assert "fewer or smaller functions" in _refused(server, {"tools": many, "tool_choice": "required"}, "tools")
    assert "maxItems" in _refused(server, {"response_format": {"type": "json_object", "schema": {
        "type": "array", "items": {"type": "integer"}, "maxItems": 10 ** 9}}}, "response_format")
    bad_call = ASK + [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}]
    assert "tool_calls[0]" in _refused(server, {"messages": bad_call, "tools": TOOLS}, "messages")
    with pytest.raises(openai.BadRequestError, match="get_stock"):
        server.client().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named)
    server.wait_for(r"^POST /v1/chat/completions 400 \(\d+\.\d+ s\): tool_choice names the function 'get_stock'")
    r = server.client().chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)  # and it goes on
    assert r.usage.completion_tokens == 2


def test_the_old_functions_form(server):
    """`functions` and `function_call` (OpenAI's older form) map onto tools, and the answer comes back in that
    form: message.function_call and finish_reason "function_call"."""
    r = server.post("/v1/chat/completions", {"messages": ASK, "functions": [WEATHER["function"], TIME["function"]],
                                             "function_call": {"name": "get_weather"}, "max_tokens": 200,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    assert ch["finish_reason"] == "function_call" and "tool_calls" not in ch["message"]
    assert ch["message"]["function_call"]["name"] == "get_weather" and _valid(ch["message"]["function_call"])
    msg = _refused(server, {"functions": [WEATHER["function"]], "function_call": {"name": "nope"}}, "function_call")
    assert "nope" in msg


def test_a_template_without_tools_gets_them_described(tiny_pair):
    """tiny's ChatML template ignores `tools`: they are described in the system message in the Hermes format, the
    conversation's calls and results become text, and a required call still parses (Python API, tree mode)."""
    draft, target = tiny_pair
    with Engine(target, draft, mode="tree", n_ctx=2048, memory_budget=None) as e:
        plain = e.detokenize(e.chat_tokens(AFTER)[0], special=True).decode()
        prompt = e.detokenize(e.chat_tokens([{"role": "system", "content": "Be brief."}, *AFTER],
                                            tools_for(TOOLS))[0], special=True).decode()
        assert "<tool_response>" in plain and "<tool_call>" in plain  # (the history as text without tools too)
        assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and "</tools>" in prompt
        assert json.dumps(WEATHER) in prompt and prompt.count("<|im_start|>system") == 1
        assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", ' \
               '"days": 2}}\n</tool_call><|im_end|>' in prompt
        assert "<|im_start|>user\n<tool_response>\n{\"temperature\": 21" in prompt
        r = e.create_chat_completion(ASK, tools=TOOLS, tool_choice="required", max_tokens=200, temperature=0)
        call = r["choices"][0]["message"]["tool_calls"][0]["function"]
        _valid(call)
        streamed = list(e.create_chat_completion(ASK, tools=TOOLS, tool_choice="required", max_tokens=200,
                                                 temperature=0, stream=True))
        deltas = [t for c in streamed for t in c["choices"][0]["delta"].get("tool_calls") or []]
        assert [d["function"] for d in deltas] == [call]
        with pytest.raises(RequestError, match="tool_choice"):
            e.create_chat_completion(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})


def test_the_hermes_parser_holds_back_what_may_begin_a_call():
    p = HermesCalls({"get_time"})
    assert p.feed("Sure. <tool") == ("Sure.", [])  # (a possible start of a call, and the space before it, wait)
    text, calls = p.feed('_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n')
    assert text == "" and calls[0]["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    assert p.feed("<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>", final=True) == \
        ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', [])  # (an unknown function stays text)
    p = HermesCalls({"get_time"})
    assert p.feed("a <b> c  ") == ("a <b> c", []) and p.feed("", final=True) == ("  ", [])
    p = HermesCalls({"get_time"})  # a call's JSON alone (no tags), as Qwen2.5-Coder-0.5B answers
    assert p.feed(' {"name": "get_time", ') == ("", []) and p.feed('"arguments": {}}') == ("", [])
    assert p.feed("\n", final=True)[1][0]["function"] == {"name": "get_time", "arguments": "{}"}
    p = HermesCalls({"get_time"})  # in a code fence, as Qwen2.5-Coder-1.5B answers
    assert p.feed('```json\n{\n  "name": "get_time",\n  "arguments": {"zone": "CET"}\n}\n') == ("", [])
    assert p.feed("```", final=True)[1][0]["function"] == {"name": "get_time", "arguments": '{"zone": "CET"}'}
    p = HermesCalls({"get_time"})  # an answer that begins as a call but is none: all of it at its end
    assert p.feed('{"name": "Bob"} is JSON') == ("", []) and p.feed(".", final=True) == ('{"name": "Bob"} is JSON.', [])
    p = HermesCalls({"get_time"})  # other answers stream at once (code, JSON that is no call)
    assert p.feed("``") == ("", []) and p.feed("`py") == ("```py", [])
    assert p.feed("thon\nx = 1\n") == ("thon\nx = 1", [])
    assert HermesCalls({"get_time"}).feed('{"a": 1}') == ('{"a": 1}', [])
    p = HermesCalls({"get_time"})  # a call whose closing tag never came, at the end of the answer
    assert p.feed('<tool_call>\n{"name": "get_time", "arguments": "{}"}', final=True)[1][0]["function"] == \
        {"name": "get_time", "arguments": "{}"}
    deep = "[" * 5000 + "]" * 5000  # deeper than Python's json reads (RecursionError): text, not a call
    assert HermesCalls({"get_time"}).feed(f"<tool_call>{deep}</tool_call>", final=True) == \
        (f"<tool_call>{deep}</tool_call>", [])
    for text in (f'<tool_call>{{"name": "get_time", "arguments": {json.dumps(deep)}}}</tool_call>',
                 f'{{"name": "get_time", "arguments": {deep}}}'):  # (arguments as a JSON string; no tags)
        assert HermesCalls({"get_time"}).feed(text, final=True) == (text, [])


def test_malformed_choices_calls_and_answers_in_the_python_api(tiny_pair):
    """The Python API (tiny's ChatML template: the fallback renders the calls as text): a tool_choice whose
    function is a bare name is a one-line refusal; arguments nested deeper than Python's json reads stay text, as
    arguments that are not JSON do, and an answer that is such a call is text (a grammar makes the random weights
    write it); functions nested that deep are a one-line refusal; an assistant message with calls and content
    parts, and a tool result in parts, have their text joined (as the server joins them)."""
    _, target = tiny_pair
    with Engine(target, mode="target", n_ctx=4096, memory_budget=None) as e:
        with pytest.raises(RequestError, match="not understood") as err:
            e.create_chat_completion(ASK, tools=TOOLS, tool_choice={"type": "function", "function": "get_time"})
        assert err.value.param == "tool_choice" and "\n" not in str(err.value)
        params = {"type": "object"}
        for _ in range(5000):
            params = {"type": "array", "items": params}
        with pytest.raises(RequestError, match=r"tools\[0\]\.function is not JSON"):
            e.create_chat_completion(ASK, tools=[{"type": "function", "function": {"name": "f", "parameters": params}}])
        deep = "[" * 1200
        call = {**AFTER[1]["tool_calls"][0], "function": {"name": "get_weather", "arguments": deep}}
        prompt = e.detokenize(e.chat_tokens([*ASK, {**AFTER[1], "tool_calls": [call]}, AFTER[2]],
                                            tools_for(TOOLS))[0], special=True).decode()
        assert f'"arguments": "{deep}"' in prompt
        out = e.create_chat_completion(ASK, tools=TOOLS, grammar='root ::= "<tool_call>\\n" "["{1200}',
                                       max_tokens=1300, temperature=0)
        ch = out["choices"][0]
        assert ch["message"]["content"] == "<tool_call>\n" + deep and "tool_calls" not in ch["message"]
        parts = [{"type": "text", "text": "Let me "}, {"type": "text", "text": "look."}]
        msgs = [*ASK, {**AFTER[1], "content": parts}, {**AFTER[2], "content": parts}]
        prompt = e.detokenize(e.chat_tokens(msgs, tools_for(TOOLS))[0], special=True).decode()
        assert "<|im_start|>assistant\nLet me look.\n<tool_call>\n{\"name\": \"get_weather\"" in prompt
        assert "<tool_response>\nLet me look.\n</tool_response>" in prompt
        image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
        with pytest.raises(RequestError, match="not text") as err:
            e.chat_tokens([*ASK, {**AFTER[1], "content": image}], tools_for(TOOLS))
        assert err.value.param == "messages"


SHARED_ID = [{"type": "function", "function": {"name": "by_name", "parameters": {
                 "type": "object", "properties": {"_id": {"type": "string", "enum": ["x"]}, "2fa": {"type": "null"}},
                 "required": ["_id", "2fa"]}}},
             {"type": "function", "function": {"name": "by_number", "parameters": {
                 "type": "object", "properties": {"_id": {"type": "integer"}, "2fa": {"type": "boolean"}},
                 "required": ["_id", "2fa"]}}}]


def _fits(call: dict) -> bool:
    args = json.loads(call["arguments"])
    if call["name"] == "by_number":
        return isinstance(args["_id"], int) and isinstance(args["2fa"], bool)
    return args == {"_id": "x", "2fa": None}


def test_required_calls_keep_each_function_s_own_rules(qwen_target):
    """Two functions with properties of the same names, which the converter names as rules beginning with "-" or
    a digit (`_id` -> `-id-kv`, `2fa` -> `2fa-kv`): under "required" each call is held to its own function's
    schema (llama.cpp's grammar, fed the call's tokens), also as the model answers (the tiny model calls the first
    function, whose rules the second's had replaced)."""
    gbnf = answer_grammar(tools_for(SHARED_ID, "required"), None, None)
    with Model(qwen_target) as m:
        eos = m.special_tokens()[1]

        def takes(text: str) -> bool:
            g = Grammar(m, gbnf)
            try:
                for t in m.tokenize(text, add_special=False, parse_special=False):
                    if not g.allowed(np.array([t], dtype=np.int32))[0]:
                        return False
                    g.accept(t)
                return bool(g.allowed(np.array([eos], dtype=np.int32))[0])  # (complete: it may end here)
            finally:
                g.close()

        call = '<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>'
        assert takes(call % ("by_number", '{"_id": 7, "2fa": true}'))
        assert takes(call % ("by_name", '{"_id": "x", "2fa": null}'))
        assert not takes(call % ("by_number", '{"_id": "x", "2fa": null}'))
        assert not takes(call % ("by_name", '{"_id": 7, "2fa": true}'))
    with Engine(qwen_target, mode="target", n_ctx=2048, memory_budget=None) as e:
        r = e.create_chat_completion(ASK, tools=SHARED_ID, tool_choice="required", max_tokens=100, temperature=0)
    (c,) = r["choices"][0]["message"]["tool_calls"]
    assert c["function"]["name"] == "by_name" and _fits(c["function"]), c
