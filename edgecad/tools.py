"""Tool calling: OpenAI's `tools`, `tool_choice` and `tool` role (and the old `functions` / `function_call`), over
the model's own chat template, in the Hermes format.

The request's tools are checked into a `Tools` value (a refusal names the argument). The GGUF's chat template
renders them (`render`): Qwen2.5's lists them in its system turn and asks for each call as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, and renders earlier calls and `tool` results
itself. A template that ignores tools (its prompt is the same with them and without) gets them described in the
system message in that same format instead, and the conversation's calls and results as text (`<tool_call>`
blocks in the assistant's turn, `<tool_response>` blocks in a user turn). With tool_choice "required" or a named
function, the answer is constrained by a grammar (`answer_grammar`: one call, its arguments valid under the
function's JSON schema through llama-cpp-python's converter), so the call parses; with "auto" the model answers
freely and a call it writes is parsed if it is well formed (else it stays text). `tool_chunks` turns a chat's
chunk stream into OpenAI's shapes: content deltas (text that may begin a call held back), a `tool_calls` delta
per call (id, type "function", function name, arguments as a JSON string, its index) and finish_reason
"tool_calls"; a request in the old form gets `function_call` and "function_call".
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from .arguments import chat_prompt, text_message
from .errors import RequestError
from .gbnf import MAX_LENGTH, check as check_grammar
from .responses import held_back, response_format_grammar, schema_grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"  # the Hermes format's call tags (Qwen2.5's template asks for them)
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name
# json.loads's failures on text from outside: not JSON, or JSON nested deeper than Python's recursion limit
# ("[" * 5000: RecursionError, no ValueError); both mean the text is no JSON we can read
_UNREADABLE = (ValueError, RecursionError)


@dataclass(frozen=True)
class Tools:
    """A chat request's tools, checked."""
    functions: tuple = ()  # OpenAI's function objects ({"name", "description", "parameters"}), in request order
    choice: str = "none"  # "auto", "none", "required", or the name of the one function to call
    old_form: bool = False  # the request used `functions`: the answer is message.function_call, as OpenAI's was

    @property
    def names(self) -> set:
        return {f["name"] for f in self.functions}

    def special_tokens(self, model) -> tuple:
        """The tokens the answer's text keeps although they are control tokens: a call's tags where the vocabulary
        has them as one token (Qwen2.5's <tool_call>, as llama.cpp's server preserves them), when calls may come."""
        if self.choice == "none":
            return ()
        ids = [model.tokenize(tag.encode(), add_special=False, parse_special=True) for tag in (OPEN, CLOSE)]
        return tuple(t[0] for t in ids if len(t) == 1)

    @property
    def listed(self) -> list:
        """The tools as the template gets them (none for tool_choice "none": the answer cannot call them)."""
        return [] if self.choice == "none" else [{"type": "function", "function": f} for f in self.functions]


NO_TOOLS = Tools()


def tools_for(tools=None, tool_choice=None, functions=None, function_call=None) -> Tools:
    """The request's tools checked (each refusal one line naming the argument), the old form mapped onto them."""
    if tools and functions:
        raise RequestError("give `tools` or the older `functions`, not both", "functions")
    old = not tools and bool(functions)
    param, choice_param = ("functions", "function_call") if old else ("tools", "tool_choice")
    listed = functions if old else [_tool(t, i) for i, t in enumerate(_list(tools, "tools"))]
    fns = tuple(_function(f, i, param) for i, f in enumerate(_list(listed, param)))
    names = [f["name"] for f in fns]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise RequestError(f"{param} name the function {dup!r} twice: give each function once", param)
    choice = function_call if old else tool_choice
    choices = '"auto", "none", ' + ('' if old else '"required", ')
    if choice is None or (choice == "auto" and not fns):
        return Tools(fns, "auto" if fns else "none", old)
    if isinstance(choice, dict):
        fn = choice.get("function")  # (a name alone, not {"name": ...}, is not understood)
        name = choice.get("name") if old else fn.get("name") if isinstance(fn, dict) else None
        if (not old and choice.get("type") != "function") or not isinstance(name, str):
            form = '{"name": NAME}' if old else '{"type": "function", "function": {"name": NAME}}'
            raise RequestError(f"{choice_param}={_short(choice)} is not understood: give {choices}or {form}",
                               choice_param)
        if name not in names:
            raise RequestError(f"{choice_param} names the function {name!r}, which is not in {param} "
                               f"({', '.join(names) or 'none given'})", choice_param)
        return Tools(fns, name, old)
    if choice not in ("auto", "none", "required") or (old and choice == "required"):
        raise RequestError(f"{choice_param}={_short(choice)} is not understood: give {choices}or a function by "
                           "name", choice_param)
    if choice == "required" and not fns:
        raise RequestError('tool_choice="required" needs tools: give the functions the answer may call', "tools")
    return Tools(fns, choice, old)


def _list(x, param: str) -> list:
    if x is None:
        return []
    if not isinstance(x, (list, tuple)):
        raise RequestError(f"{param} must be a list of {'tools' if param == 'tools' else 'functions'}", param)
    return list(x)


def _tool(t, i: int) -> dict:
    """tools[i]'s function: OpenAI's {"type": "function", "function": {...}}."""
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
        raise RequestError(f"tools[{i}] is {_short(t)}: give {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                           "\"parameters\": {...}}}}", "tools")
    return t["function"]


def _function(f, i: int, param: str) -> dict:
    """A function object checked: a name as OpenAI allows it, a text description, parameters a JSON schema."""
    where = f"{param}[{i}]" + (".function" if param == "tools" else "")
    if not isinstance(f, dict):
        raise RequestError(f"{where} must be an object with a name and parameters", param)
    name, params, desc = f.get("name"), f.get("parameters"), f.get("description")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RequestError(f"{where}.name is {_short(name)}: give 1 to 64 letters, digits, _ or -", param)
    if params is not None and not isinstance(params, dict):
        raise RequestError(f"{where}.parameters must be a JSON schema (an object)", param)
    if desc is not None and not isinstance(desc, str):
        raise RequestError(f"{where}.description must be text", param)
    try:
        json.dumps(f)
    except (TypeError, ValueError, RecursionError) as e:  # (the Python API's objects, cycles, deep nesting)
        raise RequestError(f"{where} is not JSON: {e}", param) from None
    return f


def _short(x) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


# ---------------------------------------------------------------------------- the prompt

def render(formatter, messages: Sequence[dict], tools: Tools) -> tuple[str, bool, list[str]]:
    """The conversation rendered by the model's chat template with its tools (arguments.chat_prompt's result):
    the template's own rendering where it renders tools and the conversation's calls and results, else the
    fallback (the tools described in the system message, calls and results as text, in the Hermes format)."""
    msgs = [_for_template(m, i) for i, m in enumerate(messages)]
    listed = tools.listed
    try:
        out = chat_prompt(formatter, msgs, tools=listed or None)
        native = (not listed or out[0] != chat_prompt(formatter, msgs)[0]) and _history_shown(out[0], msgs)
    except RequestError:  # (a template that refuses the `tool` role, say: the fallback may pass)
        native = False
    if native:
        return out
    return chat_prompt(formatter, _described(_as_text(msgs), listed))


def _for_template(m, i: int) -> dict:
    """A message as chat templates take it: a call's arguments as an object (templates write them with tojson),
    the old form's function_call and `function` role as a tool call and a `tool` result."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise RequestError(f"messages[{i}] has no role: give each message a \"role\" (system, user, assistant, "
                           "tool)", "messages")
    calls = m.get("tool_calls")
    if m.get("function_call") and not calls:
        calls = [{"id": "call_0", "type": "function", "function": m["function_call"]}]
    if m["role"] == "function":
        m = {**m, "role": "tool"}
    if not calls:
        return m
    if not isinstance(calls, list):
        raise RequestError(f"messages[{i}].tool_calls must be a list of calls", "messages")
    out = []
    for k, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"messages[{i}].tool_calls[{k}] has no function name: give {{\"id\": ..., \"type\": "
                               "\"function\", \"function\": {\"name\": ..., \"arguments\": \"{...}\"}}", "messages")
        args = fn.get("arguments")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except _UNREADABLE:
            pass  # (no JSON we read: the text as it is)
        out.append({**c, "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return {**{k: v for k, v in m.items() if k != "function_call"}, "tool_calls": out}


def _history_shown(prompt: str, msgs: list) -> bool:
    """Whether the template rendered the conversation's calls (their names) and tool results (their text)."""
    for m in msgs:
        if m["role"] == "tool" and str(m.get("content") or "") not in prompt:
            return False
        if any(c["function"]["name"] not in prompt for c in m.get("tool_calls") or ()):
            return False
    return True


def _as_text(msgs: list) -> list:
    """Calls and results as text in the Hermes format: an assistant's calls as <tool_call> blocks after its
    content, tool results (consecutive ones together) as <tool_response> blocks in a user turn (their content
    parts joined, as the server joins them)."""
    out = []
    for i, m in enumerate(msgs):
        if m.get("tool_calls") or m["role"] == "tool":
            m = text_message(m, i)
        if m.get("tool_calls"):
            blocks = [_call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join([m["content"]] * bool(m.get("content")) + blocks)})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("tool_result"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block, "tool_result": True})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "tool_result"} for m in out]


def _call_text(name: str, arguments) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


def describe(listed: list) -> str:
    """The tools described as Qwen2.5's template does (the Hermes format), for templates that do not render them."""
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
            "function signatures within <tools></tools> XML tags:\n<tools>\n"
            + "\n".join(json.dumps(t, ensure_ascii=False) for t in listed)
            + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            f"{OPEN}{CLOSE} XML tags:\n{OPEN}\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
            f"{CLOSE}")


def _described(msgs: list, listed: list) -> list:
    """The messages with the tools' description at the end of the system message (or in one of its own)."""
    if not listed:
        return msgs
    if msgs and msgs[0]["role"] == "system":
        return [{**msgs[0], "content": f"{msgs[0].get('content') or ''}\n\n{describe(listed)}"}, *msgs[1:]]
    return [{"role": "system", "content": describe(listed)}, *msgs]


# ---------------------------------------------------------------------------- the grammar

def answer_grammar(tools: Tools, grammar, response_format) -> Optional[str]:
    """The chat answer's grammar: one call in the Hermes format for tool_choice "required" (of any function) or a
    named function, its arguments valid under the function's JSON schema; else the request's own grammar or
    response_format's (None: the answer is free)."""
    if tools.choice in ("auto", "none"):
        if grammar is None and response_format is not None:
            return response_format_grammar(response_format)
        return grammar
    param = "function_call" if tools.old_form else "tool_choice"
    if grammar is not None or response_format is not None:
        raise RequestError(f"{param}={tools.choice!r} constrains the answer to a call: leave grammar and "
                           "response_format out (or use tool_choice \"auto\")", param)
    fns = [f for f in tools.functions if tools.choice in ("required", f["name"])]
    where = "functions" if tools.old_form else "tools"
    rules, alts, size = [], [], 0
    for i, f in enumerate(fns):
        schema = f.get("parameters") or {"type": "object"}
        args = _prefixed(schema_grammar(schema, where, f"the parameters of {f['name']!r}"), f"f{i}-")
        rules.append(args)
        size += len(args)
        if size > MAX_LENGTH:  # (each function's grammar passed alone: thousands must not pile up before the check)
            raise RequestError(f"the functions' schemas make a grammar over {MAX_LENGTH} characters: give fewer "
                               "or smaller functions", where)
        head = json.dumps(f"{OPEN}\n{{\"name\": \"{f['name']}\", \"arguments\": ")
        alts.append(f"{head} f{i}-root {json.dumps('}' + chr(10) + CLOSE)}")
    gbnf = "root ::= " + " | ".join(alts) + "\n" + "\n".join(rules)
    try:
        check_grammar(gbnf)
    except RequestError as e:
        raise RequestError(f"the functions' schemas make a grammar llama.cpp cannot take safely: {e}",
                           "tools") from None
    return gbnf


# GBNF's lexemes as llama.cpp reads them: a literal, a character class, a comment, a token <...>, a repetition's
# braces {m,n}, a word (a rule's name: llama.cpp's word characters; the converter's names may begin with "-" or a
# digit: property `_id` -> `-id-kv`, `2fa` -> `2fa-kv`), any other character
_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|<[^>]*>|\{[^}]*\}|([A-Za-z0-9-]+)|.', re.S)


def _prefixed(gbnf: str, prefix: str) -> str:
    """A grammar's rule names prefixed, every word outside literals, classes, comments, tokens and repetition
    braces: several schemas' grammars in one, none sharing a rule."""
    return _GBNF_TOKEN.sub(lambda m: prefix + m[0] if m[1] else m[0], gbnf)


# ---------------------------------------------------------------------------- the answer

class HermesCalls:
    """The calls in an answer's text as it streams (the Hermes format): `feed` takes text and gives back the
    content that is surely not part of a call (text that may begin one is held back, and whitespace next to a call
    is not content) and the calls completed. A block that is not a call of a known function stays text. An answer
    that is a call's JSON alone, without the tags, perhaps in a code fence (Qwen2.5-Coder answers so; llama.cpp's
    parser takes them too), is that call: an answer that begins as one (`{"name"`) is held back until it ends."""

    def __init__(self, names: set):
        self.names = names  # the functions the answer may call
        self.buf = ""  # text not given back yet
        self.n = 0  # calls given so far
        self.fresh = False  # nothing but whitespace came since the last call
        self.bare: Optional[bool] = None  # the answer begins as a call without tags (None: cannot tell yet)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        self.buf += text
        if self.bare is None:
            self.bare = _bare_call(self.buf)
        if not final and self.bare is not False:
            return "", []
        if self.bare and (call := self._call(re.sub(r"^\s*```(?:json)?|```\s*$", "", self.buf))) is not None:
            self.buf, self.n, self.bare = "", 1, False
            return "", [call]
        content, calls = "", []
        while True:
            i = self.buf.find(OPEN)
            j = self.buf.find(CLOSE, i) if i >= 0 else -1
            if i < 0 or (j < 0 and not final):  # no call, or one not closed yet: the text before it
                cut = i if i >= 0 else len(self.buf) - (0 if final else held_back(self.buf, [OPEN], 0))
                content, self.buf = content + self._text(self.buf[:cut]), self.buf[cut:]
                break
            end = j + len(CLOSE) if j >= 0 else len(self.buf)  # (at the end, a call whose tag did not close)
            call = self._call(self.buf[i + len(OPEN):j if j >= 0 else end])
            before, raw, self.buf = self.buf[:i], self.buf[i:end], self.buf[end:]
            if call is None:
                content += self._text(before + raw)
            else:
                content += self._text(before).rstrip()
                calls.append(call)
                self.n, self.fresh = self.n + 1, True
        if final and self.n:
            content = content.rstrip()
        elif not final:  # trailing whitespace waits: a call may follow it
            kept = content.rstrip()
            content, self.buf = kept, content[len(kept):] + self.buf
        return content, calls

    def _text(self, s: str) -> str:
        if self.fresh:
            s = s.lstrip()
            self.fresh = not s
        return s

    def _call(self, body: str) -> Optional[dict]:
        try:
            d = json.loads(body)
        except _UNREADABLE:
            return None
        if not isinstance(d, dict) or d.get("name") not in self.names:
            return None
        args = d.get("arguments", {})
        if isinstance(args, str):  # (some models write the arguments as a JSON string)
            try:
                args = json.loads(args)
            except _UNREADABLE:
                return None
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": d["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _bare_call(text: str) -> Optional[bool]:
    """Whether an answer that begins with `text` begins as a call's JSON without tags (`{"name"`, perhaps after
    a code fence's ```json or ```): True, False, or None while it cannot tell yet."""
    t = text.lstrip()
    for fence in ("```json", "```"):
        if t.startswith(fence):
            t = t[len(fence):].lstrip()
            break
        if fence.startswith(t):
            return None
    if not t:
        return None
    rest = t[1:].lstrip()
    if t[0] != "{" or not ('"name"'.startswith(rest) or rest.startswith('"name"')):
        return False
    return True if rest.startswith('"name"') else None


def tool_chunks(chunks: Iterator[dict], tools: Tools) -> Iterator[dict]:
    """A chat's chunk stream (responses.chat_chunks) with the answer's calls in OpenAI's shapes: content deltas,
    a tool_calls delta per call (with its index), finish_reason "tool_calls" (the old form: one function_call
    delta, "function_call"). Log-probabilities come with the next chunk sent. Without tools: the stream as is."""
    if tools.choice == "none":
        yield from chunks
        return
    try:
        yield from _tool_chunk_stream(chunks, HermesCalls(tools.names), tools.old_form)
    finally:
        chunks.close()


def _tool_chunk_stream(chunks: Iterator[dict], parser: HermesCalls, old_form: bool) -> Iterator[dict]:
    lps = []  # log-probabilities not sent yet
    for c in chunks:
        ch = c["choices"][0]
        lps += ch["logprobs"]["content"] if ch["logprobs"] else []
        finish, delta = ch["finish_reason"], dict(ch["delta"])
        n = parser.n
        text, calls = parser.feed(delta.pop("content", "") or "", final=finish is not None)
        if text:
            delta["content"] = text
        if calls and old_form and n == 0:  # (the old form has one call)
            delta["function_call"] = calls[0]["function"]
        elif calls and not old_form:
            delta["tool_calls"] = [{"index": n + k, **call} for k, call in enumerate(calls)]
        if delta:  # (the finish's own chunk, with the usage and statistics, comes after what it flushed)
            head = {k: v for k, v in c.items() if k not in ("usage", "edgecad")}
            yield {**head, "choices": [{**ch, "delta": delta, "logprobs": _lp(lps), "finish_reason": None}]}
            lps = []
        if finish is not None:
            finish = ("function_call" if old_form else "tool_calls") if parser.n else finish
            yield {**c, "choices": [{**ch, "delta": {}, "logprobs": _lp(lps), "finish_reason": finish}]}


def _lp(content: list) -> Optional[dict]:
    return {"content": content, "refusal": None} if content else None
