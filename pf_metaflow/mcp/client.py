"""Calling the escrow MCP tools from synchronous step code, and an escrow client over them.

:class:`McpConnection` calls one tool per connection (the live server is stateless): over
streamable HTTP to a URL (the live ``https://escrow.purpleflea.com/mcp`` or a sandbox's
``/mcp``), or to an in-process MCP server over the SDK's in-memory transport (the embedded
sandbox: no network). It answers ``(is_error, text)``, the tool result as the server sent it.

:class:`McpEscrowClient` is the part of :class:`~pf_metaflow.client.EscrowClient` that
:mod:`pf_metaflow.settle` uses, over those tools: create, release and get go through MCP;
refund (no MCP tool has one) goes through the escrow client of the same service (a full
refund on a sandbox, ``refund_pending`` on live), as ``reconcile`` does.
"""

from __future__ import annotations

import json
import os
import threading
from decimal import Decimal
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from ..answers import Escrow, Settlement, parse_escrow, parse_release
from ..errors import (
    AmbiguousOutcome,
    ConfigurationError,
    NetworkError,
    ProtocolError,
    PurpleFleaError,
    error_for,
)
from ..ids import redact
from ..money import usdc_str
from .tools import KEY_ARG

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_mcp_url(url: str) -> str:
    """An MCP URL the key may be sent to: https, or plain http only to loopback (rule 8)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError("the MCP URL must be an https:// URL, e.g. https://escrow.purpleflea.com/mcp")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise ConfigurationError("the MCP URL must not carry a user name, password, '?' or '#' part")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise ConfigurationError(
            f"refusing to send the API key over plain http to {parts.hostname}: use https:// "
            "(plain http is allowed only to 127.0.0.1, ::1 and localhost)")
    return url


def _status_of(code: str) -> Optional[int]:
    from ..errors import ERROR_CODES

    cls = ERROR_CODES.get(code)
    return getattr(cls, "status", None) if cls is not None else None


class McpConnection:
    """One MCP server, called tool by tool. ``url`` (streamable HTTP) or ``server`` (in-process)."""

    def __init__(self, url: Optional[str] = None, *, server: Any = None, timeout: float = 30.0) -> None:
        if (url is None) == (server is None):
            raise ConfigurationError("give an MCP url or an in-process server, not both")
        self.url = check_mcp_url(url) if url is not None else None
        self._server = server
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"McpConnection({self.url or 'in-process'!r})"

    @property
    def where(self) -> str:
        return self.url or "the in-process sandbox MCP server"

    def _client(self):
        from mcp import Client

        if self._server is not None:
            # The whole JSON-RPC exchange, in memory: what a client over HTTP would see.
            return Client(self._server, mode="legacy", read_timeout_seconds=self.timeout)
        return Client(self.url, read_timeout_seconds=self.timeout)

    async def _call(self, name: str, arguments: dict) -> tuple[bool, str]:
        from mcp import MCPError

        sent = False
        try:
            async with self._client() as client:
                sent = True
                result = await client.call_tool(name, arguments)
        except PurpleFleaError:
            raise
        except MCPError as exc:  # the server answered with a protocol error: nothing was done
            raise error_for(400, "invalid_request", f"{name} refused by {self.where}: "
                            f"{redact(str(exc), arguments.get(KEY_ARG))}"[:300]) from None
        except Exception as exc:  # noqa: BLE001 - transport failures, described without arguments
            what = f"{type(exc).__name__}: {redact(str(exc), arguments.get(KEY_ARG))}"[:300]
            if not sent:
                raise NetworkError(f"could not reach {self.where} ({what}); nothing was sent") from None
            raise AmbiguousOutcome(f"{name} on {self.where} got no answer ({what})",
                                   details={"operation": name}) from None
        texts = [c.text for c in result.content if getattr(c, "type", None) == "text"]
        if len(texts) != 1:
            raise ProtocolError(f"{name} on {self.where} answered {len(result.content)} content blocks, "
                                "not one text")
        return bool(result.is_error), texts[0]

    async def _list(self) -> list[dict]:
        async with self._client() as client:
            listed = await client.list_tools()
        return [{"name": t.name, "description": t.description, "inputSchema": t.input_schema}
                for t in listed.tools]

    def call(self, name: str, arguments: dict) -> tuple[bool, str]:
        """Call tool ``name``: ``(is_error, text)``. Raises NetworkError (nothing sent) or
        AmbiguousOutcome (sent, no answer)."""
        return _run_sync(lambda: self._call(name, arguments))

    def list_tools(self) -> list[dict]:
        return _run_sync(self._list)


def _run_sync(make: Callable[[], Any]) -> Any:
    """Run a coroutine to completion from sync code, also when this thread already runs an event
    loop (an async agent framework calling a sync tool): then in a thread of its own."""
    import anyio

    try:
        import asyncio

        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(make)
    out: dict = {}

    def worker() -> None:
        try:
            out["value"] = anyio.run(make)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=worker, name="pf-metaflow-mcp")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def parse_answer(name: str, is_error: bool, text: str) -> dict:
    """The JSON of a tool result; for an error, the :class:`PurpleFleaError` of its code."""
    try:
        body = json.loads(text, parse_float=Decimal)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        if is_error:  # e.g. the SDK's own refusal of a malformed call: nothing was done
            raise error_for(400, "invalid_request", f"{name} refused: {text[:300]}")
        raise ProtocolError(f"{name} answered something that is not a JSON object: {text[:200]!r}")
    if is_error:
        code = str(body.get("error") or "error")
        message = str(body.get("message") or code)
        details = {k: v for k, v in body.items() if k not in ("error", "message", "_info")}
        if isinstance(details.get("balance"), Decimal):
            details["balance"] = usdc_str(details["balance"])
        raise error_for(_status_of(code) or 400, code, message, details)
    return body


class McpEscrowClient:
    """The escrow calls :mod:`pf_metaflow.settle` makes, over the MCP tools with ``key``."""

    supports_idempotency = False  # MCP's create_escrow takes no idempotency key

    def __init__(self, connection: McpConnection, key: str, refund_client: Callable[[], Any]) -> None:
        self.connection = connection
        self._key = key
        self._refund_client = refund_client
        self.last_answer: Optional[tuple[bool, str]] = None  # the raw result of the last tool call

    def __repr__(self) -> str:
        return f"McpEscrowClient({self.connection!r})"

    def __reduce__(self):
        raise TypeError("McpEscrowClient holds an API key and cannot be pickled")

    @property
    def capabilities(self) -> frozenset:
        return frozenset()

    def tool(self, name: str, arguments: dict, *, keyed: bool) -> dict:
        args = dict(arguments)
        if keyed:
            args[KEY_ARG] = self._key
        is_error, text = self.connection.call(name, args)
        self.last_answer = (is_error, text)
        return parse_answer(name, is_error, text)

    def create(self, amount_usd: Decimal, *, counterparty_agent_id: str, description: str,
               timeout_hours: Optional[int] = None, referral_code: Optional[str] = None,
               idempotency_key: Optional[str] = None) -> Escrow:
        args: dict[str, Any] = {"amount_usd": float(amount_usd), "counterparty_agent_id": counterparty_agent_id,
                                "description": description}
        if timeout_hours is not None:
            args["timeout_hours"] = timeout_hours
        if referral_code:
            args["referral_code"] = referral_code
        try:
            answer = self.tool("create_escrow", args, keyed=True)
        except ProtocolError as exc:
            raise AmbiguousOutcome(f"{exc.message}; the escrow may or may not have been created",
                                   details={"operation": "create", "description": description}) from None
        except AmbiguousOutcome as exc:
            raise AmbiguousOutcome(
                f"{exc.message}; the escrow may or may not have been created: look for an escrow "
                f"described {description!r} before creating another",
                details={"operation": "create", "description": description}) from None
        return parse_escrow(answer)

    def release(self, escrow_id: str) -> Settlement:
        return parse_release(self.tool("release_escrow", {"escrow_id": escrow_id}, keyed=True))

    def get(self, escrow_id: str) -> Escrow:
        return parse_escrow(self.tool("get_escrow", {"escrow_id": escrow_id}, keyed=False))

    def refund(self, escrow_id: str, *, creator_id: Optional[str] = None) -> Settlement:
        return self._refund_client().refund(escrow_id, creator_id=creator_id)


def env_mcp_url() -> Optional[str]:
    """``$PF_MCP_URL``, else ``$PF_ESCROW_URL`` + ``/mcp`` for an http(s) escrow URL, else None
    (the embedded sandbox)."""
    explicit = os.environ.get("PF_MCP_URL", "").strip()
    if explicit:
        return explicit
    base = os.environ.get("PF_ESCROW_URL", "").strip()
    if base.lower().startswith(("http://", "https://")):
        return base.rstrip("/") + "/mcp"
    return None
