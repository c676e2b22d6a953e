"""OpenAI's response shapes (llama-cpp-python's, which are OpenAI's): what the Engine and the server send.

This module makes a completion's text-completion chunks as the Engine's decoder gives tokens (TextChunks: UTF-8
decoded incrementally, stop strings held back, the last chunk's usage and log-probabilities), turns them into a
chat's chunk stream, joins a stream into one response, lists log-probabilities in a completion's or a chat's
shape, and turns a response_format into the grammar that makes the output valid JSON. One home for every shape
a client parses.
"""
from __future__ import annotations

import codecs
import json
import time
import uuid
from typing import Iterator, Optional, Sequence

from .errors import RequestError
from .gbnf import check as check_grammar


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
    unstreamed tail, not over the whole text."""

    def __init__(self, model, name: str, stops: list[str], echo: str = "", offset: int = 0):
        self.model, self.name, self.stops = model, name, stops  # model: the target (its pieces, end of generation)
        self.echo = echo  # text that comes first (the prompt, echoed)
        self.offset = offset  # where the completion's text starts in the echoed text (logprobs' text_offset)
        self.id, self.created = f"cmpl-{uuid.uuid4()}", int(time.time())
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # as llama-cpp-python
        self.text, self.emitted, self.finish, self.cut = "", 0, "length", None

    def chunk(self, text: str, finish: Optional[str]) -> dict:
        text, self.echo = self.echo + text, ""
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    def chunks(self, tokens: Iterator[int], stats) -> Iterator[dict]:
        """The chunks streamed while the decoder's `tokens` come (each one added to stats.token_ids), until an
        end of generation or a stop string."""
        for tok in tokens:
            stats.token_ids.append(tok)
            if self.model.is_eog(tok):
                self.finish = "stop"
                return
            self.text += self.utf8.decode(self.model.token_to_piece(tok))
            hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
            if hits:
                self.finish, self.cut = "stop", min(hits)
                return
            safe = len(self.text) - held_back(self.text, self.stops, self.emitted)
            if safe > self.emitted:
                yield self.chunk(self.text[self.emitted:safe], None)
                self.emitted = safe

    def last(self, stats) -> dict:
        """The last chunk, once the decoder is done: the text left, the finish reason, usage, and the
        log-probabilities when stats kept them (edgecad.decode.Stats)."""
        if self.cut is None:
            self.text += self.utf8.decode(b"", final=True)
            self.cut = len(self.text)
        last = self.chunk(self.text[self.emitted:self.cut], self.finish)
        ids, p = stats.token_ids, stats.prompt_tokens
        n = len(ids) - (self.finish == "stop" and bool(ids) and self.model.is_eog(ids[-1]))
        last["usage"] = {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}
        if stats.logprobs is not None:
            last["choices"][0]["logprobs"] = completion_logprobs(self.model, ids[:n], stats.token_logprobs,
                                                                 self.offset)
        return last


# ---------------------------------------------------------------------------- log-probabilities

def completion_logprobs(model, token_ids: list[int], notes: list, offset: int) -> dict:
    """llama-cpp-python's (and OpenAI's) completion logprobs of the emitted tokens: each token's text, where it
    starts in the text, its log-probability and a dict of the top alternatives' (and its own)."""
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


# ---------------------------------------------------------------------------- streams and their joins

def join(chunks) -> dict:
    """The whole response of a stream (an iterable of chunks): llama-cpp-python's text_completion from
    text_completion chunks, its chat.completion from chat.completion.chunks."""
    text, last = [], None
    for chunk in chunks:
        ch = chunk["choices"][0]
        text.append(ch["text"] if "text" in ch else ch["delta"].get("content") or "")
        last = chunk
    if last["object"] == "text_completion":
        return {**last, "choices": [{**last["choices"][0], "text": "".join(text)}]}
    return {"id": last["id"], "object": "chat.completion", "created": last["created"], "model": last["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "logprobs": last["choices"][0]["logprobs"], "finish_reason": last["choices"][0]["finish_reason"]}],
            "usage": last["usage"], "edgecad": last["edgecad"]}


def _chat_logprobs(lp: Optional[dict]) -> Optional[dict]:
    """A completion's logprobs in a chat's shape (OpenAI's, as llama-cpp-python converts them)."""
    if lp is None:
        return None
    return {"content": [{"token": t, "bytes": None, "logprob": v,
                         "top_logprobs": [{"token": a, "logprob": b, "bytes": None} for a, b in top.items()]}
                        for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])],
            "refusal": None}


def chat_chunks(chunks: Iterator[dict]) -> Iterator[dict]:
    """Text completion chunks as llama-cpp-python's chat.completion.chunk stream: a role delta first,
    then content deltas, then an empty delta with the finish reason."""
    try:
        yield from _chat_chunk_stream(chunks)
    finally:
        chunks.close()  # closing the chat stream ends the decoder


def _chat_chunk_stream(chunks: Iterator[dict]) -> Iterator[dict]:
    for i, c in enumerate(chunks):
        head = {"id": "chat" + c["id"], "model": c["model"], "created": c["created"], "object": "chat.completion.chunk"}
        if i == 0:
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]}
        ch = c["choices"][0]
        if ch["finish_reason"] is not None and ch["text"]:  # the final chunk's text, as a content delta
            yield {**head, "choices": [{"index": 0, "delta": {"content": ch["text"]}, "logprobs": None,
                                        "finish_reason": None}]}
        out = {**head, "choices": [{"index": 0, "delta": {"content": ch["text"]} if ch["finish_reason"] is None
                                    else {}, "logprobs": _chat_logprobs(ch["logprobs"]),
                                    "finish_reason": ch["finish_reason"]}]}
        if "edgecad" in c:
            out["usage"], out["edgecad"] = c["usage"], c["edgecad"]
        yield out


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
    try:
        gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter's own checks (unknown types, bad references...)
        raise RequestError(f"the JSON schema cannot be turned into a grammar: {type(e).__name__}: {e}",
                           "response_format") from None
    # the converter lets a string hold raw control characters, which JSON forbids (json.loads refuses them): its
    # strings get the character class of llama-cpp-python's own JSON grammar
    gbnf = gbnf.replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |', 1)
    try:
        check_grammar(gbnf)  # (Grammar checks it too: here the schema is named as the cause)
    except RequestError as e:
        raise RequestError(f"the JSON schema makes a grammar llama.cpp cannot take safely: {e}",
                           "response_format") from None
    return gbnf


