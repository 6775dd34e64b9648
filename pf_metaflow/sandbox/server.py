"""The sandbox escrow over HTTP: the live Purple Flea wire protocol plus sandbox extensions.

``make_app(engine)`` is a plain WSGI callable (wrap it in any middleware, e.g. a test's
fault injector); ``serve()`` runs it on Werkzeug's threaded server. The protocol is the
live service's (paths, field names, status codes, JSON number amounts, an ``_info``
object in every body), plus what the live service lacks:

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

import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from decimal import Decimal
from typing import Any, Callable, Iterable, Optional

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from .. import __version__
from ..errors import AuthenticationError, InvalidRequest, PurpleFleaError, RateLimited
from ..money import usdc_str
from .engine import SandboxEngine

SERVICE = "pf-metaflow sandbox"
Rate = tuple  # (count, seconds)
WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


class _Request(Request):
    max_content_length = 64 * 1024  # escrow requests are tiny; refuse anything else


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


def _json_default(value: Any) -> Any:
    # Amounts are JSON numbers on the wire, as live. A 6-place Decimal below 1e9 survives
    # the trip through a double exactly (its shortest repr is the same decimal).
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"cannot send {type(value).__name__} as JSON")


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
            Rule("/escrow/release/<escrow_id>", endpoint="release", methods=["POST"]),
            Rule("/escrow/complete/<escrow_id>", endpoint="complete", methods=["POST"]),
            Rule("/escrow/dispute/<escrow_id>", endpoint="dispute", methods=["POST"]),
            Rule("/escrow/<escrow_id>", endpoint="get", methods=["GET"]),
            Rule("/faucet/register", endpoint="register", methods=["POST"]),
            Rule("/faucet/claim", endpoint="claim", methods=["POST"]),
            Rule("/wallet/balance", endpoint="balance", methods=["GET"]),
            Rule("/sandbox/balances", endpoint="balances", methods=["GET"]),
        ]
        if self.refunds:
            rules.append(Rule("/escrow/refund/<escrow_id>", endpoint="refund", methods=["POST"]))
        self.url_map = Map(rules, strict_slashes=False)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        request = _Request(environ)
        return self.dispatch(request)(environ, start_response)

    # -- plumbing ------------------------------------------------------------------

    def dispatch(self, request: Request) -> Response:
        adapter = self.url_map.bind_to_environ(request.environ)
        try:
            endpoint, args = adapter.match()
            return getattr(self, "on_" + endpoint)(request, **args)
        except PurpleFleaError as exc:
            return self._error(exc)
        except HTTPException as exc:
            code = _HTTP_CODES.get(exc.code or 500, "http_error")
            response = self._json({"error": code, "message": exc.description}, exc.code or 500)
            if exc.code == 405 and hasattr(exc, "valid_methods") and exc.valid_methods:
                response.headers["Allow"] = ", ".join(exc.valid_methods)
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
        return Response(
            json.dumps(body, default=_json_default), status=status, mimetype="application/json"
        )

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
        raw = request.get_data()
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw, parse_float=Decimal)
        except ValueError:
            raise InvalidRequest("request body is not JSON", code="invalid_json") from None
        if not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object", code="invalid_json")
        return body

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
        key = request.headers.get("Idempotency-Key") if self.idempotency else None
        record, replayed = self.engine.create(
            creator,
            amount_usd=body.get("amount_usd"),
            description=body.get("description"),
            counterparty_agent_id=body.get("counterparty_agent_id"),
            timeout_hours=body.get("timeout_hours"),
            referral_code=body.get("referral_code"),
            idempotency_key=key,
        )
        response = self._json(record, 201)
        if replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return response

    def on_release(self, request: Request, escrow_id: str) -> Response:
        self._limit(request, "release")
        result = self.engine.release(self._agent(request), escrow_id)
        result["message"] = (
            f"{usdc_str(result['amount_released'])} USDC released to counterparty."
        )
        return self._json(result)

    def on_complete(self, request: Request, escrow_id: str) -> Response:
        self._limit(request, "complete")
        result = self.engine.complete(self._agent(request), escrow_id)
        result["message"] = "Task marked complete. Waiting for creator to release funds."
        return self._json(result)

    def on_dispute(self, request: Request, escrow_id: str) -> Response:
        self._limit(request, "dispute")
        agent = self._agent(request)
        result = self.engine.dispute(agent, escrow_id, self._body(request).get("reason"))
        result["message"] = "Escrow flagged for manual review; its funds stay locked."
        return self._json(result)

    def on_get(self, request: Request, escrow_id: str) -> Response:
        return self._json(self.engine.get(escrow_id))

    def on_openapi(self, request: Request) -> Response:
        paths: dict[str, dict] = {}
        for rule in self.url_map.iter_rules():
            path = rule.rule.replace("<", "{").replace(">", "}")
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                paths.setdefault(path, {})[method.lower()] = {"operationId": rule.endpoint}
        return self._json({
            "openapi": "3.0.3",
            "info": {"title": "Purple Flea agent escrow (pf-metaflow sandbox)",
                     "version": __version__},
            "paths": dict(sorted(paths.items())),
            "x-pf-sandbox": {"extensions": self.extensions},
        })

    # -- sandbox extensions ------------------------------------------------------------

    def on_refund(self, request: Request, escrow_id: str) -> Response:
        self._limit(request, "refund")
        result = self.engine.refund(self._agent(request), escrow_id)
        result["message"] = f"{usdc_str(result['amount_refunded'])} USDC refunded to creator."
        return self._json(result)

    def on_register(self, request: Request) -> Response:
        return self._json(self.engine.register(self._body(request).get("name")), 201)

    def on_claim(self, request: Request) -> Response:
        agent = self._agent(request)
        return self._json(self.engine.claim(agent, self._body(request).get("amount")))

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
    """A threaded Werkzeug server for ``app``, bound but not yet serving."""
    return make_server(host, port, app, threaded=True, request_handler=QuietRequestHandler)


def server_url(server: BaseWSGIServer) -> str:
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
) -> None:
    """Serve the sandbox escrow until interrupted (Ctrl-C or SIGTERM).

    Prints one line, ``pf-metaflow sandbox serving on http://HOST:PORT``, once it is
    listening (read it to learn the port when ``port=0``). ``wrap`` is applied to the
    app before serving (middleware, e.g. fault injection in tests).
    """
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
    server = make_http_server(app, host, port)
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _stop_on_sigterm)
        # Inside the try: a SIGTERM right after the line is printed must stop us cleanly.
        mode = ""
        if sandbox_app.live_limits is not None:
            mode = f"; live mode: {sandbox_app.live_limits.describe()}"
        print(
            f"pf-metaflow sandbox serving on {server_url(server)} (db: {engine.path}; "
            f"extensions: {', '.join(sandbox_app.extensions)}{mode})",
            flush=True,
        )
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
