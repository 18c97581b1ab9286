"""The node's HTTP server: one ASGI app that dispatches to the routes and apps plugins contribute.

Served by Hypercorn on ``api.host:api.port``. Exact routes win over mounts, the longest mount
prefix wins among mounts, and anything else gets an OpenAI-style JSON 404. When ``api.key`` is set,
every path but ``/health`` needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import anyio
from attrs import define, field, frozen

from skulk_core.errors import ConfigError
from skulk_core.registry import HttpRegistry

log = logging.getLogger("skulk.http")

MAX_BODY = 16 * 1024 * 1024
OPEN_PATHS = frozenset({"/health"})


def error_body(message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape, used for every error the node's HTTP port returns."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@frozen
class HttpRequest:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # lower-cased names
    body: bytes = field(repr=False)
    path_params: Mapping[str, str] = field(factory=dict)  # {name} segments of the route

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@frozen
class HttpResponse:
    status: int = 200
    body: Any = None  # JSON-serialisable, or bytes sent as they are
    headers: Mapping[str, str] = field(factory=dict)
    content_type: str = "application/json"


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


async def _send_json(send: Callable, status: int, body: Any, headers: Mapping[str, str] | None = None, content_type: str = "application/json") -> None:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    raw_headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


@define
class Dispatcher:
    """The ASGI app the node serves."""

    registry: HttpRegistry
    api_key: str | None = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            # Mounted apps get no lifespan events: plugins start their work as node services.
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] not in ("http", "websocket"):
            return
        path: str = scope["path"]
        if self.api_key and path not in OPEN_PATHS and not self._authorized(scope):
            if scope["type"] == "http":
                await _send_json(
                    send,
                    401,
                    error_body("Missing or invalid API key: send 'Authorization: Bearer <key>'.", type_="authentication_error", code="invalid_api_key"),
                    {"www-authenticate": "Bearer"},
                )
            return
        if scope["type"] == "http":
            found = self._route(scope["method"], path)
            if found is not None:
                await self._call_route(found[0], found[1], scope, receive, send)
                return
        app = self._mount(path)
        if app is not None:
            await app(scope, receive, send)
            return
        if scope["type"] == "http":
            allowed = [key.split(" ", 1)[0] for key in self.registry.routes.names() if _match(key.split(" ", 1)[1], path) is not None]
            if allowed:
                await _send_json(send, 405, error_body(f"{scope['method']} is not allowed on {path}; use {', '.join(allowed)}"), {"allow": ", ".join(allowed)})
            else:
                await _send_json(send, 404, error_body(f"no such endpoint: {scope['method']} {path}", code="not_found"))

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())  # type: ignore[union-attr]
        return False

    def _route(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | None:
        method = method.upper()
        for wanted in (method, "GET") if method == "HEAD" else (method,):
            key = f"{wanted} {path}"
            if key in self.registry.routes:
                return self.registry.routes.get(key), {}
            for entry in self.registry.routes:
                route_method, pattern = entry.name.split(" ", 1)
                if route_method == wanted and "{" in pattern:
                    params = _match(pattern, path)
                    if params is not None:
                        return entry.value, params
        return None

    def _mount(self, path: str) -> Any | None:
        best = None
        for entry in self.registry.mounts:
            prefix = entry.name
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                if best is None or len(prefix) > len(best.name):
                    best = entry
        return None if best is None else best.value

    async def _call_route(self, handler: Handler, params: dict[str, str], scope: dict, receive: Callable, send: Callable) -> None:
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                await _send_json(send, 413, error_body(f"request body over {MAX_BODY} bytes"))
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        request = HttpRequest(
            method=scope["method"],
            path=scope["path"],
            query=dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))),
            headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())},
            body=b"".join(chunks),
            path_params=params,
        )
        try:
            response = await handler(request)
        except json.JSONDecodeError as exc:
            response = HttpResponse(400, error_body(f"the request body is not valid JSON: {exc}"))
        except Exception:
            log.exception("route %s %s failed", scope["method"], scope["path"])
            response = HttpResponse(500, error_body("internal error; see the node's log", type_="server_error"))
        await _send_json(send, response.status, response.body, response.headers, response.content_type)


def _match(pattern: str, path: str) -> dict[str, str] | None:
    """Match ``/instance/{instance_id}`` against a path; the ``{name}`` segments, or None."""
    if "{" not in pattern:
        return {} if pattern == path else None
    want, got = pattern.strip("/").split("/"), path.strip("/").split("/")
    if len(want) != len(got):
        return None
    params = {}
    for w, g in zip(want, got):
        if w.startswith("{") and w.endswith("}"):
            if not g:
                return None
            params[w[1:-1]] = g
        elif w != g:
            return None
    return params


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the API socket up front, so a busy port is a clear start-up error and port 0 works."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
        return sock
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port} for the HTTP API: {exc.strerror or exc}. "
            f"Is another node running? Choose another port with --api-port"
        ) from None


async def serve_http(app: Any, sock: socket.socket, *, task_status: Any = anyio.TASK_STATUS_IGNORED, graceful_timeout: float = 3.0) -> None:
    """Serve ``app`` on ``sock`` until cancelled, then shut down gracefully (shielded)."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config as HypercornConfig, Sockets

    class _Config(HypercornConfig):
        def create_sockets(self) -> Sockets:
            return Sockets([], [sock], [])

    config = _Config()
    config.graceful_timeout = graceful_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 30
    stop = anyio.Event()

    async def run() -> None:
        # Shielded so hypercorn shuts down on its own terms once ``stop`` is set.
        with anyio.CancelScope(shield=True):
            await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        task_status.started()
        try:
            await anyio.sleep_forever()
        finally:
            stop.set()
