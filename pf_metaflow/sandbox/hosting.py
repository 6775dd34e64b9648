"""How ``pf-metaflow sandbox serve`` runs the sandbox: Starlette routing on uvicorn.

The escrow API itself is a WSGI app (:class:`~pf_metaflow.sandbox.server.SandboxApp`, so
tests and fault injectors wrap it as plain WSGI middleware). This module hosts it as ASGI:

- :func:`make_asgi_app` puts it behind :class:`WSGIBridge` in a Starlette router, beside any
  other ASGI apps given as ``mounts`` (the MCP SDK's streamable-HTTP app at ``/mcp``, for
  example) and with their ``lifespan``, all in one process and on one port;
- :class:`WSGIBridge` reads a request's body on the event loop first, bounded in size and
  time (413 / 408 before any worker is used), then runs the WSGI app on a bounded pool of
  worker threads: a slow client costs a socket, never a thread;
- :func:`make_server` runs it on uvicorn with :class:`Limits`: a connection cap (answered
  503 JSON at once beyond it), a deadline for a request's headers and one for its body,
  a keep-alive timeout, a header size limit (431 JSON) and a graceful shutdown timeout.

Every refusal made here is a short JSON answer in the live error shape
(``{"error": ..., "message": ...}``), like the app's own.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional

import anyio
import h11
import uvicorn
from starlette.routing import Mount, Router
from uvicorn.protocols.http.h11_impl import H11Protocol

from .parsing import MAX_BODY, dumps

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]],
                   Awaitable[None]]
WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

log = logging.getLogger("pf_metaflow.sandbox")


@dataclass(frozen=True)
class Limits:
    """What one sandbox server process allows.

    Parameters
    ----------
    max_connections
        Open connections at once; one more is answered 503 and closed.
    workers
        Threads running the escrow app (SQLite work); more requests wait their turn.
    header_timeout
        Seconds for a request line and headers to arrive (else 408 and closed).
    body_timeout
        Seconds for a request body to arrive (else 408).
    keep_alive
        Seconds an idle connection is kept open between requests.
    max_header_bytes
        Request line plus headers (over it: 431).
    max_body
        Request body bytes, with Content-Length or chunked (over it: 413).
    drain_body
        Bytes of a refused body read and dropped before the 413 (a lingering close, as web
        servers do): closing with the client's bytes unread makes the kernel send a reset,
        which can reach the client before it reads the answer. A body declared larger than
        this is refused at once.
    graceful_shutdown
        Seconds requests in flight get to finish on SIGTERM / Ctrl-C.
    backlog
        Connections the kernel queues before they are accepted.
    """

    max_connections: int = 256
    workers: int = 8
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    keep_alive: int = 5
    max_header_bytes: int = 16 * 1024
    max_body: int = MAX_BODY
    drain_body: int = 16 * MAX_BODY
    graceful_shutdown: int = 5
    backlog: int = 128


_TOO_LARGE_MORE_TO_COME = b"\0 over the limit, more to come"  # a sentinel, compared by identity


def _refusal(status: int, error: str, message: str, *, close: bool = True) -> bytes:
    """A whole HTTP/1.1 answer, for refusals made before any app has the request."""
    body = dumps({"error": error, "message": message}).encode()
    reason = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
              431: "Request Header Fields Too Large", 503: "Service Unavailable"}[status]
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n" + ("connection: close\r\n" if close else "")
            + "\r\n")
    return head.encode("ascii") + body


async def _send_json(send: Callable, status: int, error: str, message: str) -> None:
    body = dumps({"error": error, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class WSGIBridge:
    """ASGI -> WSGI for small JSON APIs: the body is read whole on the event loop (bounded
    in size and time), then the app runs on at most ``workers`` threads.

    Unlike a streaming bridge (a2wsgi), no worker thread ever waits on a slow client, and
    a body over the limit is refused before the app sees any of it.
    """

    def __init__(self, app: WSGIApp, limits: Limits = Limits()) -> None:
        self.app = app
        self.limits = limits
        self._workers = anyio.CapacityLimiter(limits.workers)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":  # nothing to start or stop
            message = await receive()
            while message["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
                message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(key) + len(value) + 4 for key, value in scope["headers"])
        if head > self.limits.max_header_bytes:  # h11 only bounds a head still arriving
            await _send_json(send, 431, "request_header_fields_too_large",
                             f"the request line and headers are over "
                             f"{self.limits.max_header_bytes // 1024} KiB")
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or len(declared) > 20):
            await _send_json(send, 400, "invalid_request", "Content-Length is not a byte count")
            return
        if declared is not None and int(declared) > self.limits.max_body:
            if int(declared) <= self.limits.drain_body:
                await self._drain(receive, int(declared))
            await _send_json(send, 413, "payload_too_large",
                             f"request body is larger than {self.limits.max_body // 1024} KiB")
            return
        try:
            with anyio.fail_after(self.limits.body_timeout):
                body = await self._read_body(receive)
        except TimeoutError:
            await _send_json(send, 408, "request_timeout",
                             f"the request body did not arrive within "
                             f"{self.limits.body_timeout:g}s")
            return
        if body is None or body is _TOO_LARGE_MORE_TO_COME:
            if body is _TOO_LARGE_MORE_TO_COME:
                await self._drain(receive, self.limits.drain_body)
            await _send_json(send, 413, "payload_too_large",
                             f"request body is larger than {self.limits.max_body // 1024} KiB")
            return
        environ = _environ(scope, body)
        status, headers, chunks = await anyio.to_thread.run_sync(
            self._run, environ, limiter=self._workers)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"".join(chunks)})

    async def _drain(self, receive: Callable, at_most: int) -> None:
        """Read and drop what is left of a refused body: up to ``at_most`` bytes, within the
        body timeout (see ``Limits.drain_body``)."""
        dropped = 0
        with anyio.move_on_after(self.limits.body_timeout):
            while dropped <= at_most:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                dropped += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return

    async def _read_body(self, receive: Callable) -> Optional[bytes]:
        """The body; None if it is over the limit and has ended, ``_TOO_LARGE_MORE_TO_COME`` if
        it is over the limit and the client is still sending."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body:
                return _TOO_LARGE_MORE_TO_COME if message.get("more_body", False) else None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _run(self, environ: dict) -> tuple[int, list, list]:
        started: dict[str, Any] = {}

        def start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
            started["status"], started["headers"] = status, headers
            return lambda data: chunks.append(data)

        chunks: list[bytes] = []
        try:
            result = self.app(environ, start_response)
            try:
                chunks.extend(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:  # a middleware failed: an answer, not a dropped connection
            traceback.print_exc(file=sys.stderr)
            body = dumps({"error": "internal_error", "message": "internal error"}).encode()
            return 500, [(b"content-type", b"application/json")], [body]
        status = int(started["status"].split(" ", 1)[0])
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                   for k, v in started["headers"]]
        return status, headers, chunks


def _header(scope: dict, name: bytes) -> Optional[str]:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1").strip()
    return None


def _environ(scope: dict, body: bytes) -> dict:
    """PEP 3333 environ for a request whose body has been read (its length is now known)."""
    server = scope.get("server") or ("127.0.0.1", 0)
    client = scope.get("client") or ("", 0)
    root = scope.get("root_path", "")
    path = scope["path"]
    if root and path.startswith(root):
        path = path[len(root):]
    environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": root.encode("utf-8").decode("latin-1"),
        "PATH_INFO": path.encode("utf-8", "surrogateescape").decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "REMOTE_ADDR": client[0],
        "REMOTE_PORT": str(client[1]),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for key, value in scope["headers"]:
        name = key.decode("latin-1").upper().replace("-", "_")
        if name in ("CONTENT_LENGTH", "TRANSFER_ENCODING"):
            continue  # the body is whole now: its length is the one above
        if name == "CONTENT_TYPE":
            environ["CONTENT_TYPE"] = value.decode("latin-1")
            continue
        name = "HTTP_" + name
        text = value.decode("latin-1")
        environ[name] = f"{environ[name]},{text}" if name in environ else text
    return environ


def make_asgi_app(
    app: WSGIApp,
    *,
    mounts: Optional[Mapping[str, ASGIApp]] = None,
    lifespan: Optional[Callable[[Any], Any]] = None,
    limits: Limits = Limits(),
) -> ASGIApp:
    """The sandbox WSGI ``app`` as one ASGI app, with other ASGI apps mounted beside it.

    ``mounts`` maps a path prefix to an ASGI app (``{"/mcp": mcp_app}``); requests for the
    prefix or under it go there with their scope unchanged (full path, as the MCP SDK's
    ``streamable_http_app()`` routes it), everything else to the sandbox. ``lifespan`` is a Starlette lifespan (an
    async context manager factory taking the app) run at startup and shutdown, e.g. the MCP
    session manager's ``run()``: Starlette does not run a mounted app's own lifespan.
    No route ever redirects (``redirect_slashes`` is off: a redirect would be built from
    the client's Host header).
    """
    dispatch = _PrefixDispatch(mounts or {}, WSGIBridge(app, limits))
    return Router(routes=[Mount("", app=dispatch)], redirect_slashes=False, lifespan=lifespan)


class _PrefixDispatch:
    """``/mcp`` and ``/mcp/...`` to the app mounted at ``/mcp``, with the scope as sent (the
    MCP SDK's app routes the full path itself); everything else to ``default``."""

    def __init__(self, mounts: Mapping[str, ASGIApp], default: ASGIApp) -> None:
        self.mounts = [("/" + prefix.strip("/"), mounted) for prefix, mounted in mounts.items()]
        self.default = default

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        for prefix, mounted in self.mounts:
            if path == prefix or path.startswith(prefix + "/"):
                await mounted(scope, receive, send)
                return
        await self.default(scope, receive, send)


class SandboxH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the limits uvicorn lacks: a connection cap answered at
    once, a deadline for each request's headers (slow clients are closed, not served
    forever), and JSON refusals instead of text ones."""

    limits: Limits = Limits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            transport.write(_refusal(503, "service_unavailable",
                                     f"more than {self.limits.max_connections} connections "
                                     "are open; try again"))
            transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_request():
            self._arm()
        super().data_received(data)
        if not self._waiting_for_request():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # arms uvicorn's keep-alive timeout

    def _waiting_for_request(self) -> bool:
        return self.conn.their_state is h11.IDLE and (
            self.cycle is None or self.cycle.response_complete)

    def _arm(self) -> None:
        if self._header_deadline is None and not self.transport.is_closing():
            self._header_deadline = self.loop.call_later(self.limits.header_timeout,
                                                         self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._waiting_for_request() and not self.transport.is_closing():
            if self.conn.trailing_data[0]:  # part of a request came: say why we hang up
                self.transport.write(_refusal(
                    408, "request_timeout",
                    f"the request headers did not arrive within {self.limits.header_timeout:g}s"))
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        too_big = len(self.conn.trailing_data[0]) > self.limits.max_header_bytes
        if too_big:
            answer = _refusal(431, "request_header_fields_too_large",
                              f"the request line and headers are over "
                              f"{self.limits.max_header_bytes // 1024} KiB")
        else:
            answer = _refusal(400, "invalid_request", "the request is not valid HTTP/1.1")
        self.transport.write(answer)
        self.transport.close()


def _protocol_for(limits: Limits) -> type:
    return type("SandboxH11Protocol", (SandboxH11Protocol,), {"limits": limits})


class HTTPServer:
    """A bound listening socket served by uvicorn; the same shape as werkzeug's server
    (``serve_forever``, ``shutdown``, ``server_close``, ``server_port``, ``host``)."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0,
                 limits: Limits = Limits()) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(limits.backlog)
        except OSError:
            self.socket.close()
            raise
        self.host = host
        self.server_port = self.socket.getsockname()[1]
        self.limits = limits
        self.config = uvicorn.Config(
            app,
            http=_protocol_for(limits),
            lifespan="on",
            interface="asgi3",
            log_level="warning",
            access_log=False,
            timeout_keep_alive=limits.keep_alive,
            timeout_graceful_shutdown=limits.graceful_shutdown,
            h11_max_incomplete_event_size=limits.max_header_bytes,
            backlog=limits.backlog,
        )
        self._uvicorn = uvicorn.Server(self.config)
        self._done = threading.Event()

    def serve_forever(self, poll_interval: float = 0.1) -> None:
        """Serve until :meth:`shutdown` (or SIGTERM / Ctrl-C in the main thread)."""
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        self._done.wait(self.limits.graceful_shutdown + 5)

    def server_close(self) -> None:
        self.socket.close()


def make_server(app: ASGIApp, host: str = "127.0.0.1", port: int = 0,
                limits: Limits = Limits()) -> HTTPServer:
    """uvicorn serving the ASGI ``app`` on ``host:port`` within ``limits``, bound, not yet
    serving (read ``server_port`` when ``port=0``)."""
    return HTTPServer(app, host, port, limits)
