"""`edgecad serve`: the real server (a subprocess, uvicorn, tiny models) on a free loopback port, driven by the
official `openai` client and by raw HTTP (httpx)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import httpx
import openai
import pytest

from edgecad import Engine, cgroup

from helpers import PROMPTS


class Served:
    """`edgecad serve ARGS --port PORT` (0: any free port) in a subprocess; its stderr is collected line by line
    by a reader thread (`wait_for` waits for a line with a deadline: a line the server wrote before its response
    may not be read yet when the response arrives). One compute thread: the test process runs engines too, and
    llama.cpp's threads spin at barriers when they outnumber the cores. env: variables to set for it."""

    def __init__(self, *args: str, ready: bool = True, env: Optional[dict] = None, port: int = 0, cg=None):
        """cg: a memory cgroup (edgecad.cgroup.MemoryCgroup) the server starts in."""
        cmd = [sys.executable, "-m", "edgecad.cli", "serve", "--port", str(port), "--threads", "1", *map(str, args)]
        self.proc = (cg.start if cg is not None else subprocess.Popen)(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=None if env is None else {**os.environ, **env})
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._changed = threading.Condition()
        self._ended = False  # the reader has read the whole log (the process closed its stderr)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = f"http://127.0.0.1:{port}" if port else None  # (known before the load with a given port)
        if ready:
            self.wait_ready()

    def _read(self):
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                if "serving " in line and " at http://" in line:
                    self.url = line.split(" at ")[1].split("/v1")[0]
                    self._ready.set()
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()
        self._ready.set()

    def wait_ready(self, timeout: float = 120):
        assert self._ready.wait(timeout), "the server did not get ready:\n" + self.log
        assert self.url and self.proc.poll() is None, "the server stopped before it was ready:\n" + self.log

    def count(self, pattern: str) -> int:
        """Log lines read so far that match the regular expression."""
        rx = re.compile(pattern)
        return sum(bool(rx.search(l)) for l in list(self.lines))

    def wait_for(self, pattern: str, timeout: float = 60, count: int = 1) -> list[str]:
        """The log lines matching the regular expression, once at least `count` of them are read; fails (with the
        log) when the deadline passes or the log ends first."""
        rx, deadline = re.compile(pattern), time.monotonic() + timeout
        with self._changed:
            while True:
                found = [l for l in self.lines if rx.search(l)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                assert left > 0 and not self._ended, \
                    f"{count} log lines matching {pattern!r} were not written within {timeout} s:\n{self.log}"
                self._changed.wait(left)

    @property
    def log(self) -> str:
        return "".join(list(self.lines))

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def post(self, path: str, body, **kw) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers={"content-type": "application/json",
                                                                     **kw.pop("headers", {})},
                          timeout=kw.pop("timeout", 60), **kw)

    def wait(self, timeout: float = 60) -> int:
        """The exit status, once the process has ended and its whole log is read."""
        status = self.proc.wait(timeout)
        self._reader.join(timeout)
        assert not self._reader.is_alive(), "the server's log did not end with it"
        return status

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)


@pytest.fixture(scope="module")
def server(tiny_pair):
    draft, target = tiny_pair
    s = Served("--target", target, "--draft", draft, "--mode", "tree", "--n-ctx", 512)
    yield s
    assert s.stop() == 0, s.log


@pytest.fixture(scope="module")
def target_tokens(tiny_target):
    """The target's own greedy tokens (Python API, target only) for each prompt, and for a chat."""
    with Engine(tiny_target, mode="target", n_ctx=512) as e:
        out = {p: e.create_completion(p, temperature=0, max_tokens=24)["edgecad"]["token_ids"] for p in PROMPTS}
        out["chat"] = e.create_chat_completion(CHAT, temperature=0, max_tokens=24)["edgecad"]["token_ids"]
    return out


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello the world"}]


def _slow_server(paging_pair, *args):
    """A paged target on emulated SD-card storage: a pass takes tens of milliseconds, so a completion of a few
    hundred tokens runs for seconds (long enough to disconnect from, queue behind, or stop)."""
    draft, target = paging_pair
    return Served("--target", target, "--mode", "target", "--target-budget", "50%", "--storage", "sd",
                  "--n-ctx", 512, *args)


# ---------------------------------------------------------------------------- completions

def test_greedy_completions_through_the_openai_client_are_the_target_s_tokens(server, target_tokens):
    """A tree-mode server gives the target's own greedy tokens, text and usage, for completions and chat."""
    c, name = server.client(), _name(server)
    for p in PROMPTS:
        r = c.completions.create(model=name, prompt=p, max_tokens=24, temperature=0)
        ids = r.model_extra["edgecad"]["token_ids"]
        assert ids == target_tokens[p]
        assert r.usage.completion_tokens == len(ids) and r.choices[0].finish_reason == "length"
        assert r.object == "text_completion" and r.model == name
    r = c.chat.completions.create(model=name, messages=CHAT, max_tokens=24, temperature=0)
    assert r.model_extra["edgecad"]["token_ids"] == target_tokens["chat"]
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.model_extra["edgecad"]["mode"] == "tree"


def _name(server) -> str:
    return server.client().models.list().data[0].id


def test_streamed_text_joins_to_the_non_streamed_text(server):
    c, name = server.client(), _name(server)
    for p in PROMPTS[:3]:
        whole = c.completions.create(model=name, prompt=p, max_tokens=20, temperature=0)
        chunks = list(c.completions.create(model=name, prompt=p, max_tokens=20, temperature=0, stream=True))
        assert len(chunks) > 1
        assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
        assert chunks[-1].choices[0].finish_reason == "length"
    whole = c.chat.completions.create(model=name, messages=CHAT, max_tokens=20, temperature=0)
    chunks = list(c.chat.completions.create(model=name, messages=CHAT, max_tokens=20, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def _sse(server, path: str, body: dict) -> list:
    """A streamed request's events, raw: each `data:` line (JSON decoded, but the last `[DONE]`)."""
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_raw_sse_has_openai_s_stream_shapes(server):
    """As OpenAI streams: `[DONE]` last; a chat's first delta has its role and an empty content; no usage unless
    stream_options.include_usage, then in a last chunk of its own with no choices (and `usage: null` before)."""
    for path, body in (("/v1/completions", {"prompt": "abc"}), ("/v1/chat/completions", {"messages": CHAT})):
        events = _sse(server, path, {**body, "max_tokens": 5})
        assert all("usage" not in e for e in events) and events[-1]["choices"][0]["finish_reason"] == "length"
        assert "edgecad" in events[-1]
        if path == "/v1/chat/completions":
            assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        events = _sse(server, path, {**body, "max_tokens": 5, "stream_options": {"include_usage": True}})
        *rest, last = events
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
        assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 5
        assert all(e["usage"] is None for e in rest) and rest[-1]["choices"][0]["finish_reason"] == "length"
    c = server.client()
    chunks = list(c.chat.completions.create(model=_name(server), messages=CHAT, max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4 and not chunks[-1].choices


def test_a_chat_s_next_turn_reuses_the_conversation_s_prefix(server):
    c, name = server.client(), _name(server)
    first = c.chat.completions.create(model=name, messages=CHAT, max_tokens=8, temperature=0)
    turn2 = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "and then?"}]
    second = c.chat.completions.create(model=name, messages=turn2, max_tokens=8, temperature=0)
    reused = second.model_extra["edgecad"]["prompt_tokens_reused"]
    assert reused >= first.usage.prompt_tokens - 1, (reused, first.usage.prompt_tokens)


def test_models_health_and_the_openapi_schema(server, tiny_target):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == [str(tiny_target)]  # one entry per model
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "running": 0, "waiting": 0}
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(schema["paths"])
    # a request may name the model by file name too
    r = server.post("/v1/completions", {"model": tiny_target.name, "prompt": "abc", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_json_mode_logprobs_and_echo_through_the_openai_client(server):
    """JSON mode: an output max_tokens cut is said (finish_reason "length") and not parsed; at least half the tries
    (and at least one) must end by themselves and parse, so the test cannot pass on cut outputs alone."""
    c, name = server.client(), _name(server)
    tries, parsed = 4, 0
    for seed in range(tries):
        r = c.chat.completions.create(model=name, messages=CHAT, max_tokens=300, temperature=0.7, seed=seed,
                                      response_format={"type": "json_object"}, logprobs=True, top_logprobs=2)
        assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
        if r.choices[0].finish_reason == "length":
            assert r.usage.completion_tokens == 300
            continue  # cut by max_tokens: said, and nothing to parse
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        parsed += 1
    assert parsed >= max(1, -(-tries // 2)), f"only {parsed} of {tries} JSON outputs ended by themselves"
    r = c.completions.create(model=name, prompt="abc", max_tokens=4, temperature=0, echo=True)
    assert r.choices[0].text.startswith("abc")
    r = c.completions.create(model=name, prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    assert len(r.choices[0].logprobs.token_logprobs) == 4


def test_streamed_logprobs_come_with_their_chunks_and_equal_the_non_streamed_ones(server):
    """logprobs in a stream come with the chunks whose text their tokens make (each chunk its own tokens, their
    pieces joining to its text), and together are the non-streamed request's: the same tokens, offsets, values
    and alternatives, for completions and chats; a chat's carry each token's bytes."""
    c, name = server.client(), _name(server)
    for p in PROMPTS[:3]:
        whole = c.completions.create(model=name, prompt=p, max_tokens=12, temperature=0, logprobs=3)
        chunks = list(c.completions.create(model=name, prompt=p, max_tokens=12, temperature=0, logprobs=3,
                                           stream=True))
        lps = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs is not None]
        assert len(lps) > 1  # not all in the last chunk
        at = len(p)
        for ch in chunks[:-1]:  # each chunk's tokens start where its text starts
            assert ch.choices[0].logprobs.text_offset[0] == at
            at += len(ch.choices[0].text)
        ref = whole.choices[0].logprobs
        assert len(ref.token_logprobs) == 12 and all(v <= 0 for v in ref.token_logprobs)
        assert all(1 <= len(alt) <= 4 for alt in ref.top_logprobs)  # keyed by text: pieces of a character collide
        assert [t for lp in lps for t in lp.tokens] == ref.tokens
        assert [t for lp in lps for t in lp.text_offset] == ref.text_offset
        assert [t for lp in lps for t in lp.token_logprobs] == ref.token_logprobs
        assert [t for lp in lps for t in lp.top_logprobs] == ref.top_logprobs
        assert len(ref.tokens) == len(ref.text_offset) == 12
    whole = c.chat.completions.create(model=name, messages=CHAT, max_tokens=12, temperature=0, logprobs=True,
                                      top_logprobs=3)
    chunks = list(c.chat.completions.create(model=name, messages=CHAT, max_tokens=12, temperature=0, logprobs=True,
                                            top_logprobs=3, stream=True))
    for ch in chunks:
        if ch.choices[0].logprobs is not None and ch.choices[0].delta.content:
            raw = b"".join(bytes(t.bytes) for t in ch.choices[0].logprobs.content)
            assert raw.decode("utf-8", "ignore") == ch.choices[0].delta.content
    ref = whole.choices[0].logprobs.content
    got = [t for ch in chunks if ch.choices[0].logprobs is not None for t in ch.choices[0].logprobs.content]
    assert sum(ch.choices[0].logprobs is not None for ch in chunks) > 1
    assert len(ref) == whole.usage.completion_tokens == 12
    assert [(t.token, t.bytes, t.logprob, [(a.token, a.bytes, a.logprob) for a in t.top_logprobs]) for t in got] == \
        [(t.token, t.bytes, t.logprob, [(a.token, a.bytes, a.logprob) for a in t.top_logprobs]) for t in ref]
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 and t.bytes for t in ref)
    assert all(a.bytes and a.logprob <= t.top_logprobs[0].logprob for t in ref for a in t.top_logprobs)


def test_eight_concurrent_clients_get_the_tokens_of_sequential_runs(server):
    c, name = server.client(), _name(server)
    prompts = (PROMPTS * 2)[:8]

    def run(p):
        return c.completions.create(model=name, prompt=p, max_tokens=16, temperature=0).model_extra["edgecad"][
            "token_ids"]

    sequential = [run(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(run, prompts))
    assert concurrent == sequential


# ---------------------------------------------------------------------------- errors

def _error(r: httpx.Response, status: int, param=None) -> str:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    assert e["param"] == param
    return e["message"]


def test_errors_have_openai_s_shape_and_status(server):
    assert "not valid JSON" in _error(server.post("/v1/completions", b'{"prompt": '), 400)
    assert "empty" in _error(server.post("/v1/completions", b""), 400)
    assert "Unicode" in _error(server.post("/v1/completions", {"prompt": "a\ud800b"}), 400, "prompt")
    assert "Unicode" in _error(server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]}),
                               400, "messages")
    assert "at most 16" in _error(server.post("/v1/completions", {"prompt": "x", "stop": ["a"] * 17}), 400, "stop")
    assert server.post("/v1/chat/completions", {"messages": CHAT, "n": None, "max_tokens": 2}).status_code == 200
    assert "JSON object" in _error(server.post("/v1/completions", b"[1, 2]"), 400)
    assert "foo" in _error(server.post("/v1/completions", {"prompt": "x", "foo": 1}), 400, "foo")
    assert "prompt" in _error(server.post("/v1/completions", {"max_tokens": 3}), 400, "prompt")
    assert "> 0 and <= 1" in _error(server.post("/v1/completions", {"prompt": "x", "top_p": 5}), 400, "top_p")
    assert "not supported" in _error(server.post("/v1/completions", {"prompt": "x", "mirostat_mode": 2}), 400,
                                     "mirostat_mode")
    assert "grammar does not parse" in _error(server.post("/v1/completions", {"prompt": "x", "grammar": "root ::= [a-"}),
                                              400, "grammar")
    assert "one choice" in _error(server.post("/v1/chat/completions", {"messages": CHAT, "n": 3}), 400, "n")
    msg = _error(server.post("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}), 400,
                 "tools")
    assert "tools[0]" in msg
    msg = _error(server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, "messages")
    assert "text only" in msg
    assert "512" in _error(server.post("/v1/completions", {"prompt": "x", "max_tokens": 100000}), 400, "max_tokens")
    r = server.post("/v1/completions", {"prompt": "hello the world " * 400})
    assert "the context holds 512" in _error(r, 400, "prompt") and r.json()["error"]["code"] == "context_length_exceeded"
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello the world " * 400}]})
    assert "the context holds 512" in _error(r, 400, "messages")
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "vocabulary" in _error(server.post("/v1/completions", {"prompt": [5, 10 ** 6]}), 400, "prompt")
    msg = _error(server.post("/v1/completions", {"prompt": "x", "model": "gpt-4o"}), 404, "model")
    assert "gpt-4o" in msg and "/v1/models" in msg
    assert "4,194,304 bytes" in _error(server.post("/v1/completions", b"{" + b" " * (5 << 20) + b"}"), 413)
    _error(httpx.get(server.url + "/v1/nothing"), 404)
    # and the server goes on
    assert server.post("/v1/completions", {"prompt": "abc", "max_tokens": 2}).status_code == 200
    # the openai client raises its typed errors from these
    with pytest.raises(openai.BadRequestError, match="top_p"):
        server.client().completions.create(model=_name(server), prompt="x", top_p=7)
    # each refusal's log line says why (one line, cut short)
    server.wait_for(r"^POST /v1/completions 400 \(\d+\.\d+ s\): top_p=7(\.0)? is out of range: use a value > 0")
    server.wait_for(r"^POST /v1/completions 413 \(\d+\.\d+ s\): the request body is larger than")
    server.wait_for(r"^GET /v1/nothing 404 \(\d+\.\d+ s\): GET /v1/nothing: Not Found")
    server.wait_for(r"^POST /v1/completions 404 \(\d+\.\d+ s\): model 'gpt-4o' is not served here")


def test_a_json_body_without_a_json_content_type_is_read(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "abc", "max_tokens": 2}',
                   headers={"content-type": "application/x-www-form-urlencoded"}, timeout=60)
    assert r.status_code == 200, r.text


def test_an_api_key_is_required_when_set(tiny_target):
    s = Served("--target", tiny_target, "--n-ctx", 256, "--api-key", "s3cret")
    try:
        assert httpx.get(s.url + "/health").status_code == 200  # open: a probe needs no key
        assert "API key" in _error(httpx.get(s.url + "/v1/models"), 401)
        assert "API key" in _error(s.post("/v1/completions", {"prompt": "x"}, headers={"authorization": "Bearer no"}),
                                   401)
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        r = s.client(api_key="s3cret").completions.create(model=tiny_target.name, prompt="abc", max_tokens=3)
        assert r.usage.completion_tokens == 3
    finally:
        assert s.stop() == 0, s.log


def test_the_api_key_from_the_environment_works_like_the_flag(tiny_target):
    """EDGECAD_API_KEY (which `ps` does not show) is required as --api-key is, and counts as a key for the warning
    on a non-loopback address."""
    s = Served("--target", tiny_target, "--n-ctx", 256, "--host", "0.0.0.0", env={"EDGECAD_API_KEY": "3nv-s3cret"})
    try:
        assert "3nv-s3cret" not in open(f"/proc/{s.proc.pid}/cmdline").read().replace("\0", " ")
        assert not any("without an API key" in l for l in s.lines), s.log  # (written before the ready line)
        assert httpx.get(s.url + "/health").status_code == 200
        assert "API key" in _error(httpx.get(s.url + "/v1/models"), 401)
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="s3cret").completions.create(model=tiny_target.name, prompt="abc", max_tokens=3)
        r = s.client(api_key="3nv-s3cret").completions.create(model=tiny_target.name, prompt="abc", max_tokens=3)
        assert r.usage.completion_tokens == 3
    finally:
        assert s.stop() == 0, s.log


def test_an_alias_is_the_model_s_name(tiny_target):
    """--alias NAME: the name in /v1/models (with the file name), in every response's `model` (streamed too), and
    in the ready line; the --target path given is no longer a name."""
    s = Served("--target", tiny_target, "--n-ctx", 256, "--alias", "my-coder")
    try:
        s.wait_for(r"serving my-coder \(")
        c = s.client()
        assert [m.id for m in c.models.list().data] == ["my-coder"]
        assert c.completions.create(model="my-coder", prompt="abc", max_tokens=3).model == "my-coder"
        r = c.chat.completions.create(model="my-coder", messages=CHAT, max_tokens=3)
        assert r.model == "my-coder" and r.usage.completion_tokens == 3
        chunks = list(c.chat.completions.create(model="my-coder", messages=CHAT, max_tokens=3, stream=True))
        assert {ch.model for ch in chunks} == {"my-coder"}
        r = s.post("/v1/completions", {"prompt": "abc", "max_tokens": 2})  # no model: the served name
        assert r.status_code == 200 and r.json()["model"] == "my-coder"
        assert c.completions.create(model=tiny_target.name, prompt="abc", max_tokens=2).model == tiny_target.name
        msg = _error(s.post("/v1/completions", {"prompt": "abc", "model": str(tiny_target)}), 404, "model")
        assert "my-coder" in msg
    finally:
        assert s.stop() == 0, s.log


# ---------------------------------------------------------------------------- web pages, hostile requests

EVIL, UI = "https://evil.example", "http://localhost:3000"


def _completions_run(s: Served) -> int:
    return sum(" tokens, " in l for l in s.lines if l.startswith("POST /v1/"))


def test_a_web_page_of_another_origin_runs_nothing(server):
    """A browser's simple request (text/plain, no preflight) from a foreign page: 403 before the body is read, no
    completion runs, no CORS header lets the page read the refusal."""
    before, refused = _completions_run(server), server.count(r"^(POST|OPTIONS) /v1/\S+ 403")
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = {"prompt": "abc", "max_tokens": 4} if path == "/v1/completions" else {"messages": CHAT}
        r = httpx.post(server.url + path, content=json.dumps(body), timeout=60,
                       headers={"content-type": "text/plain;charset=UTF-8", "origin": EVIL})
        assert EVIL in _error(r, 403) and "--cors-origins" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in r.headers
    r = httpx.options(server.url + "/v1/completions", headers={"origin": EVIL, "access-control-request-method": "POST"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "abc", "max_tokens": 2}',
                   headers={"content-type": "text/plain", "origin": "null"}, timeout=60)  # a sandboxed frame, file://
    _error(r, 403)
    server.wait_for(r"^(POST|OPTIONS) /v1/\S+ 403", count=refused + 4)  # each refusal's line, read
    assert _completions_run(server) == before, server.log


def test_a_foreign_host_is_refused_dns_rebinding(server):
    port = server.url.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}"):
        r = httpx.get(server.url + "/v1/models", headers={"host": host})
        assert "--allowed-hosts" in _error(r, 403) and r.json()["error"]["code"] == "host_not_allowed"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.localhost", f"10.1.2.3:{port}"):
        assert httpx.get(server.url + "/v1/models", headers={"host": host}).status_code == 200, host


def _page_requests(s: Served, origin: str, key=None):
    """What a web UI at `origin` does: a preflight, then JSON posts (plain and streamed) with its key."""
    auth = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.options(s.url + "/v1/chat/completions", headers={
        "origin": origin, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert r.status_code == 204, r.text
    assert r.headers["access-control-allow-origin"] == origin
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"]
    r = s.post("/v1/chat/completions", {"messages": CHAT, "max_tokens": 3}, headers={"origin": origin, **auth})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin, r.text
    with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=60, headers={"origin": origin, **auth},
                      json={"messages": CHAT, "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert "data: [DONE]" in list(r.iter_lines())
    r = httpx.post(s.url + "/v1/chat/completions", content=json.dumps({"messages": CHAT, "max_tokens": 2}),
                   headers={"origin": origin, "content-type": "text/plain", **auth}, timeout=60)
    assert "application/json" in _error(r, 415)  # a page must say JSON: it cannot skip the preflight
    assert httpx.get(s.url + "/v1/models", headers={"origin": origin, **auth}).headers[
        "access-control-allow-origin"] == origin


def test_a_loopback_web_ui_gets_cors_headers(server):
    _page_requests(server, UI)
    _page_requests(server, "http://127.0.0.1:8080")


def test_cors_origins_and_the_key_for_a_web_ui(tiny_target):
    """--cors-origins lets a page of another origin in; with --api-key its preflight needs no key (browsers send
    none), its requests do; /docs and the OpenAPI schema are behind the key too."""
    s = Served("--target", tiny_target, "--n-ctx", 256, "--api-key", "s3cret", "--cors-origins",
               "https://chat.example.org")
    try:
        _page_requests(s, "https://chat.example.org", key="s3cret")
        _page_requests(s, UI, key="s3cret")
        _error(s.post("/v1/chat/completions", {"messages": CHAT}, headers={"origin": EVIL}), 403)
        for path in ("/docs", "/openapi.json", "/redoc"):
            _error(httpx.get(s.url + path), 401)
        assert httpx.get(s.url + "/openapi.json", headers={"authorization": "Bearer s3cret"}).status_code == 200
    finally:
        assert s.stop() == 0, s.log


def test_a_grammar_nested_20000_deep_is_a_400_and_the_server_goes_on(server):
    deep = "root ::= " + "(" * 20000 + '"a"' + ")" * 20000
    _error(server.post("/v1/completions", {"prompt": "x", "grammar": deep, "max_tokens": 2}), 400, "grammar")
    schema = {"type": "object", "properties": {"a": {  # a group per group, and per character of a{0,n}: 2,100 deep
        "type": "string", "pattern": "^" + "(" * 600 + "a{0,1500}" + ")" * 600 + "$"}}}
    r = server.post("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2,
                                             "response_format": {"type": "json_object", "schema": schema}})
    assert "2000 deep" in _error(r, 400, "response_format")
    assert server.post("/v1/completions", {"prompt": "abc", "max_tokens": 2}).status_code == 200
    assert server.proc.poll() is None


def test_hostile_values_are_400s(server):
    for key in ("\u00b2", "1e3", " 5", "0x10", "٣", "9" * 40):
        msg = _error(server.post("/v1/completions", {"prompt": "x", "max_tokens": 2, "logit_bias": {key: 1}}), 400,
                     "logit_bias")
        assert "token id" in msg or "vocabulary" in msg
    r = server.post("/v1/completions", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}")
    _error(r, 400)
    assert server.post("/v1/completions", {"prompt": "abc", "max_tokens": 2}).status_code == 200


def test_an_engine_failure_is_a_500_and_the_server_goes_on(tiny_target, tmp_path):
    """The model file changes under the running server (a real engine failure): 500 in OpenAI's shape, the
    process keeps serving what it can."""
    path = tmp_path / "model.gguf"
    shutil.copy(tiny_target, path)
    s = Served("--target", path, "--n-ctx", 256)
    try:
        assert s.post("/v1/completions", {"prompt": "abc", "max_tokens": 3}).status_code == 200
        with open(path, "ab") as f:
            f.write(b"\0" * 4096)
        msg = _error(s.post("/v1/completions", {"prompt": "abc", "max_tokens": 3}), 500)
        assert "the engine failed" in msg and "changed" in msg
        assert str(tmp_path) not in msg and "model.gguf" in msg  # (the log keeps the path)
        s.wait_for(re.escape(f"edgecad: error in POST /v1/completions: ") + ".*" + re.escape(str(path)))
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/v1/models").status_code == 200
        s.wait_for("^POST /v1/completions 500 engine failed")
    finally:
        assert s.stop() == 0, s.log


def test_a_model_that_cannot_load_is_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all" * 100)
    s = Served("--target", bad, ready=False)
    assert s.wait(60) == 1
    errors = [l for l in s.lines if l.startswith("edgecad: error:")]
    assert len(errors) == 1 and "bad.gguf" in errors[0] and "Traceback" not in s.log


def test_a_port_in_use_is_one_line(server):
    port = server.url.rsplit(":", 1)[1]
    r = subprocess.run([sys.executable, "-m", "edgecad.cli", "serve", "--port", port, "--target", "x.gguf"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot listen" in r.stderr and "--port" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- queue, disconnects, shutdown

def test_a_client_that_disconnects_mid_stream_frees_the_engine(paging_pair):
    s = _slow_server(paging_pair)
    try:
        with Engine(paging_pair[1], mode="target", n_ctx=512) as e:
            fresh = e.create_completion("Once upon a time", temperature=0, max_tokens=12)["edgecad"]["token_ids"]
        with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                          json={"prompt": "hello the world", "max_tokens": 400, "stream": True, "temperature": 0}) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got == 3:
                    break  # leaving the block closes the connection
        r = s.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200 and r.json()["edgecad"]["token_ids"] == fresh
        # the dropped stream stopped early: it never ran its 400 tokens
        dropped = s.wait_for("^POST /v1/completions 200", count=2)[0]  # the dropped stream's ended first
        assert "client gone" in dropped, s.log
        assert int(dropped.split("stopped after ")[1].split()[0]) < 100, dropped
    finally:
        assert s.stop() == 0, s.log


def test_a_full_queue_gives_429_with_retry_after(paging_pair):
    """--max-queue 1: one request runs, one waits (and is answered once the first ends), the third is refused."""
    s = _slow_server(paging_pair, "--max-queue", 1)
    try:
        with ThreadPoolExecutor(1) as pool:
            with httpx.stream("POST", s.url + "/v1/completions", timeout=60, json={
                    "prompt": "hello the world", "max_tokens": 200, "stream": True, "temperature": 0}) as r:
                lines = r.iter_lines()  # (kept: a dropped iterator closes the response)
                next(lines)  # the first is running
                waiting = pool.submit(s.post, "/v1/completions", {"prompt": "abc", "max_tokens": 2})
                deadline = time.monotonic() + 60
                while httpx.get(s.url + "/health").json()["waiting"] < 1:
                    assert time.monotonic() < deadline, "the second request never queued:\n" + s.log
                    time.sleep(0.05)
                busy = s.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
                assert "busy" in _error(busy, 429) and int(busy.headers["retry-after"]) > 0
                # refused before its body is read: a body that would be a 400 is a 429 too
                assert "busy" in _error(s.post("/v1/completions", b'{"prompt": '), 429)
            assert waiting.result(60).status_code == 200
    finally:
        assert s.stop() == 0, s.log


def test_a_non_streaming_request_whose_client_went_away_is_cancelled(paging_pair):
    s = _slow_server(paging_pair)
    try:
        with pytest.raises(httpx.ReadTimeout):
            s.post("/v1/completions", {"prompt": "hello the world", "max_tokens": 400, "temperature": 0}, timeout=2)
        r = s.post("/v1/completions", {"prompt": "abc", "max_tokens": 2})
        assert r.status_code == 200
        line = s.wait_for("^POST /v1/completions 503")[0]
        assert "cancelled after" in line, s.log
    finally:
        assert s.stop() == 0, s.log


def test_queued_requests_are_served_in_arrival_order(paging_pair):
    """One request runs; four arrive one after another (each queued before the next is sent) and wait: they are
    answered first in, first out, as the server's docstring promises. Each asks for its own number of tokens, which
    names it in the server's log; the log's lines are written as responses end, in the order they end."""
    s = _slow_server(paging_pair)
    lengths = (3, 4, 5, 6)
    try:
        with ThreadPoolExecutor(len(lengths)) as pool:
            with httpx.stream("POST", s.url + "/v1/completions", timeout=60, json={
                    "prompt": "hello the world", "max_tokens": 400, "stream": True, "temperature": 0}) as r:
                lines = r.iter_lines()
                next(lines)  # the first is running
                waiting = []
                for i, n in enumerate(lengths):
                    waiting.append(pool.submit(s.post, "/v1/completions", {"prompt": "abc", "max_tokens": n,
                                                                           "temperature": 0}, timeout=120))
                    deadline = time.monotonic() + 60
                    while httpx.get(s.url + "/health").json()["waiting"] < i + 1:
                        assert time.monotonic() < deadline, f"request {i + 1} never queued:\n" + s.log
                        assert not waiting[-1].done(), waiting[-1].result().text  # answered before its turn
                        time.sleep(0.02)
            # leaving the block drops the running stream: the queue runs
            answers = [f.result(120) for f in waiting]
        assert [a.status_code for a in answers] == [200] * len(lengths), [a.text for a in answers]
        assert [a.json()["usage"]["completion_tokens"] for a in answers] == list(lengths)
        done = s.wait_for(r"^POST /v1/completions 200 prompt \d+ \+ [3-6] tokens", count=len(lengths))
        assert [int(re.search(r"\+ (\d+) tokens", l).group(1)) for l in done] == list(lengths), s.log
    finally:
        assert s.stop() == 0, s.log


def _wide_target(disk_dir):
    """A 64 MB target (16 layers of 4 MB) on real storage: at 90% pinned on emulated SD-card storage (45 MB/s), its
    load reads about 58 MB, over a second, once it is dropped from the page cache (test_cli's Ctrl-C test uses it)."""
    from edgecad import tiny
    target = disk_dir / "wide-target.gguf"
    if not target.exists():
        tiny.write_model(target, tiny.TinySpec(n_layer=16, n_embd=256, n_ff=1024, seed=3))
    return target


def test_health_says_loading_until_the_engine_is_ready(disk_dir):
    """/health is polled from the moment the process starts (on a port chosen beforehand: the ready line comes
    only after the load): it answers 503 {"status": "loading"} (and a completion 503 naming /health) before it
    answers 200, never after. The load is slow as on a device, not by a sleep: a target read from emulated SD-card
    storage after it is dropped from the page cache; the test fails if no "loading" answer was seen."""
    from edgecad.cgroup import drop_file_cache
    from edgecad.rpc.harness import free_port
    target = _wide_target(disk_dir)
    drop_file_cache([target])
    s = Served("--target", target, "--mode", "target", "--target-budget", "90%", "--storage", "sd", "--n-ctx", 256,
               port=free_port(), ready=False)
    try:
        seen, refused, deadline = [], None, time.monotonic() + 120
        while not seen or seen[-1][0] != 200:
            assert time.monotonic() < deadline, f"/health never said ok: {seen}\n" + s.log
            assert s.proc.poll() is None, s.log
            try:
                r = httpx.get(s.url + "/health", timeout=10)
            except httpx.TransportError:  # not listening yet
                time.sleep(0.01)
                continue
            seen.append((r.status_code, r.json()))
            if r.status_code == 503 and refused is None:
                refused = s.post("/v1/completions", {"prompt": "abc", "max_tokens": 2})
            time.sleep(0.01)
        assert seen[:-1] and all(x == (503, {"status": "loading"}) for x in seen[:-1]), seen
        assert seen[-1] == (200, {"status": "ok", "running": 0, "waiting": 0})
        assert "still loading" in _error(refused, 503) and refused.headers["retry-after"] == "5"
        s.wait_ready()
        assert s.post("/v1/completions", {"prompt": "abc", "max_tokens": 2}).status_code == 200
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
    finally:
        assert s.stop() == 0, s.log


def test_an_engine_failure_mid_stream_ends_it_with_an_error_event_and_done(paging_pair, disk_dir):
    """The paged target's file grows under a running stream (the pager sees it and stops the pass): the stream,
    its 200 sent, ends with an error event in OpenAI's shape and then [DONE], and the server goes on."""
    path = disk_dir / "cut-mid-stream.gguf"
    shutil.copy(paging_pair[1], path)
    s = Served("--target", path, "--mode", "target", "--target-budget", "50%", "--storage", "sd", "--n-ctx", 512)
    try:
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=60, json={
                "messages": CHAT, "max_tokens": 400, "stream": True, "temperature": 0}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            with open(path, "ab") as f:
                f.write(b"\0" * 4096)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]" and len(rest) < 400, rest[-3:]
        error = json.loads(rest[-2])["error"]
        assert set(error) == {"message", "type", "param", "code"} and "changed" in error["message"]
        assert all(json.loads(d)["choices"][0]["finish_reason"] is None for d in rest[:-2])
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        assert s.stop() == 0, s.log
        path.unlink()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_during_a_stream_ends_it_and_exits_cleanly(paging_pair, sig):
    s = _slow_server(paging_pair)
    with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                      json={"prompt": "hello the world", "max_tokens": 400, "stream": True, "temperature": 0}) as r:
        lines = r.iter_lines()
        next(lines)
        s.proc.send_signal(sig)
        rest = [line[6:] for line in lines if line.startswith("data: ")]  # the stream ends instead of hanging
    assert s.wait(60) == 0, s.log
    # cut, and said so: an error event in OpenAI's shape, then [DONE]
    assert rest[-1] == "[DONE]", rest[-3:]
    assert all(json.loads(d)["choices"][0]["finish_reason"] is None for d in rest[:-2])
    error = json.loads(rest[-2])["error"]
    assert "server is stopping" in error["message"] and error["code"] == "server_shutdown"
    assert "server stopping" in s.log and "server stopped" in s.log and "Traceback" not in s.log


def test_the_server_binds_loopback_by_default_and_warns_without_a_key_elsewhere(tiny_target):
    s = Served("--target", tiny_target, "--n-ctx", 256)
    try:
        assert s.url.startswith("http://127.0.0.1:")
    finally:
        assert s.stop() == 0
    s = Served("--target", tiny_target, "--n-ctx", 256, "--host", "0.0.0.0")
    try:
        assert any("without an API key" in l for l in s.lines), s.log
    finally:
        assert s.stop() == 0


@pytest.mark.skipif(not cgroup.available()[0], reason=f"no memory cgroup: {cgroup.available()[1]}")
def test_at_the_memory_floor_the_server_answers_503_and_serves_again_once_memory_is_back(budget_pair):
    """The server's cgroup soft limit falls under what any plan needs (the runtime alone is more): a completion
    stops at its first pass with 503 in OpenAI's shape (Retry-After, code insufficient_memory, what it needs), the
    log says so, and the server goes on: once the limit is back, the same request is answered."""
    draft, target = budget_pair
    with cgroup.MemoryCgroup(2 * 10 ** 9, "serve") as cg:
        srv = Served("--target", target, "--draft", draft, "--n-ctx", "512", cg=cg)
        try:
            body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
            cg.set_limits(soft=40 * 10 ** 6)
            r = srv.post("/v1/completions", body)
            assert r.status_code == 503 and r.headers.get("retry-after"), r.text
            err = r.json()["error"]
            assert err["code"] == "insufficient_memory" and "it needs at least" in err["message"], err
            srv.wait_for("stopped at the memory floor")
            cg.set_limits(soft=2 * 10 ** 9)
            r = srv.post("/v1/completions", body)
            assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
        finally:
            srv.stop()

