"""The HTTP edge of `edgecad serve`: what every request passes before the app (edgecad.server), and the shape of
every error the server sends (OpenAI's `{"error": {"message", "type", "param", "code"}}`).

A server on 127.0.0.1 is reachable by every web page the user has open. A browser sends `Origin` with every
cross-origin POST: only loopback pages and the origins the user allows may use the server (anything else gets
403 before its body is read). A request without `Origin` is not a browser's (curl, the openai client). DNS
rebinding (a page whose own name resolves to 127.0.0.1) is stopped by the `Host` check: a browser sends the
page's name there, never an IP address it did not connect to.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import re
import socket
import sys
import time
from typing import Callable, Optional

from fastapi.responses import JSONResponse  # (the server extra: edgecad.server says so when it is missing)


def error_response(status: int, message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    """An error in OpenAI's shape."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status,
                        headers=headers)


_LOOPBACK = ("localhost", "127.0.0.1", "::1")
COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")


def _loopback_name(name: str) -> bool:
    return name in _LOOPBACK or name.endswith(".localhost")  # (browsers resolve *.localhost to loopback)


def _origins(params) -> set[str]:
    """The origins allowed beside loopback pages, as origin_allowed compares them ("*": any page)."""
    return {o.rstrip("/").lower() for o in params.cors_origins}


def _host_names(params) -> set[str]:
    """The Host names allowed beside loopback names and IP addresses: the address the server was told to bind,
    this machine's name when it listens beyond loopback, and the names the user allows."""
    names = {params.host.lower(), *(h.lower() for h in params.allowed_hosts)}
    if params.host not in _LOOPBACK:
        names |= {socket.gethostname().lower(), socket.gethostname().lower() + ".local"}
    return names


def origin_allowed(origin: str, allowed: set[str]) -> bool:
    """Whether a web page of this origin (scheme://host[:port]) may use the server: loopback pages, and the
    `allowed` origins (_origins)."""
    if "*" in allowed or origin.rstrip("/").lower() in allowed:
        return True
    m = re.fullmatch(r"https?://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?", origin)
    return m is not None and _loopback_name(m.group(1).strip("[]").lower())


def host_allowed(host: str, names: set[str]) -> bool:
    """Whether a request's Host header names this server: a loopback name, an IP address (a page cannot make a
    browser send an address it did not connect to), or one of `names` (_host_names)."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(:[0-9]{1,5})?", host)
    if m is None:
        return False
    name = m.group(1).strip("[]").lower().rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return _loopback_name(name) or name in names


def _reason(body: bytes) -> str:
    """A refusal's reason for the log line: its error message (OpenAI's shape), on one line and cut short (it may
    quote what the client sent)."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(message))
    return ": " + (text if len(text) <= 300 else text[:300] + "...")


def _cors(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


class Edge:
    """The HTTP edge, before the app: the Host and Origin checks, CORS (preflights answered here, before the
    key: browsers send no credentials on them), the API key (on everything but /health), a full queue refused
    before the body is read, the body's size (read and counted before the app sees it), and one log line per
    request (method, path, status, for a completion its tokens and speed, for a refusal (4xx) its reason)."""

    def __init__(self, app, params, busy: Callable[[], Optional[JSONResponse]]):
        self.app, self.params = app, params  # the server's ServerParams
        self.busy = busy  # the server's refusal when its queue is full (or None)
        self.origins, self.hosts = _origins(params), _host_names(params)  # (once, not per request)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, logged, reason = time.perf_counter(), [0], [False], [""]
        scope.setdefault("state", {})
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"").decode("latin-1") or None  # set: a web page's request
        page_ok = origin is not None and origin_allowed(origin, self.origins)

        def log():
            if not logged[0]:
                logged[0] = True
                sys.stderr.write(f"{scope['method']} {scope['path']} {status[0]}{scope['state'].get('log', '')} "
                                 f"({time.perf_counter() - t0:.2f} s){reason[0]}\n")

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if page_ok:
                    message = {**message, "headers": [*message.get("headers", []), *_cors(origin)]}
            if message["type"] == "http.response.body" and 400 <= status[0] < 500 and not reason[0]:
                reason[0] = _reason(message.get("body", b""))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                log()

        refusal = self._refusal(scope, headers, origin, page_ok)
        if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
            refusal, receive = await self._bounded(receive)
            if origin is None:  # not a browser: the body is JSON whatever the client labelled it (`curl -d`)
                scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")]}
        try:
            await (refusal or self.app)(scope, receive, send_logged)
        finally:
            log()  # a response that never ended (a stream whose client went away) is logged too

    def _refusal(self, scope, headers: dict, origin: Optional[str], page_ok: bool):
        """The response that ends a request before the app sees it, or None to go on."""
        p = self.params
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not host_allowed(host, self.hosts):
            return error_response(403, f"requests for host {host!r} are refused: this server answers to localhost "
                                       "and its IP addresses (a web page may be trying DNS rebinding); to use that "
                                       "name, start it with --allowed-hosts NAME", "permission_error",
                                  code="host_not_allowed")
        if origin is not None and not page_ok:
            return error_response(403, f"requests from the web page at {origin!r} are refused: to let that page use "
                                       f"this server, start it with --cors-origins {origin} (or EDGECAD_CORS_ORIGINS)",
                                  "permission_error", code="origin_not_allowed")
        if page_ok and scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            return _Preflight(headers)
        if p.api_key is not None and scope["path"] != "/health":
            auth = headers.get(b"authorization", b"")
            if not hmac.compare_digest(auth, f"Bearer {p.api_key}".encode()):
                return error_response(401, "missing or wrong API key: send the header \"Authorization: Bearer <key>\" "
                                           "with the key the server was started with (--api-key)",
                                      "authentication_error", code="invalid_api_key")
        busy = self.busy() if scope["method"] == "POST" and scope["path"] in COMPLETION_PATHS else None
        if busy is not None:
            return busy
        if page_ok and scope["method"] in ("POST", "PUT", "PATCH"):
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                return error_response(415, f"the request body is labelled {kind.decode('latin-1') or 'nothing'!r}: "
                                           "a web page must send it as JSON (content-type: application/json)",
                                      "invalid_request_error")
        return None

    async def _bounded(self, receive):
        """Read the whole body (at most max_body bytes) and hand it to the app from memory."""
        limit, parts, size = self.params.max_body, [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, receive  # the client went away: the app sees the disconnect
            size += len(message.get("body", b""))
            if size > limit:
                return error_response(413, f"the request body is larger than {limit:,} bytes: send a shorter "
                                           "prompt", "invalid_request_error"), receive
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(parts)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay


class _Preflight:
    """A CORS preflight from an allowed origin: the methods and headers a page may use (its CORS origin header
    is added by the edge, as on every response to a page)."""

    def __init__(self, headers: dict):
        asked = headers.get(b"access-control-request-headers", b"")
        self.headers = [(b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                        (b"access-control-allow-headers", asked[:1024] or b"authorization, content-type"),
                        (b"access-control-max-age", b"600")]
        if headers.get(b"access-control-request-private-network") == b"true":  # Chrome: a public page to loopback
            self.headers.append((b"access-control-allow-private-network", b"true"))

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": self.headers})
        await send({"type": "http.response.body", "body": b""})
