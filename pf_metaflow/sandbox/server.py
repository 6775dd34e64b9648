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
    """``count`` requests per ``seconds`` per client address, fixed windows (as live)."""

    def __init__(self, count: int, seconds: float) -> None:
        if count < 1 or seconds <= 0:
            raise ValueError(f"a rate needs count >= 1 and seconds > 0, got {count}/{seconds}")
        self.count = count
        self.seconds = seconds
        self._windows: dict[str, list] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> Optional[int]:
        """None if this request may go ahead, else whole seconds until the window ends."""
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(client)
            if window is None or now - window[0] >= self.seconds:
                self._windows[client] = [now, 1]
                return None
            window[1] += 1
            if window[1] <= self.count:
                return None
            return max(1, math.ceil(window[0] + self.seconds - now))


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
        idempotency: bool = True,
        refunds: bool = True,
        create_rate: Optional[Rate] = None,
        release_rate: Optional[Rate] = None,
    ) -> None:
        self.engine = engine
        self.idempotency = idempotency
        self.refunds = refunds
        self.extensions = app_extensions(idempotency, refunds)
        # Refunds get the release rate but their own windows (live limits per path).
        self._limits = {
            operation: RateLimiter(*rate) if rate else None
            for operation, rate in (("create", create_rate), ("release", release_rate),
                                    ("refund", release_rate))
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
        if refunds:
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
        result = self.engine.complete(self._agent(request), escrow_id)
        result["message"] = "Task marked complete. Waiting for creator to release funds."
        return self._json(result)

    def on_dispute(self, request: Request, escrow_id: str) -> Response:
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
    idempotency: bool = True,
    refunds: bool = True,
    create_rate: Optional[Rate] = None,
    release_rate: Optional[Rate] = None,
) -> SandboxApp:
    """The sandbox escrow as a WSGI callable.

    Parameters
    ----------
    engine
        The escrow engine (its database file) behind the app.
    idempotency, refunds
        Sandbox extensions to offer. Both False: settles like the live service.
    create_rate, release_rate
        ``(count, seconds)`` per client address, e.g. ``(20, 60)`` as live; over it
        answers 429 with ``Retry-After``. None (default): unlimited. ``release_rate``
        also limits refunds (a separate window).
    """
    return SandboxApp(
        engine,
        idempotency=idempotency,
        refunds=refunds,
        create_rate=create_rate,
        release_rate=release_rate,
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
    idempotency: bool = True,
    refunds: bool = True,
    create_rate: Optional[Rate] = None,
    release_rate: Optional[Rate] = None,
    wrap: Optional[Callable[[WSGIApp], WSGIApp]] = None,
) -> None:
    """Serve the sandbox escrow until interrupted (Ctrl-C or SIGTERM).

    Prints one line, ``pf-metaflow sandbox serving on http://HOST:PORT``, once it is
    listening (read it to learn the port when ``port=0``). ``wrap`` is applied to the
    app before serving (middleware, e.g. fault injection in tests).
    """
    engine = SandboxEngine(db if db is not None else SandboxEngine.default_path())
    app: WSGIApp = make_app(
        engine,
        idempotency=idempotency,
        refunds=refunds,
        create_rate=create_rate,
        release_rate=release_rate,
    )
    if wrap is not None:
        app = wrap(app)
    engine.stats()  # opens (and if new, creates) the database before we listen
    server = make_http_server(app, host, port)
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _stop_on_sigterm)
        # Inside the try: a SIGTERM right after the line is printed must stop us cleanly.
        print(
            f"pf-metaflow sandbox serving on {server_url(server)} (db: {engine.path}; "
            f"extensions: {', '.join(app_extensions(idempotency, refunds))})",
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
