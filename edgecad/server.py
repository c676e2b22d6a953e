"""`edgecad serve`: an OpenAI-compatible HTTP server over one Engine (FastAPI, uvicorn, sse-starlette).

One Engine computes one completion at a time, on one worker thread, so every call into it (load, completions,
closing a stream, close) runs there in submission order. Requests take turns in arrival order (asyncio.Lock
wakes its waiters first in, first out); up to `max_queue` may wait behind the running one, more get 429. A
request whose client went away, or that a shutdown (Ctrl-C, SIGTERM) overtakes, ends at its next chunk: its
stream is closed, which leaves both KV caches holding only the accepted tokens, so the next request gets a
fresh engine's tokens (and still reuses the common prompt prefix).

The response shapes are the Engine's own (llama-cpp-python's, which are OpenAI's) with `model` set to the served
name; errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`. Every request passes the HTTP edge
first (edgecad.edge: Host, Origin and CORS, the API key, a full queue, the body's size, the log line).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from . import native
from .arguments import SAMPLING, text_message
from .errors import EdgecadError, MemoryFloorError, RequestError
from .responses import join, openai_chunks

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, create_model
    from sse_starlette.sse import EventSourceResponse, SendTimeoutError
    from starlette.exceptions import HTTPException
except ImportError as e:  # the optional extra
    raise EdgecadError(f"`edgecad serve` needs the server extra ({e.name} is missing): "
                       "pip install \"edgecad[server]\" (from a checkout: pip install \".[server]\")") from None

from .edge import Edge, error_response  # (after the extra's check: the edge is an ASGI app of starlette's)

MiB = 1 << 20


@dataclass(frozen=True)
class ServerParams:
    host: str = "127.0.0.1"       # address to bind: loopback unless the user asks for another
    port: int = 8000              # TCP port; 0 = a free one (the ready line says which)
    api_key: Optional[str] = None  # when set, /v1/* requires "Authorization: Bearer <api_key>"
    max_queue: int = 8            # requests that may wait behind the running one; more are refused (429)
    max_body: int = 4 * MiB       # bytes of a request body; more is refused (413)
    names: tuple[str, ...] = ()   # what the model answers to in `model` and GET /v1/models (the first: responses)
    cors_origins: tuple[str, ...] = ()  # web pages (origins) allowed beside loopback's, "*" for any; others get 403
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted beside loopback names, IP addresses and `host`

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise EdgecadError(f"port {self.port} is out of range: use 1..65535, or 0 for any free port")
        if self.max_queue < 0:
            raise EdgecadError(f"max_queue={self.max_queue} is out of range: use 0 or more waiting requests")


# ---------------------------------------------------------------------------- requests
# OpenAI's and llama-cpp-python's request fields. Unknown fields are refused, as OpenAI does; fields the Engine
# does not implement are passed to it, and it refuses a value other than the default in one line (400).

class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    typical_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[dict] = None  # {"include_usage": true}: a last chunk with the usage (no choices)
    n: Optional[int] = None
    user: Optional[str] = None
    tfs_z: Optional[float] = None
    mirostat_mode: Optional[int] = None
    mirostat_tau: Optional[float] = None
    mirostat_eta: Optional[float] = None


# and the sampling arguments, as edgecad.arguments declares them (the Engine checks their ranges)
_Body = create_model("_Body", __base__=_Fields, **{a.name: (Optional[a.json], None) for a in SAMPLING})


class CompletionRequest(_Body):
    prompt: Union[str, list[str], list[int]]
    suffix: Optional[str] = None
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None


class ChatCompletionRequest(_Body):
    messages: list[dict[str, Any]]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Union[str, dict, None] = None
    functions: Optional[list] = None
    function_call: Union[str, dict, None] = None
    parallel_tool_calls: Optional[bool] = None
    store: Optional[bool] = None
    metadata: Optional[dict] = None


MAX_STOPS = 16  # stop strings per request (OpenAI allows 4): each token is searched for every one of them
_SERVER_ONLY = {"model", "stream", "stream_options", "n", "best_of", "user", "max_completion_tokens",
                "parallel_tool_calls", "store", "metadata", "prompt", "messages"}


def _engine_args(body: _Body, n_ctx: int) -> dict:
    """The Engine's keyword arguments for a request: the fields the client set, checked where the Engine
    cannot (one choice per request, max_tokens within the context, message contents as text)."""
    given = body.model_dump(exclude_unset=True)
    for name in ("n", "best_of"):
        if given.get(name) not in (None, 1):
            raise RequestError(f"{name}={given[name]} is not supported: edgecad returns one choice per request "
                               f"(send {given[name]} requests, or leave {name} at 1)", name)
    stop = given.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOPS:
        raise RequestError(f"{len(stop)} stop strings are too many: give at most {MAX_STOPS}", "stop")
    args = {k: v for k, v in given.items() if k not in _SERVER_ONLY and v is not None}
    limit = next((given[k] for k in ("max_completion_tokens", "max_tokens") if given.get(k) is not None), None)
    if limit is not None:
        if limit > n_ctx:
            raise RequestError(f"max_tokens={limit} is more than the context holds ({n_ctx} tokens, prompt "
                               f"included): ask for at most {n_ctx}, or start the server with a larger --n-ctx",
                               "max_tokens")
        args["max_tokens"] = limit
    if isinstance(body, ChatCompletionRequest):
        args["messages"] = [text_message(m, i) for i, m in enumerate(body.messages)]
    else:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise RequestError(f"a list of {len(prompt)} prompts is not supported: send one prompt per request",
                                   "prompt")
            prompt = prompt[0]
        args["prompt"] = prompt
    return args


# ---------------------------------------------------------------------------- errors

def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """pydantic's first complaint as one line: malformed JSON, an unknown field, a value of the wrong type."""
    e = exc.errors()[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    if e.get("type") == "json_invalid":
        return error_response(400, f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])}): "
                                   "send a JSON object", "invalid_request_error")
    if e.get("type") == "extra_forbidden":
        return error_response(400, f"unrecognized request argument supplied: {field}", "invalid_request_error", field)
    if not loc and e.get("type") == "missing":
        return error_response(400, "the request body is empty: send a JSON object of the request's arguments",
                              "invalid_request_error")
    if e.get("type") == "model_attributes_type" and not loc:
        return error_response(400, "the request body must be a JSON object of the request's arguments",
                              "invalid_request_error")
    if e.get("type") == "missing":
        return error_response(400, f"missing required argument: {field}", "invalid_request_error", field)
    return error_response(400, f"{field}: {e['msg']}" if field else e["msg"], "invalid_request_error", field)


# ---------------------------------------------------------------------------- the server

class Server:
    """The app's state: the engine (None while it loads), its worker thread, the queue, the shutdown flag."""

    def __init__(self, load: Callable[[], Any], params: ServerParams):
        self.params, self._load = params, load
        self.engine = None
        self.load_error: Optional[str] = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="edgecad-engine")
        self.turn = asyncio.Lock()
        self.pending = 0  # requests running or waiting for their turn
        self.stopping = False  # set when uvicorn begins its shutdown
        self.uvicorn: Optional[uvicorn.Server] = None
        self.address = ""  # http://host:port, once listening
        self.app = self._build_app()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    @property
    def name(self) -> str:
        return self.params.names[0] if self.params.names else "edgecad"

    # -------------------------------------------------------------- app

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="edgecad", description="OpenAI-compatible API of an edgecad engine",
                      lifespan=self._lifespan)
        app.add_exception_handler(RequestValidationError, lambda r, e: _validation_error(e))
        app.add_exception_handler(HTTPException, lambda r, e: error_response(
            e.status_code, f"{r.method} {r.url.path}: {e.detail}", "invalid_request_error",
            code="not_found" if e.status_code == 404 else None, headers=e.headers))

        @app.get("/health")
        async def health():
            if self.engine is None:
                return JSONResponse({"status": "loading"}, 503)
            return {"status": "ok", "running": min(self.pending, 1), "waiting": max(self.pending - 1, 0)}

        @app.get("/v1/models")
        async def models():  # one entry per model (a request may name it by its other names too)
            return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                                "owned_by": "edgecad"}]}

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request):
            return await self._complete(request, body)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest, request: Request):
            return await self._complete(request, body)

        return Edge(app, self.params, self.busy)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        # uvicorn has its own SIGINT handler now: chain edgecad's C one in front of it, so that Ctrl-C also
        # stops C code that waits (a pass on slow storage, a load) as it does in the other commands
        native.lib.ec_interrupt_install()
        asyncio.get_running_loop().run_in_executor(self.pool, self._load_engine)
        yield
        self.stopping = True
        await self._run(self._close)

    def _load_engine(self) -> None:
        """On the engine's thread: load, then say where it serves (or why it cannot, and stop the server)."""
        try:
            self.engine = self._load()
        except BaseException as e:  # a model file at fault, Ctrl-C during the load, a bug: say it, stop serving
            if not (isinstance(e, KeyboardInterrupt) and self.stopping):
                self.load_error = _describe(e)
            self.uvicorn.should_exit = True
            return
        if not self.stopping:
            plan = self.engine.memory_plan
            sys.stderr.write(f"edgecad: serving {self.name} ({plan.config}, n_ctx {self.engine.n_ctx}) at "
                             f"{self.address}/v1; Ctrl-C stops\n")
            sys.stderr.flush()

    def _close(self) -> None:  # on the engine's thread, after the load and any chunk being computed
        if self.engine is not None:
            self.engine.close()

    # -------------------------------------------------------------- completions

    def busy(self) -> Optional[JSONResponse]:
        """429 when max_queue requests wait already (checked by the edge before a body is read, and again here)."""
        if self.pending <= self.params.max_queue:
            return None
        return error_response(429, f"the server is busy: {self.pending} requests are running or waiting "
                                   f"(--max-queue {self.params.max_queue}); retry later", "rate_limit_error",
                              headers={"Retry-After": "2"})

    async def _complete(self, request: Request, body: _Body):
        """A completion request: refused now (loading, another model, bad arguments, a full queue), or run in its
        turn and streamed as events or joined."""
        chat, name = isinstance(body, ChatCompletionRequest), body.model or self.name
        if self.engine is None:
            return error_response(503, "the model is still loading: retry in a few seconds (GET /health says when "
                                       "it is ready)", "unavailable_error", headers={"Retry-After": "5"})
        if body.model is not None and self.params.names and body.model not in self.params.names:
            return error_response(404, f"model {body.model!r} is not served here: use one of "
                                       f"{', '.join(self.params.names)} (GET /v1/models)", "invalid_request_error",
                                  "model", "model_not_found")
        try:
            args = _engine_args(body, self.engine.n_ctx)
        except RequestError as e:
            return error_response(400, str(e), "invalid_request_error", e.param, e.code)
        busy = self.busy()
        if busy is not None:
            return busy
        self.pending += 1
        try:
            await self.turn.acquire()
        except BaseException:  # cancelled while waiting (a forced shutdown)
            self.pending -= 1
            raise
        stream = None

        def done() -> None:  # once; closing the stream runs on the engine's thread before the next request's calls
            nonlocal stream
            if stream is False:
                return
            if stream is not None:
                self.pool.submit(stream.close)
            stream = False
            self.pending -= 1
            self.turn.release()

        try:
            if await request.is_disconnected() or self.stopping:
                done()
                return _cancelled(request, "before it ran")
            create = self.engine.create_chat_completion if chat else self.engine.create_completion
            stream = await self._run(lambda: create(**args, stream=True))
            first = await self._run(next, stream, None)
        except RequestError as e:
            done()
            return error_response(400, str(e), "invalid_request_error", e.param, e.code)
        except BaseException as e:
            done()
            if isinstance(e, asyncio.CancelledError):
                raise
            return self._failure(e, request)
        if body.stream:
            usage = (body.stream_options or {}).get("include_usage") is True
            return _Stream(self._events(request, stream, first, name, usage), done, sep="\n", ping=15,
                           send_timeout=30)
        return await self._joined(request, stream, first, name, done)

    async def _joined(self, request: Request, stream, first, name: str, done: Callable[[], None]):
        """The response of a request not streamed: the stream's chunks joined, once they all came; done() gives
        the engine back however it ends."""
        try:
            chunks = [first]
            while chunks[-1] is not None:
                if await request.is_disconnected() or self.stopping:
                    return _cancelled(request, f"after {len(chunks)} chunks")
                chunks.append(await self._run(next, stream, None))
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                raise
            return self._failure(e, request)
        finally:
            done()
        result = {**join(chunks[:-1]), "model": name}
        _log_completion(request, result)
        return result

    async def _events(self, request: Request, stream, first, name: str, usage: bool):
        """Server-sent events: each chunk as `data: {json}` in OpenAI's stream shape (responses.openai_chunks;
        usage: the request's stream_options.include_usage), then `data: [DONE]`. A stream the server cuts (an
        engine failure, a shutdown) ends with an error event in OpenAI's shape, then `data: [DONE]`: the status
        is sent already, and a client can tell the answer was cut."""
        sent, chunk = 0, first
        try:
            while chunk is not None:
                if "usage" in chunk:
                    _log_completion(request, chunk)
                for out in openai_chunks({**chunk, "model": name}, usage):
                    yield {"data": json.dumps(out)}
                sent += 1
                if chunk["choices"][0]["finish_reason"] is not None:  # the last chunk: the answer is whole (even
                    chunk = None  # if the server began stopping while it was sent); done() closes the stream
                elif self.stopping:
                    break
                else:
                    chunk = await self._run(next, stream, None)
        except (Exception, KeyboardInterrupt) as e:
            if not (self.stopping or isinstance(e, KeyboardInterrupt)):  # (Ctrl-C stopped the pass: stopping)
                chunk = None
                yield {"data": self._failure(e, request).body.decode()}
        finally:
            if chunk is not None:  # ended early: the client went away, or the server is stopping
                request.state.log = (f" stopped after {sent} chunks ("
                                     + ("server stopping)" if self.stopping else "client gone)"))
        if chunk is not None:  # the server is stopping (a client gone gets nothing: the generator is closed)
            yield {"data": json.dumps({"error": {
                "message": f"the server is stopping: this answer was cut after {sent} chunks", "type": "server_error",
                "param": None, "code": "server_shutdown"}})}
        yield {"data": "[DONE]"}

    def _failure(self, e: BaseException, request: Request) -> JSONResponse:
        """An engine failure: 500 with its message, and the server goes on with the next request; or, when a
        Ctrl-C stopped the pass, the request cancelled."""
        if self.stopping or isinstance(e, KeyboardInterrupt):
            return _cancelled(request, "by Ctrl-C")
        msg = _describe(e)
        sys.stderr.write(f"edgecad: error in {request.method} {request.url.path}: {msg}\n")
        if isinstance(e, MemoryFloorError):  # the device's memory fell under what the engine needs: try later
            request.state.log = " stopped at the memory floor"
            return error_response(503, _without_paths(str(e)), "server_error", code="insufficient_memory",
                                  headers={"Retry-After": "10"})
        request.state.log = " engine failed"
        public = _without_paths(str(e)) if isinstance(e, EdgecadError) else \
            f"{type(e).__name__} (the server's log says more)"
        return error_response(500, f"the engine failed: {public}", "server_error")


def _describe(e: BaseException) -> str:
    """An exception as one line: edgecad's own messages as they are, anything else with its type."""
    return str(e) if isinstance(e, EdgecadError) else f"{type(e).__name__}: {e}"


def _without_paths(msg: str) -> str:
    """A message for a client: the server's file paths cut to their file names (the log keeps them whole)."""
    return re.sub(r"(?<![\w.:/~-])~?(?:/[^\s/'\"(),:;]+)+/?", lambda m: os.path.basename(m.group().rstrip("/")),
                  msg)


def _cancelled(request: Request, when: str) -> JSONResponse:
    request.state.log = f" cancelled {when}"
    return error_response(503, f"the request was cancelled {when}: the client went away or the server is stopping",
                          "unavailable_error")


class _Stream(EventSourceResponse):
    """An event stream that gives the engine back when it ends, however it ends (finished, the client gone or
    not reading for send_timeout seconds, a shutdown), even when its events were never started."""

    def __init__(self, events, done: Callable[[], None], **kw):
        super().__init__(events, **kw)
        self._done = done

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:  # the client stopped reading: it loses its stream, the others get the engine
            scope["state"]["log"] = scope["state"].get("log", "") + " (client stopped reading)"
        finally:
            self._done()


def _log_completion(request: Request, last: dict) -> None:
    """What the access log line says of a completion (the Edge writes the line when the response ends)."""
    u, st = last.get("usage") or {}, last.get("edgecad") or {}
    request.state.log = (f" prompt {u.get('prompt_tokens', 0)} + {u.get('completion_tokens', 0)} tokens, "
                         f"{st.get('tokens_per_second', 0.0):.1f} tok/s, {st.get('config', '?')}"
                         + "".join(f"; moved at token {m['at_token']} from {m['from']} to {m['to']}: {m['why']}"
                                   for m in st.get("moves") or ())
                         + "".join(f"; before it, moved from {m['from']} to {m['to']}: {m['why']}"
                                   for m in st.get("moves_before") or ()))


def _host(h: str) -> str:
    return f"[{h}]" if ":" in h else h


# ---------------------------------------------------------------------------- main

def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv4 or IPv6), or one line naming the fix."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise EdgecadError(f"cannot listen on {_host(host)}:{port}: {e.strerror or e}: choose another --port "
                           "(or --host)") from None
    sock.set_inheritable(True)
    return sock


def serve(load: Callable[[], Any], params: ServerParams) -> int:
    """Listen, load the engine (GET /health says "loading" meanwhile), serve until Ctrl-C or SIGTERM. Returns
    the exit status (1 when the engine could not be loaded)."""
    sock = listen(params.host, params.port)
    if params.host not in ("127.0.0.1", "::1", "localhost") and params.api_key is None:
        sys.stderr.write(f"edgecad: warning: serving on {params.host} without an API key: anyone who can reach "
                         "this address can use the model (set --api-key)\n")
    srv = Server(load, params)
    host, port = sock.getsockname()[:2]
    srv.address = f"http://{_host(host)}:{port}"
    # limit_concurrency: connections and requests at once (more get 503 from uvicorn): the queue, its clients'
    # keep-alive connections and a margin for /health and /v1/models
    config = uvicorn.Config(srv.app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=30, limit_concurrency=params.max_queue + 64)
    srv.uvicorn = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").addFilter(_not_cancelled)
    _watch_exit(srv)
    try:
        srv.uvicorn.run(sockets=[sock])
    finally:
        srv.pool.shutdown(wait=True)
        sock.close()
    if srv.load_error is not None:
        raise EdgecadError(srv.load_error)
    sys.stderr.write("edgecad: server stopped\n")
    return 0


def _not_cancelled(record: logging.LogRecord) -> bool:
    """uvicorn's log without the tracebacks of what its forced exit (a second Ctrl-C) cancels: the running requests
    (each one's own log line says it was cut short) and the app's lifespan (starlette reports it as text)."""
    if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
        return False
    return not str(record.msg).rstrip().endswith("asyncio.exceptions.CancelledError")


def _watch_exit(srv: Server) -> None:
    """Ctrl-C or SIGTERM: mark the server stopping, so that running requests end at their next chunk instead of
    holding the shutdown, and let uvicorn shut down (a second Ctrl-C forces it). Unlike uvicorn's own handler
    this does not raise the signal again once the server is down: the exit is a clean one."""
    def on_exit(sig, frame):
        srv.stopping = True
        if srv.uvicorn.should_exit and sig == signal.SIGINT:
            srv.uvicorn.force_exit = True
        srv.uvicorn.should_exit = True

    srv.uvicorn.handle_exit = on_exit
