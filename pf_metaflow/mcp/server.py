"""The sandbox escrow over MCP: the live tool set, backed by the same engine as the HTTP API.

``mcp_asgi_app(engine)`` is an ASGI app serving MCP over streamable HTTP, stateless (no
session id), at whatever path it is mounted (the sandbox mounts it at ``/mcp``, as live).
``build_server(engine)`` is the same tools as an in-process MCP ``Server`` (the SDK's
low-level server), which the agent toolkit talks to over the SDK's in-memory transport
when no escrow URL is set (no network).

Tools, argument names, results and errors are live's (:mod:`pf_metaflow.mcp.tools`): a
result is one text content holding the HTTP API's JSON for the same call; an error is
``isError: true`` with ``{"error", "message"}`` and the HTTP API's code. The engine checks
everything in live's order, so bad input gets live's codes (``invalid_amount``,
``self_escrow``, ``counterparty_not_found``, ``insufficient_balance``, ``unauthorized``)
and moves nothing. No answer ever repeats the key.

Mounting (the sandbox server; Starlette)::

    mcp_app = mcp_asgi_app(engine)
    routes.append(Route("/mcp", endpoint=mcp_app))          # any method: GET, POST, DELETE
    # and run its lifespan inside the app's own:
    async with mcp_app.lifespan():
        ...

Served on its own (tests), the app answers ASGI ``lifespan`` events itself.
"""

from __future__ import annotations

import logging
import sys
import traceback
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Mapping, Optional, Sequence, Union

from .. import __version__
from ..errors import AuthenticationError, InvalidRequest, PurpleFleaError
from ..money import usdc_str
from .tools import KEY_ARG, MIN_DISPUTE_REASON, TOOL_NAMES, dumps, error_body, live_tools

log = logging.getLogger(__name__)

SERVICE = "pf-metaflow sandbox"
LOOPBACK_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*")

EngineLike = Any  # a pf_metaflow.sandbox.engine.SandboxEngine
EngineSource = Union[EngineLike, Callable[[], EngineLike]]


def _resolve(source: EngineSource) -> Callable[[], EngineLike]:
    if callable(source) and not hasattr(source, "create"):
        made: list = []

        def engine() -> EngineLike:
            if not made:
                made.append(source())
            return made[0]

        return engine
    return lambda: source


class EngineTools:
    """The six tools over a sandbox engine, synchronous: ``call(name, arguments) -> (is_error, body)``."""

    def __init__(self, engine: EngineSource) -> None:
        self._engine = _resolve(engine)

    @property
    def engine(self) -> EngineLike:
        return self._engine()

    def info(self) -> dict:
        return {"service": SERVICE, "version": __version__, "sandbox": True, "transport": "mcp"}

    def call(self, name: str, arguments: Optional[Mapping[str, Any]]) -> tuple[bool, dict]:
        args = dict(arguments or {})
        handler = getattr(self, "_" + name, None) if name in TOOL_NAMES else None
        try:
            if handler is None:
                raise InvalidRequest(f"unknown tool {name!r} (tools: {', '.join(TOOL_NAMES)})",
                                     code="unknown_tool")
            body = handler(args)
        except PurpleFleaError as exc:
            return True, {**error_body(exc.code, exc.message, exc.details), "_info": self.info()}
        except Exception:  # an answer, not a dropped call, as the HTTP API does
            traceback.print_exc(file=sys.stderr)
            return True, {**error_body("internal_error", "internal error"), "_info": self.info()}
        return False, {**body, "_info": self.info()}

    # -- authentication ----------------------------------------------------------

    def _agent(self, args: Mapping[str, Any]) -> str:
        key = args.get(KEY_ARG)
        if not isinstance(key, str) or not key.strip():
            raise AuthenticationError(f"{KEY_ARG} is required: your Purple Flea API key")
        agent = self.engine.agent_for_key(key.strip())
        if agent is None:
            raise AuthenticationError(
                f"invalid {KEY_ARG}: no agent of this sandbox has this key (the key is not shown)")
        return agent

    @staticmethod
    def _escrow_id(args: Mapping[str, Any]) -> str:
        value = args.get("escrow_id")
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequest("escrow_id is required (esc_...)", code="invalid_escrow_id")
        return value.strip()

    # -- the tools -----------------------------------------------------------------

    def _create_escrow(self, args: dict) -> dict:
        creator = self._agent(args)
        amount = args.get("amount_usd")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            from ..errors import InvalidAmount

            raise InvalidAmount(f"amount_usd must be a number of USDC (at least 0.10), got {amount!r}")
        record, _ = self.engine.create(
            creator,
            amount_usd=amount,
            description=args.get("description"),
            counterparty_agent_id=args.get("counterparty_agent_id"),
            timeout_hours=args.get("timeout_hours"),
            referral_code=args.get("referral_code"),
        )
        return record

    def _get_escrow(self, args: dict) -> dict:
        return self.engine.get(self._escrow_id(args))

    def _mark_complete(self, args: dict) -> dict:
        agent = self._agent(args)
        result = self.engine.complete(agent, self._escrow_id(args))
        result["message"] = "Task marked complete. Waiting for creator to release funds."
        return result

    def _release_escrow(self, args: dict) -> dict:
        agent = self._agent(args)
        result = self.engine.release(agent, self._escrow_id(args))
        result["message"] = f"{usdc_str(result['amount_released'])} USDC released to counterparty."
        return result

    def _dispute_escrow(self, args: dict) -> dict:
        agent = self._agent(args)
        escrow_id = self._escrow_id(args)
        reason = args.get("reason")
        if not isinstance(reason, str) or len(reason.strip()) < MIN_DISPUTE_REASON:
            raise InvalidRequest(f"reason must be at least {MIN_DISPUTE_REASON} characters",
                                 code="invalid_reason")
        result = self.engine.dispute(agent, escrow_id, reason)
        result["message"] = "Escrow flagged for manual review; its funds stay locked."
        return result

    def _escrow_stats(self, args: dict) -> dict:
        return self.engine.stats()


def build_server(engine: EngineSource, *, name: str = "purple-flea-escrow"):
    """The tools as an in-process MCP server (``mcp.server.Server``); engine calls run in a
    worker thread, so a busy SQLite file never blocks the event loop."""
    import anyio
    import mcp.types as types
    from mcp.server import Server

    tools = EngineTools(engine)
    listed = [types.Tool(name=t["name"], description=t["description"], input_schema=t["inputSchema"])
              for t in live_tools()]

    async def on_list_tools(ctx: Any, params: Any) -> Any:
        return types.ListToolsResult(tools=listed)

    async def on_call_tool(ctx: Any, params: Any) -> Any:
        is_error, body = await anyio.to_thread.run_sync(tools.call, params.name, params.arguments)
        return types.CallToolResult(content=[types.TextContent(type="text", text=dumps(body))],
                                    is_error=is_error)

    server = Server(name, version=__version__, on_list_tools=on_list_tools, on_call_tool=on_call_tool)
    server.pf_tools = tools  # type: ignore[attr-defined]
    return server


class McpAsgiApp:
    """MCP over streamable HTTP, stateless, as an ASGI app (see :func:`mcp_asgi_app`)."""

    def __init__(self, server: Any, manager: Any) -> None:
        self.server = server
        self.manager = manager
        self._running = False

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Run this around the serving app's life (once): ``async with mcp_app.lifespan(): ...``."""
        async with self.manager.run():
            self._running = True
            try:
                yield
            finally:
                self._running = False

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if not self._running:
            await _json_response(send, 503, error_body(
                "service_unavailable",
                "the MCP endpoint is mounted without its lifespan: run `async with mcp_app.lifespan():` "
                "in the serving app's lifespan"))
            return
        await self.manager.handle_request(scope, receive, send)

    async def _serve_lifespan(self, receive: Callable, send: Callable) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        try:
            async with self.lifespan():
                await send({"type": "lifespan.startup.complete"})
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
        except BaseException as exc:  # noqa: BLE001 - report, as the ASGI lifespan protocol asks
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            raise
        await send({"type": "lifespan.shutdown.complete"})


async def _json_response(send: Callable, status: int, body: Mapping[str, Any]) -> None:
    data = dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def mcp_asgi_app(engine: EngineSource, *, allowed_hosts: Optional[Sequence[str]] = LOOPBACK_HOSTS,
                 json_response: bool = True) -> McpAsgiApp:
    """The sandbox's MCP endpoint as an ASGI app, over ``engine`` (a ``SandboxEngine``, or a
    zero-argument callable making one on first use): the same escrows and balances as the
    HTTP API on that engine.

    Stateless streamable HTTP, like live: every POST stands alone (no ``Mcp-Session-Id``).
    ``allowed_hosts``: ``Host`` header patterns accepted (DNS-rebinding protection); the
    default accepts loopback only, None turns the check off (a server bound to another
    address). Serve it by mounting it (``Route("/mcp", endpoint=app)``) and running
    ``app.lifespan()`` in the serving app's lifespan, or directly as the ASGI app.
    """
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from mcp.server.transport_security import TransportSecuritySettings

    server = build_server(engine)
    security = None
    if allowed_hosts is not None:
        hosts = list(allowed_hosts)
        origins = [f"http://{h}" for h in hosts] + [f"https://{h}" for h in hosts]
        security = TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                                             allowed_origins=origins)
    manager = StreamableHTTPSessionManager(app=server, json_response=json_response, stateless=True,
                                           security_settings=security)
    return McpAsgiApp(server, manager)
