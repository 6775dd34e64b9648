"""The sandbox escrow over HTTP: the live Purple Flea wire protocol plus sandbox extensions.

``make_app(engine)`` is a plain WSGI callable (wrap it in any middleware, e.g. a test's
fault injector); ``serve()`` runs it on uvicorn behind a Starlette router, with connection,
worker, time and size limits, beside any ASGI apps mounted with it (``mounts={"/mcp": app}``;
see :mod:`.hosting`). Every input is checked within fixed limits before any work
(:mod:`.parsing`), every refusal is a short JSON 4xx, amounts are JSON numbers written from
their exact decimal digits, and ``/openapi.json`` is a complete OpenAPI 3.1 document
(:mod:`.openapi`). The protocol is the live service's (paths, field names, status codes, JSON
number amounts, an ``_info`` object in every body), plus what the live service lacks:

- ``POST /escrow/refund/{id}``: full refund to the creator, no commission;
- ``Idempotency-Key`` on ``POST /escrow/create``: same key and body -> the first answer
  again with ``Idempotent-Replayed: true``; same key, another body -> 409;
- ``POST /faucet/register``, ``POST /faucet/claim``, ``GET /wallet/balance``,
  ``GET /sandbox/balances``.

``/openapi.json`` names the enabled extensions under ``x-pf-sandbox``: that is how a client
tells a sandbox from the live service. With ``refunds=False, idempotency=False`` the server
behaves like live for settling: no refund path, ``Idempotency-Key`` ignored.

``live=True`` (``pf-metaflow sandbox serve --live``) goes further and behaves like the live
service in its rate limits too (see :class:`LiveRateLimits`): no refund path, no idempotency
(not advertised), and live's fixed 60 s windows keyed on the request path and the client's
first ``X-Forwarded-For`` / ``X-Real-IP`` address, answering 429 with live's body and no
``Retry-After`` header. Without ``live`` the limits are the sandbox's own: per connecting
address, across escrows, with ``Retry-After``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import traceback
from decimal import Decimal
from typing import Any, Callable, Iterable, Mapping, Optional

from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import BaseConverter, Map, RequestRedirect, Rule
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler
from werkzeug.serving import make_server as make_werkzeug_server
from werkzeug.wrappers import Request, Response

from .. import __version__
from ..errors import AuthenticationError, NotFound, PurpleFleaError, RateLimited
from ..ids import ESCROW_ID_RE
from ..money import usdc_str
from . import openapi, parsing
from .engine import SandboxEngine
from .hosting import Limits, make_asgi_app, make_server

SERVICE = "pf-metaflow sandbox"
Rate = tuple  # (count, seconds)
WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
_HTTP_MESSAGES = {404: "no such path", 405: "method not allowed on this path"}
# Path segments that name an operation, never an escrow: GET /escrow/create is a 405 on the
# create path, not a lookup of an escrow called "create".
_OPERATIONS = ("create", "stats", "release", "complete", "dispute", "refund")


class _EscrowIdConverter(BaseConverter):
    regex = r"(?!(?:%s)$)[^/]+" % "|".join(_OPERATIONS)


def _escrow_id(escrow_id: str) -> str:
    """An id of the escrow form; anything else is an escrow that does not exist (never
    repeated in the message: a path segment can be kilobytes long)."""
    if not ESCROW_ID_RE.match(escrow_id):
        raise NotFound("escrow not found (an escrow id is esc_ and up to 64 letters, digits, "
                       "'_' or '-')")
    return escrow_id


class RateLimiter:
    """``count`` requests per ``seconds`` per key, fixed windows (as live).

    A window opens with a key's first request and lasts ``seconds``; every request in it
    counts, refused ones too, and a refused request does not extend it.
    """

    _PRUNE_ABOVE = 4096  # windows kept before expired ones are dropped

    def __init__(self, count: int, seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if count < 1 or seconds <= 0:
            raise ValueError(f"a rate needs count >= 1 and seconds > 0, got {count}/{seconds}")
        self.count = count
        self.seconds = seconds
        self._clock = clock
        self._windows: dict[str, list] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> Optional[int]:
        """None if this request may go ahead, else whole seconds until the window ends."""
        now = self._clock()
        with self._lock:
            window = self._windows.get(client)
            if window is None or now - window[0] >= self.seconds:
                if window is None and len(self._windows) >= self._PRUNE_ABOVE:
                    self._prune(now)
                self._windows[client] = [now, 1]
                return None
            window[1] += 1
            if window[1] <= self.count:
                return None
            return max(1, math.ceil(window[0] + self.seconds - now))

    def _prune(self, now: float) -> None:
        # One key per escrow path (live mode) would otherwise grow without bound.
        expired = [key for key, (start, _) in self._windows.items()
                   if now - start >= self.seconds]
        for key in expired:
            del self._windows[key]


def _js_seconds(seconds: float) -> str:
    """Seconds as live's message writes them (JavaScript ``windowMs / 1000``): 60, 2.5."""
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


class LiveRateLimits:
    """The live service's rate limits, for ``serve --live``.

    Live (its public source) puts a fixed-window limiter in front of each POST route:
    creates 20, release and complete 30, dispute 10, per 60 s. A bucket is keyed on the
    request path and the client address, so all of a client's creates share
    ``/escrow/create`` while release, complete and dispute count per escrow
    (``/escrow/release/esc_…``). The address is the first ``X-Forwarded-For`` entry, else
    ``X-Real-IP``, else one bucket shared by everyone (live sits behind a proxy that sets
    them; the connecting address is never used). Over the limit: 429
    ``{"error": "rate_limited", "message": "Too many requests. Limit: N per Ss"}`` and no
    ``Retry-After`` header.
    """

    CREATE: Rate = (20, 60.0)
    RELEASE: Rate = (30, 60.0)  # release and complete
    DISPUTE: Rate = (10, 60.0)

    def __init__(
        self,
        create_rate: Optional[Rate] = None,
        release_rate: Optional[Rate] = None,
        dispute_rate: Optional[Rate] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        release = release_rate or self.RELEASE
        self.rates: dict[str, Rate] = {
            "create": tuple(create_rate or self.CREATE),
            "release": tuple(release),
            "complete": tuple(release),
            "dispute": tuple(dispute_rate or self.DISPUTE),
        }
        self._limiters = {op: RateLimiter(*rate, clock=clock) for op, rate in self.rates.items()}

    @staticmethod
    def client_address(request: Request) -> str:
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        return forwarded or request.headers.get("X-Real-IP", "") or "unknown"

    def check(self, request: Request, operation: str) -> None:
        """Count this request; raise :class:`RateLimited` (no ``retry_after``) if over."""
        limiter = self._limiters.get(operation)
        if limiter is None:
            return
        key = f"{request.path}:{self.client_address(request)}"
        if limiter.retry_after(key) is not None:
            raise RateLimited(
                f"Too many requests. Limit: {limiter.count} per {_js_seconds(limiter.seconds)}s"
            )

    def describe(self) -> str:
        def rate(op: str) -> str:
            count, seconds = self.rates[op]
            return f"{count}/{_js_seconds(seconds)}s"

        return (f"creates {rate('create')} per client address; release and complete "
                f"{rate('release')}, dispute {rate('dispute')} per escrow path; no Retry-After")


def app_extensions(idempotency: bool, refunds: bool) -> list[str]:
    """The sandbox extensions a server with these settings offers, as advertised."""
    enabled = (("refund", refunds), ("idempotency", idempotency), ("faucet", True),
               ("balance", True))
    return [name for name, on in enabled if on]


class SandboxApp:
    """The WSGI application. Build it with :func:`make_app`."""

    def __init__(
        self,
        engine: SandboxEngine,
        *,
        idempotency: Optional[bool] = None,
        refunds: Optional[bool] = None,
        create_rate: Optional[Rate] = None,
        release_rate: Optional[Rate] = None,
        dispute_rate: Optional[Rate] = None,
        live: bool = False,
    ) -> None:
        if live and (idempotency or refunds):
            raise ValueError("live mode has no refund endpoint and no idempotency keys")
        self.engine = engine
        self.live = live
        self.idempotency = not live if idempotency is None else idempotency
        self.refunds = not live if refunds is None else refunds
        self.extensions = app_extensions(self.idempotency, self.refunds)
        self.live_limits: Optional[LiveRateLimits] = (
            LiveRateLimits(create_rate, release_rate, dispute_rate) if live else None
        )
        # Refunds get the release rate but their own windows (live limits per path).
        self._limits = {
            operation: RateLimiter(*rate) if rate and not live else None
            for operation, rate in (("create", create_rate), ("release", release_rate),
                                    ("refund", release_rate), ("dispute", dispute_rate))
        }
        rules = [
            Rule("/", endpoint="index", methods=["GET"]),
            Rule("/health", endpoint="health", methods=["GET"]),
            Rule("/openapi.json", endpoint="openapi", methods=["GET"]),
            Rule("/escrow/stats", endpoint="stats", methods=["GET"]),
            Rule("/escrow/create", endpoint="create", methods=["POST"]),
            Rule("/escrow/release/<escrow_id:escrow_id>", endpoint="release", methods=["POST"]),
            Rule("/escrow/complete/<escrow_id:escrow_id>", endpoint="complete", methods=["POST"]),
            Rule("/escrow/dispute/<escrow_id:escrow_id>", endpoint="dispute", methods=["POST"]),
            Rule("/escrow/<escrow_id:escrow_id>", endpoint="get", methods=["GET"]),
            Rule("/faucet/register", endpoint="register", methods=["POST"]),
            Rule("/faucet/claim", endpoint="claim", methods=["POST"]),
            Rule("/wallet/balance", endpoint="balance", methods=["GET"]),
            Rule("/sandbox/balances", endpoint="balances", methods=["GET"]),
        ]
        if self.refunds:
            rules.append(Rule("/escrow/refund/<escrow_id:escrow_id>", endpoint="refund",
                              methods=["POST"]))
        # No redirects of any kind (they would be built from the client's Host header): a
        # path is matched as sent, or it is a 404.
        self.url_map = Map(rules, strict_slashes=False, merge_slashes=False,
                           redirect_defaults=False, converters={"escrow_id": _EscrowIdConverter})
        self.openapi_document = openapi.document(
            version=__version__, extensions=self.extensions, refunds=self.refunds,
            idempotency=self.idempotency, sandbox_limits=not live,
        )

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        request = Request(environ)
        return self.dispatch(request)(environ, start_response)

    # -- plumbing ------------------------------------------------------------------

    def dispatch(self, request: Request) -> Response:
        # Bound to a fixed name, not the Host header: nothing is built from what a client
        # says the host is.
        adapter = self.url_map.bind("sandbox.invalid", path_info=request.path,
                                    url_scheme="http", query_args="")
        try:
            endpoint, args = adapter.match(method=request.method)
            return getattr(self, "on_" + endpoint)(request, **args)
        except PurpleFleaError as exc:
            return self._error(exc)
        except RequestRedirect:  # not configured to happen; never answer with one
            return self._json({"error": "not_found", "message": _HTTP_MESSAGES[404]}, 404)
        except HTTPException as exc:
            status = exc.code or 500
            code = _HTTP_CODES.get(status, "http_error")
            message = _HTTP_MESSAGES.get(status, "request refused")
            response = self._json({"error": code, "message": message}, status)
            if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
                response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
            return response
        except Exception:  # an answer, not a dropped connection, like live's onError
            traceback.print_exc(file=sys.stderr)
            return self._json({"error": "internal_error", "message": "internal error"}, 500)

    def _json(self, body: dict, status: int = 200) -> Response:
        body = dict(body)
        body["_info"] = {
            "service": SERVICE,
            "version": __version__,
            "sandbox": True,
            "extensions": self.extensions,
        }
        return Response(parsing.dumps(body), status=status, mimetype="application/json")

    def _error(self, exc: PurpleFleaError) -> Response:
        body: dict[str, Any] = {"error": exc.code, "message": exc.message}
        for key, value in exc.details.items():
            if key == "balance" and isinstance(value, str):
                value = Decimal(value)  # a number on the wire, as live
            body.setdefault(key, value)
        response = self._json(body, exc.status or 500)
        retry_after = exc.details.get("retry_after")
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response

    def _limit(self, request: Request, operation: str) -> None:
        if self.live_limits is not None:
            self.live_limits.check(request, operation)
            return
        limiter = self._limits.get(operation)
        if limiter is None:
            return
        wait = limiter.retry_after(request.remote_addr or "unknown")
        if wait is not None:
            raise RateLimited(
                f"too many {operation} requests: limit {limiter.count} per "
                f"{limiter.seconds:g}s; retry in {wait}s",
                details={"retry_after": wait},
            )

    def _agent(self, request: Request) -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError(
                "Authorization: Bearer <sandbox api key> required (get one from "
                "POST /faucet/register or `pf-metaflow sandbox register NAME`)"
            )
        agent = self.engine.agent_for_key(key.strip())
        if agent is None:
            raise AuthenticationError(
                "unknown API key: no agent of this sandbox has it (each sandbox database knows "
                "only the keys registered in it: `pf-metaflow sandbox register NAME`)"
            )
        return agent

    @staticmethod
    def _body(request: Request) -> dict:
        """The JSON object sent, read and checked within :mod:`.parsing`'s limits."""
        return parsing.parse_json_object(parsing.read_body(request.environ))

    # -- the live protocol -----------------------------------------------------------

    def on_index(self, request: Request) -> Response:
        return self._json({
            "service": SERVICE,
            "version": __version__,
            "description": "Local sandbox of Purple Flea agent escrow. Test money only.",
            "commission": "1% on released escrow. Referral: 15% of commission to referrer.",
            "extensions": self.extensions,
            "openapi": "/openapi.json",
        })

    def on_health(self, request: Request) -> Response:
        return self._json({"status": "ok", "service": SERVICE})

    def on_stats(self, request: Request) -> Response:
        return self._json(self.engine.stats())

    def on_create(self, request: Request) -> Response:
        self._limit(request, "create")
        creator = self._agent(request)
        body = self._body(request)
        key = None
        if self.idempotency:
            key = parsing.check_header(request.headers.get("Idempotency-Key"), "Idempotency-Key")
        # Checked here in live's order, with messages that repeat no long input.
        amount = parsing.amount(body.get("amount_usd"), "amount_usd")
        description = parsing.description(body.get("description"))
        counterparty = parsing.agent_id(body.get("counterparty_agent_id"),
                                        "counterparty_agent_id")
        record, replayed = self.engine.create(
            creator,
            amount_usd=amount,
            description=description,
            counterparty_agent_id=counterparty,
            timeout_hours=parsing.timeout_hours(body.get("timeout_hours")),
            referral_code=parsing.text(body.get("referral_code"), "referral_code",
                                       "invalid_referral_code", required=False,
                                       limit=parsing.MAX_REFERRAL_CODE),
            idempotency_key=key,
        )
        response = self._json(record, 201)
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return response

    def on_release(self, request: Request, escrow_id: str) -> Response:
        self._limit(request, "release")
        result = self.engine.release(self._agent(request), _escrow_id(escrow_id))
        result["message"] = (
            f"{usdc_str(result['amount_released'])} USDC released to counterparty."
        )
        return self._json(result)

    def on_complete(self, request: Request, escrow_id: str) -> Response:
        self._limit(request, "complete")
        result = self.engine.complete(self._agent(request), _escrow_id(escrow_id))
        result["message"] = "Task marked complete. Waiting for creator to release funds."
        return self._json(result)

    def on_dispute(self, request: Request, escrow_id: str) -> Response:
        self._limit(request, "dispute")
        agent = self._agent(request)
        reason = parsing.text(self._body(request).get("reason"), "reason", "invalid_reason",
                              required=False)
        result = self.engine.dispute(agent, _escrow_id(escrow_id), reason)
        result["message"] = "Escrow flagged for manual review; its funds stay locked."
        return self._json(result)

    def on_get(self, request: Request, escrow_id: str) -> Response:
        return self._json(self.engine.get(_escrow_id(escrow_id)))

    def on_openapi(self, request: Request) -> Response:
        # The document itself, with no _info: OpenAPI allows only x- extensions at the top.
        return Response(parsing.dumps(self.openapi_document), mimetype="application/json")

    # -- sandbox extensions ------------------------------------------------------------

    def on_refund(self, request: Request, escrow_id: str) -> Response:
        self._limit(request, "refund")
        result = self.engine.refund(self._agent(request), _escrow_id(escrow_id))
        result["message"] = f"{usdc_str(result['amount_refunded'])} USDC refunded to creator."
        return self._json(result)

    def on_register(self, request: Request) -> Response:
        name = parsing.text(self._body(request).get("name"), "name", "invalid_name",
                            limit=parsing.MAX_NAME)
        return self._json(self.engine.register(name), 201)

    def on_claim(self, request: Request) -> Response:
        agent = self._agent(request)
        amount = self._body(request).get("amount")
        if amount is not None:
            amount = parsing.amount(amount, "amount", minimum=None)
        return self._json(self.engine.claim(agent, amount))

    def on_balance(self, request: Request) -> Response:
        return self._json(self.engine.balance(self._agent(request)))

    def on_balances(self, request: Request) -> Response:
        return self._json(balances_json(self.engine.balances()))


def balances_json(balances: dict) -> dict:
    """:meth:`SandboxEngine.balances` with every amount as a decimal string."""
    return {
        "agents": {
            agent: {"usdc": usdc_str(b["usdc"]), "locked": usdc_str(b["locked"])}
            for agent, b in balances["agents"].items()
        },
        "house_fees": usdc_str(balances["house_fees"]),
        "minted": usdc_str(balances["minted"]),
    }


def make_app(
    engine: SandboxEngine,
    *,
    idempotency: Optional[bool] = None,
    refunds: Optional[bool] = None,
    create_rate: Optional[Rate] = None,
    release_rate: Optional[Rate] = None,
    dispute_rate: Optional[Rate] = None,
    live: bool = False,
) -> SandboxApp:
    """The sandbox escrow as a WSGI callable.

    Parameters
    ----------
    engine
        The escrow engine (its database file) behind the app.
    idempotency, refunds
        Sandbox extensions to offer (default: both, unless ``live``). Both False: settles
        like the live service.
    create_rate, release_rate, dispute_rate
        ``(count, seconds)``. Without ``live``: per connecting address across escrows,
        over it 429 with ``Retry-After``; None (default): unlimited; ``release_rate`` also
        limits refunds (a separate window). With ``live``: the numbers of live's limits
        (see :class:`LiveRateLimits`; ``release_rate`` covers release and complete),
        None: live's own (20/60, 30/60, 10/60).
    live
        Behave like the live service: no refund, no idempotency (neither advertised),
        live's rate limits.
    """
    return SandboxApp(
        engine,
        idempotency=idempotency,
        refunds=refunds,
        create_rate=create_rate,
        release_rate=release_rate,
        dispute_rate=dispute_rate,
        live=live,
    )


class QuietRequestHandler(WSGIRequestHandler):
    """No access log line per request (errors are still logged)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def make_http_server(app: WSGIApp, host: str = "127.0.0.1", port: int = 0) -> BaseWSGIServer:
    """A threaded Werkzeug server for a WSGI ``app`` in this process, bound, not serving.

    For tests that put WSGI middleware (fault injectors) in front of the app in their own
    process. It is not what ``pf-metaflow sandbox serve`` runs: that is :func:`serve`, on
    uvicorn with connection, thread, time and size limits (:mod:`.hosting`). The app's own
    checks (body size, JSON limits, exact amounts) hold on both.
    """
    return make_werkzeug_server(host, port, app, threaded=True,
                                request_handler=QuietRequestHandler)


def server_url(server: Any) -> str:
    host = server.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{server.server_port}"


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    db: Optional[str | os.PathLike] = None,
    *,
    idempotency: Optional[bool] = None,
    refunds: Optional[bool] = None,
    create_rate: Optional[Rate] = None,
    release_rate: Optional[Rate] = None,
    dispute_rate: Optional[Rate] = None,
    live: bool = False,
    wrap: Optional[Callable[[WSGIApp], WSGIApp]] = None,
    mounts: Optional[Mapping[str, Any]] = None,
    lifespan: Optional[Callable[[Any], Any]] = None,
    limits: Optional[Limits] = None,
) -> None:
    """Serve the sandbox escrow until interrupted (Ctrl-C or SIGTERM).

    Prints one line, ``pf-metaflow sandbox serving on http://HOST:PORT``, once it is
    listening (read it to learn the port when ``port=0``). ``wrap`` is applied to the
    (WSGI) app before serving (middleware, e.g. fault injection in tests). ``mounts`` maps
    path prefixes to other ASGI apps served in the same process (``{"/mcp": mcp_app}``),
    ``lifespan`` runs around serving (see :func:`.hosting.make_asgi_app`); ``limits``: the
    server's :class:`~.hosting.Limits` (connections, worker threads, timeouts, sizes).
    """
    limits = limits or Limits()
    engine = SandboxEngine(db if db is not None else SandboxEngine.default_path())
    sandbox_app = make_app(
        engine,
        idempotency=idempotency,
        refunds=refunds,
        create_rate=create_rate,
        release_rate=release_rate,
        dispute_rate=dispute_rate,
        live=live,
    )
    app: WSGIApp = sandbox_app
    if wrap is not None:
        app = wrap(app)
    engine.stats()  # opens (and if new, creates) the database before we listen
    if mounts is None:
        mounts, lifespan = _mcp_mount(engine, host, lifespan)
    server = make_server(make_asgi_app(app, mounts=mounts, lifespan=lifespan, limits=limits),
                         host, port, limits)
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _stop_on_sigterm)
        # Inside the try: a SIGTERM right after the line is printed must stop us cleanly.
        mode = ""
        if sandbox_app.live_limits is not None:
            mode = f"; live mode: {sandbox_app.live_limits.describe()}"
        print(
            f"pf-metaflow sandbox serving on {server_url(server)} (db: {engine.path}; "
            f"extensions: {', '.join(sandbox_app.extensions)}{mode}; "
            f"{'MCP at /mcp; ' if mounts and '/mcp' in mounts else ''}at most "
            f"{limits.max_connections} connections, {limits.workers} workers)",
            flush=True,
        )
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()


def _mcp_mount(engine: SandboxEngine, host: str, lifespan: Optional[Callable[[Any], Any]]):
    """``/mcp`` (the live MCP tool set on this engine) when the ``mcp`` extra is installed; the
    MCP session manager runs in the server's lifespan, around any lifespan the caller gave."""
    try:
        from ..mcp.server import mcp_asgi_app
        import mcp  # noqa: F401 - the SDK itself, not only our module
    except ImportError:
        return {}, lifespan
    from contextlib import asynccontextmanager

    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    # Bound beyond loopback, the Host header names whatever address clients use.
    mcp_app = mcp_asgi_app(engine, **({} if loopback else {"allowed_hosts": None}))

    @asynccontextmanager
    async def with_mcp(app):
        async with mcp_app.lifespan():
            if lifespan is None:
                yield
            else:
                async with lifespan(app):
                    yield

    return {"/mcp": mcp_app}, with_mcp


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
