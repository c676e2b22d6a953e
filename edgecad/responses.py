"""OpenAI's response shapes (llama-cpp-python's, which are OpenAI's): what the Engine and the server send.

This module makes a completion's text-completion chunks as the Engine's decoder gives tokens (TextChunks: UTF-8
decoded incrementally, stop strings held back, each chunk's log-probabilities, the last chunk's usage), turns them
into a chat's chunk stream, adds to a stream's statistics (with_stats), joins a stream into one response, lists
log-probabilities in a completion's or a chat's shape, maps a stream onto OpenAI's (the server's events), and turns
a response_format into the grammar that makes the output valid JSON. One home for every shape a client parses.
"""
from __future__ import annotations

import codecs
import json
import time
import uuid
from typing import Iterator, Optional, Sequence

from .errors import RequestError
from .gbnf import check as check_grammar, check_schema


# ---------------------------------------------------------------------------- stop strings

def stop_list(stop) -> list[str]:
    """`stop` (a string, a list of them or None) as a list without empty strings."""
    return [stop] if isinstance(stop, str) and stop else [s for s in (stop or []) if s and isinstance(s, str)]


def held_back(text: str, stops: Sequence[str], start: int) -> int:
    """Characters at the end of `text` (after `start`) not to stream yet: a possible start of a stop string."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - start), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


# ---------------------------------------------------------------------------- text completion chunks

class TextChunks:
    """One completion's text_completion chunks, as its tokens come (llama-cpp-python's, which are OpenAI's).

    text: everything decoded so far (whole UTF-8 characters only); text[:emitted] is streamed. A stop string can
    only start at or after `emitted` (a possible start is held back), so each token costs a search over the
    unstreamed tail, not over the whole text. Each chunk carries the log-probabilities (when asked for) of the
    tokens whose text it completes, in a completion's shape or a chat's (with each token's bytes)."""

    def __init__(self, model, name: str, stops: list[str], echo: str = "", offset: int = 0, chat=None):
        self.model, self.name, self.stops = model, name, stops  # model: the target (its pieces, end of generation)
        self.echo = echo  # text that comes first (the prompt, echoed)
        self.offset = offset  # where the completion's text starts in the echoed text (logprobs' text_offset)
        self.chat = chat is not None  # a chat (its tools: edgecad.tools.Tools): logprobs in a chat's shape
        self.special = chat.special_tokens(model) if chat is not None else ()  # control tokens kept in the text
        self.id, self.created = f"cmpl-{uuid.uuid4()}", int(time.time())
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # as llama-cpp-python
        self.text, self.emitted, self.finish, self.cut = "", 0, "length", None
        self.ends: list = []  # per decoded token: len(text) once its character is whole (None until then)
        self.lp_sent = 0  # tokens whose log-probabilities were sent

    def chunk(self, text: str, finish: Optional[str], logprobs: Optional[dict] = None) -> dict:
        text, self.echo = self.echo + text, ""
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.name,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}]}

    def chunks(self, tokens: Iterator[int], stats) -> Iterator[dict]:
        """The chunks streamed while the decoder's `tokens` come (each one added to stats.token_ids), until an
        end of generation or a stop string."""
        for tok in tokens:
            stats.token_ids.append(tok)
            if self.model.is_eog(tok):
                self.finish = "stop"
                return
            self.text += self.utf8.decode(self.model.token_to_piece(tok, special=tok in self.special))
            self.ends.append(None)
            if not self.utf8.getstate()[0]:  # no byte of a character left pending: every token so far is whole
                for k in range(len(self.ends) - 1, -1, -1):
                    if self.ends[k] is not None:
                        break
                    self.ends[k] = len(self.text)
            hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
            if hits:
                self.finish, self.cut = "stop", min(hits)
                return
            safe = len(self.text) - held_back(self.text, self.stops, self.emitted)
            if safe > self.emitted:
                yield self.chunk(self.text[self.emitted:safe], None, self.logprobs(stats, safe))
                self.emitted = safe

    def logprobs(self, stats, end: Optional[int]) -> Optional[dict]:
        """The log-probabilities of the tokens not sent yet whose text ends by character `end` (None: all of them,
        but an end of generation), or None when they were not asked for (edgecad.decode.Stats keeps them)."""
        if stats.logprobs is None:
            return None
        ids, lo = stats.token_ids, self.lp_sent
        if end is None:
            k = len(ids) - (self.finish == "stop" and bool(ids) and self.model.is_eog(ids[-1]))
        else:
            k = lo
            while k < len(self.ends) and self.ends[k] is not None and self.ends[k] <= end:
                k += 1
        self.lp_sent = k
        if self.chat:
            return chat_logprobs(self.model, ids[lo:k], stats.token_logprobs[lo:k])
        start = self.ends[lo - 1] if lo else 0  # (a sent token's character is whole)
        return completion_logprobs(self.model, ids[lo:k], stats.token_logprobs[lo:k], self.offset + start)

    def last(self, stats) -> dict:
        """The last chunk, once the decoder is done: the text left, the finish reason, usage, and the
        log-probabilities of the tokens not sent yet when stats kept them (edgecad.decode.Stats)."""
        if self.cut is None:
            self.text += self.utf8.decode(b"", final=True)
            self.cut = len(self.text)
        last = self.chunk(self.text[self.emitted:self.cut], self.finish, self.logprobs(stats, None))
        ids, p = stats.token_ids, stats.prompt_tokens
        n = len(ids) - (self.finish == "stop" and bool(ids) and self.model.is_eog(ids[-1]))
        last["usage"] = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
        return last


# ---------------------------------------------------------------------------- log-probabilities

def completion_logprobs(model, token_ids: list[int], notes: list, offset: int) -> dict:
    """llama-cpp-python's (and OpenAI's) completion logprobs of the emitted tokens: each token's text, where it
    starts in the text (the first at `offset`), its log-probability and a dict of the top alternatives' (and its
    own)."""
    piece = lambda t: model.token_to_piece(t).decode("utf-8", "ignore")  # noqa: E731
    out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    text = b""
    for t, (lp, top) in zip(token_ids, notes):
        out["text_offset"].append(offset + len(text.decode("utf-8", "ignore")))
        raw = model.token_to_piece(t)
        text += raw
        out["tokens"].append(raw.decode("utf-8", "ignore"))
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({**{piece(i): v for i, v in top}, out["tokens"][-1]: lp})
    return out


def chat_logprobs(model, token_ids: list[int], notes: list) -> dict:
    """OpenAI's chat logprobs of the emitted tokens: each token's text, UTF-8 bytes and log-probability, and its
    top alternatives' (the k most likely, best first; a token's bytes may be part of a character)."""
    def entry(t: int, lp: float) -> dict:
        raw = model.token_to_piece(t)
        return {"token": raw.decode("utf-8", "ignore"), "logprob": lp, "bytes": list(raw)}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                        for t, (lp, top) in zip(token_ids, notes)], "refusal": None}


# ---------------------------------------------------------------------------- streams and their joins

def join(chunks) -> dict:
    """The whole response of a stream (an iterable of chunks): llama-cpp-python's text_completion from
    text_completion chunks, its chat.completion from chat.completion.chunks (content, tool calls and
    log-probabilities put together)."""
    chunks = list(chunks)
    last, lps = chunks[-1], [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    if last["object"] == "text_completion":
        lp = {k: [x for p in lps for x in p[k]] for k in lps[0]} if lps else None
        text = "".join(c["choices"][0]["text"] for c in chunks)
        return {**last, "choices": [{**last["choices"][0], "text": text, "logprobs": lp}]}
    message = _message([c["choices"][0]["delta"] for c in chunks])
    lp = {"content": [x for p in lps for x in p["content"]], "refusal": None} if lps else None
    return {"id": last["id"], "object": "chat.completion", "created": last["created"], "model": last["model"],
            "choices": [{"index": 0, "message": message, "logprobs": lp,
                         "finish_reason": last["choices"][0]["finish_reason"]}],
            "usage": last["usage"], "edgecad": last["edgecad"]}


def _message(deltas: list[dict]) -> dict:
    """A chat's message from its stream's deltas: the content, and the tool calls (or the old form's function
    call) whose pieces come by index."""
    content = "".join(d.get("content") or "" for d in deltas)
    calls: dict = {}
    for d in deltas:
        for c in d.get("tool_calls") or ():
            have = calls.setdefault(c["index"], {"id": c.get("id"), "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
            have["function"]["name"] += c.get("function", {}).get("name") or ""
            have["function"]["arguments"] += c.get("function", {}).get("arguments") or ""
    function = [d["function_call"] for d in deltas if d.get("function_call")]
    if not calls and not function:
        return {"role": "assistant", "content": content}
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    else:
        message["function_call"] = {k: "".join(f.get(k) or "" for f in function) for k in ("name", "arguments")}
    return message


def chat_chunks(chunks: Iterator[dict]) -> Iterator[dict]:
    """Text completion chunks as llama-cpp-python's chat.completion.chunk stream: a role delta first,
    then content deltas (each with its tokens' log-probabilities), then an empty delta with the finish reason
    (and the completion's usage and statistics)."""
    try:
        yield from _chat_chunk_stream(chunks)
    finally:
        chunks.close()  # closing the chat stream ends the decoder


def with_stats(chunks: Iterator[dict], **extra) -> Iterator[dict]:
    """The chunks, with `extra` in the last one's `edgecad` statistics; closing it closes them."""
    try:
        for chunk in chunks:
            if "edgecad" in chunk:
                chunk["edgecad"].update(extra)
            yield chunk
    finally:
        chunks.close()


def _chat_chunk_stream(chunks: Iterator[dict]) -> Iterator[dict]:
    for i, c in enumerate(chunks):
        head = {"id": "chat" + c["id"], "model": c["model"], "created": c["created"], "object": "chat.completion.chunk"}
        if i == 0:
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
        ch = c["choices"][0]
        lp, finish = ch["logprobs"], ch["finish_reason"]
        if finish is None or ch["text"]:  # (the final chunk's text: a content delta of its own)
            yield {**head, "choices": [{"index": 0, "delta": {"content": ch["text"]}, "logprobs": lp,
                                        "finish_reason": None}]}
            lp = None
        if finish is not None:
            out = {**head, "choices": [{"index": 0, "delta": {}, "logprobs": lp, "finish_reason": finish}]}
            if "edgecad" in c:
                out["usage"], out["edgecad"] = c["usage"], c["edgecad"]
            yield out


def openai_chunks(chunk: dict, include_usage: bool) -> list[dict]:
    """An Engine's stream chunk as OpenAI streams it (the server's events): a chat's role delta with its empty
    `content`; `usage` only when the request's stream_options.include_usage asks for it, in a chunk of its own
    after the finish (with no choices), and `usage: null` on the others (the statistics stay on the finish)."""
    usage, chunk = chunk.get("usage"), {k: v for k, v in chunk.items() if k != "usage"}
    delta = chunk["choices"][0].get("delta")
    if delta is not None and "role" in delta and "content" not in delta:
        chunk["choices"] = [{**chunk["choices"][0], "delta": {**delta, "content": ""}}]
    if not include_usage:
        return [chunk]
    chunk["usage"] = None
    if usage is None:
        return [chunk]
    return [chunk, {"id": chunk["id"], "object": chunk["object"], "created": chunk["created"],
                    "model": chunk["model"], "choices": [], "usage": usage}]


# ---------------------------------------------------------------------------- response_format

def response_format_grammar(response_format) -> str:
    """GBNF for OpenAI's / llama-cpp-python's response_format: {"type": "json_object"} (any JSON object, or
    valid under its "schema"), {"type": "json_schema", "json_schema": {"schema": ...}}, or {"type": "text"}
    (None); through llama-cpp-python's own grammar and schema converter."""
    from llama_cpp import llama_grammar

    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    inner = response_format.get("json_schema") if kind == "json_schema" else None
    schema = response_format.get("schema") if kind == "json_object" else \
        inner.get("schema") if isinstance(inner, dict) else False
    if schema is False or (kind == "json_schema" and not isinstance(schema, dict)):
        raise RequestError(f"response_format={response_format!r} is not supported: use {{\"type\": \"json_object\"}}"
                           " (optionally with a \"schema\"), {\"type\": \"json_schema\", \"json_schema\": "
                           "{\"schema\": {...}}} or {\"type\": \"text\"}", "response_format")
    if schema is None:
        return llama_grammar.JSON_GBNF
    return schema_grammar(schema, "response_format")


def schema_grammar(schema, param: str, what: str = "the JSON schema") -> str:
    """GBNF for the JSON values valid under `schema`, through llama-cpp-python's converter (its root rule `root`):
    the schema bounded first (gbnf.check_schema), the grammar checked as every grammar is; a refusal names `param`
    (where the schema came from) and `what` it is."""
    from llama_cpp import llama_grammar

    check_schema(schema, param, what)  # (before the converter writes its repetitions out)
    try:
        gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter's own checks (unknown types, bad references...)
        raise RequestError(f"{what} cannot be turned into a grammar: {type(e).__name__}: {e}", param) from None
    # the converter lets a string hold raw control characters, which JSON forbids (json.loads refuses them): its
    # strings get the character class of llama-cpp-python's own JSON grammar
    gbnf = gbnf.replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |', 1)
    try:
        check_grammar(gbnf)  # (Grammar checks it too: here the schema is named as the cause)
    except RequestError as e:
        raise RequestError(f"{what} makes a grammar llama.cpp cannot take safely: {e}", param) from None
    return gbnf
