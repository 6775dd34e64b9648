"""Escrow tools for an agent inside a paid step: no key in sight, a hard allowance, on the ledger.

An LLM agent that is handed Purple Flea's MCP tools directly sees the API key (it is the
``casino_api_key`` argument) and can lock any amount. Inside a Metaflow step, hand it
:func:`agent_escrow_tools` instead::

    @pf_escrow_step(amount_usdc="1.00")          # the step's own agent; the rest of the
    @step                                        # step's budget is the allowance
    def hire(self):
        with agent_escrow_tools(self) as tools:
            llm_tools = tools.tool_specs()       # MCP tool definitions, without casino_api_key
            ...                                  # the agent loop: tools.call(name, arguments)
        # leaving the block settled what the agent left open

What the toolkit guarantees:

- **The key never reaches the model.** The tool schemas have no ``casino_api_key``; the
  toolkit fills it in; results and errors are redacted before the model sees them.
- **An allowance it cannot pass.** Taken from the step's budget (``self.pf_budget``; a
  foreach shard's allowance inside a foreach) less the step's own escrow, or given as
  ``allowance_usdc``. A create that would take the agent past it is refused before any
  escrow exists (``isError``, ``{"error": "allowance_exceeded", …}``).
- **Every escrow on the ledger.** Each create is recorded in the task's metadata (type
  ``pf-escrow``, ref ``Flow/run/step/task/agent/N``) before it is sent and after each
  change, so ``pf-metaflow ledger``, the ledger card and ``pf-metaflow reconcile`` see it;
  it is also on the task's ``pf_ledger`` artifact (``step/agent/N`` in tables).
- **Nothing left open.** When the step ends (the ``with`` block, or :meth:`settle`): the
  step succeeded -> escrows the agent marked done (its ``mark_complete`` call) or whose
  counterparty marked complete are released; everything else is refunded (a sandbox) or
  recorded ``refund_pending`` (live: it comes back by itself, less the commission). The
  step failed -> everything still held is given back. A killed step's escrows are settled
  by its next attempt or by ``pf-metaflow reconcile``.

The agent may release (pay at once), dispute, mark done and read only the escrows it
created through this toolkit in this task; ``get_escrow`` and ``escrow_stats`` read
anything, as on the service. ``escrow_allowance`` (a toolkit tool) tells it what it may
still lock.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Iterable, Optional

from .. import ledger as ledger_mod
from .. import settle
from ..errors import BudgetError, ConfigurationError, InvalidAmount, PurpleFleaError
from ..ids import redact
from ..ledger import Entry, advance
from ..money import ZERO, parse_usdc, usdc_str
from .client import McpConnection, McpEscrowClient, check_mcp_url, env_mcp_url
from .tools import KEY_ARG, dumps, error_body, live_tools, without_key

ALLOWANCE_TOOL = {
    "name": "escrow_allowance",
    "description": "How much USDC you may still lock in escrows in this step (your allowance, what you "
                   "have committed, what remains).",
    "inputSchema": {"type": "object", "properties": {}, "required": []},
}
# Still counted against the allowance: held, paid, maybe held, or coming back later.
_COMMITTED = ("locked", "released", "unknown", "refund_pending")


@dataclass(frozen=True)
class ToolResult:
    """A tool result as the model sees it: one text holding JSON, and whether it is an error."""

    text: str
    is_error: bool = False

    @property
    def json(self) -> dict:
        return json.loads(self.text)

    def to_mcp(self) -> dict:
        """The MCP ``CallToolResult`` shape."""
        return {"content": [{"type": "text", "text": self.text}], "isError": self.is_error}


class AgentSettlementError(PurpleFleaError):
    """An escrow the agent marked done could not be released (the step must not succeed
    with that agent unpaid); ``entries`` is the toolkit's ledger after settling."""

    default_code = "agent_release_failed"

    def __init__(self, message: str, entries: list) -> None:
        super().__init__(message)
        self.entries = entries


class AgentEscrowTools:
    """The toolkit (see the module doc). Build it with :func:`agent_escrow_tools` in a step;
    the constructor takes the task's I/O explicitly (tests, or a step without the decorator).

    ``records()``: this task's escrow records so far (any attempt), ``write(entry, n)``: store
    one durably, ``note(entries)``: put entries on the task's ledger artifacts.
    """

    def __init__(self, client: McpEscrowClient, *, allowance_usdc: Any, task_ref: str, run: str, step: str,
                 task: str, attempt: int = 0, display: Optional[str] = None,
                 records: Callable[[], list] = list, write: Callable[[Entry, int], None] = lambda e, n: None,
                 note: Callable[[list], None] = lambda entries: None, log: Callable[[str], None] = print,
                 timeout_hours: Optional[int] = None) -> None:
        self._client = client
        self.allowance = parse_usdc(allowance_usdc, name="allowance_usdc", minimum=None)
        self.task_ref, self.run, self.step, self.task = task_ref, run, step, str(task)
        self.attempt = int(attempt)
        self.display = display or step
        self._records, self._write, self._note, self._log = records, write, note, log
        self.default_timeout_hours = timeout_hours
        self._lock = threading.RLock()
        self._entries: dict[str, Entry] = {}
        self._done: set[str] = set()
        self._settled = False
        self.lease: Any = None  # a lease of its own, in a step the decorator does not bill
        self._next = 1 + max((self._number(r["ref"]) for r in self._earlier()), default=0)
        self._take_over_earlier()

    # -- what the model sees ---------------------------------------------------------

    def tool_specs(self) -> list[dict]:
        """MCP tool definitions (``name``, ``description``, ``inputSchema``) for the model: the
        live tools without ``casino_api_key``, plus ``escrow_allowance``."""
        specs = [without_key(t) for t in live_tools()]
        for spec in specs:
            if spec["name"] in ("release_escrow", "dispute_escrow", "mark_complete"):
                spec["description"] += " Only for escrows you created in this step."
            if spec["name"] == "mark_complete":
                spec["description"] = ("Mark the work you paid for in one of your escrows as done: it is "
                                       "released to the agent when this step ends successfully. Only for "
                                       "escrows you created in this step.")
        return specs + [dict(ALLOWANCE_TOOL)]

    def call(self, name: str, arguments: Optional[dict] = None) -> ToolResult:
        """Run a tool call from the model. Never raises for the model's mistakes: an error is an
        ``isError`` result with ``{"error", "message"}``, as on the MCP server."""
        args = dict(arguments or {})
        try:
            if self._settled:
                raise _refusal("settled", "this step's escrows are settled; no more escrow calls")
            if KEY_ARG in args:
                raise _refusal("invalid_request", f"{KEY_ARG} is filled in by the toolkit: leave it out")
            handler = getattr(self, "_tool_" + name, None)
            if handler is None:
                names = ", ".join(t["name"] for t in self.tool_specs())
                raise _refusal("unknown_tool", f"unknown tool {name!r} (tools: {names})")
            result = handler(args)
        except PurpleFleaError as exc:
            result = ToolResult(dumps(error_body(exc.code, exc.message, _public(exc.details))), True)
        except Exception as exc:  # noqa: BLE001 - a bug here must not hand the model a traceback
            self._log(f"[pf-metaflow] agent tool {name} failed: {type(exc).__name__}: "
                      f"{redact(str(exc), self._client._key)}")
            result = ToolResult(dumps(error_body("internal_error", f"{name} failed ({type(exc).__name__})")), True)
        return ToolResult(redact(result.text, self._client._key), result.is_error)

    # -- allowance ----------------------------------------------------------------------

    @property
    def committed(self) -> Decimal:
        """USDC the agent's escrows hold, paid or may hold (refunded ones no longer count)."""
        return sum((Decimal(e["amount_usdc"]) for e in self.entries() if e["status"] in _COMMITTED), ZERO)

    @property
    def remaining(self) -> Decimal:
        return max(self.allowance - self.committed, ZERO)

    def entries(self) -> list[Entry]:
        """This task's agent escrows (every attempt), latest state of each."""
        with self._lock:
            return ledger_mod.merge(self._earlier(), list(self._entries.values()))

    # -- the tools ----------------------------------------------------------------------

    def _tool_escrow_allowance(self, args: dict) -> ToolResult:
        return _ok({"allowance_usd": self.allowance, "committed_usd": self.committed,
                    "remaining_usd": self.remaining})

    def _tool_create_escrow(self, args: dict) -> ToolResult:
        raw = args.get("amount_usd")
        if isinstance(raw, bool) or not isinstance(raw, (int, float, Decimal)):
            raise InvalidAmount(f"amount_usd must be a number of USDC (at least 0.10), got {raw!r}")
        amount = parse_usdc(raw, name="amount_usd")
        with self._lock:
            remaining = self.remaining
            if amount > remaining:
                raise _refusal(
                    "allowance_exceeded",
                    f"{usdc_str(amount)} USDC is more than this step lets you lock: {usdc_str(remaining)} "
                    f"USDC of your {usdc_str(self.allowance)} USDC allowance remains. No escrow was created",
                    allowance_usd=self.allowance, committed_usd=self.committed, remaining_usd=remaining)
            n = self._next
            self._next += 1
            ref = f"{self.task_ref}/agent/{n}"
            description = args.get("description")
            tag = f" [pf-metaflow {ref}]"
            if isinstance(description, str) and description.strip() and len(description) + len(tag) <= 500:
                description = description + tag
            entry = ledger_mod.new_entry(
                ref=ref, run=self.run, step=self.step, task=self.task, attempt=self.attempt,
                recipient=args.get("counterparty_agent_id"), amount_usdc=amount, description=description,
                label=f"{self.display} agent hire {n}", shard=f"{self.display}/agent/{n}",
                idempotency_key=None, timeout_hours=args.get("timeout_hours", self.default_timeout_hours),
                referral_code=args.get("referral_code") or None)
            try:
                locked = settle.open_escrow(self._client, entry, self._recorder(n))
            except PurpleFleaError as exc:
                # Refused: recorded not_created (nothing moved); unknown: counted against the allowance.
                latest = getattr(exc, "entry", None) or self._latest(entry["ref"])
                if latest is not None:
                    self._keep(latest)
                raise
            self._keep(locked)
        return self._answer()

    def _tool_get_escrow(self, args: dict) -> ToolResult:
        self._client.tool("get_escrow", {"escrow_id": args.get("escrow_id")}, keyed=False)
        return self._answer()

    def _tool_escrow_stats(self, args: dict) -> ToolResult:
        self._client.tool("escrow_stats", {}, keyed=False)
        return self._answer()

    def _tool_release_escrow(self, args: dict) -> ToolResult:
        with self._lock:
            entry = self._own(args.get("escrow_id"))
            try:
                done = settle.release(self._client, entry, self._recorder(self._number(entry["ref"])),
                                      by=self.attempt)
            except settle.SettlementError as exc:
                self._keep(exc.entry)
                raise
            self._keep(done)
            answer = self._client.last_answer
            if answer is not None and not answer[0] and '"released"' in answer[1]:
                return ToolResult(answer[1])
            return _ok({"escrow_id": done["escrow_id"], "status": done["status"],
                        "amount_released": Decimal(done["net_usdc"]), "commission": Decimal(done["fee_usdc"]),
                        "counterparty_id": done["recipient"]})

    def _tool_mark_complete(self, args: dict) -> ToolResult:
        with self._lock:
            entry = self._own(args.get("escrow_id"))
            if entry["status"] != "locked":
                raise _refusal("invalid_status", f"escrow {entry['escrow_id']} is {entry['status']}: "
                                                 "there is nothing to release at the end of the step")
            self._done.add(entry["ref"])
            marked = advance(entry, reason="marked done by the agent: released when the step ends successfully")
            self._recorder(self._number(entry["ref"]))(marked)
            self._keep(marked)
            return _ok({"escrow_id": entry["escrow_id"], "status": "funded", "marked_done": True,
                        "message": "Marked done: released to the agent when this step ends successfully."})

    def _tool_dispute_escrow(self, args: dict) -> ToolResult:
        with self._lock:
            entry = self._own(args.get("escrow_id"))
            self._client.tool("dispute_escrow", {"escrow_id": entry["escrow_id"], "reason": args.get("reason")},
                              keyed=True)
            self._done.discard(entry["ref"])
            disputed = advance(entry, reason=f"disputed by the agent ({args.get('reason')}); its funds stay "
                                             "locked until Purple Flea reviews it")
            self._recorder(self._number(entry["ref"]))(disputed)
            self._keep(disputed)
            return self._answer()

    # -- the end of the step -------------------------------------------------------------

    def settle(self, ok: bool = True, reason: Optional[str] = None) -> list[Entry]:
        """Settle what the agent left open: ``ok`` (the step succeeded): release what is marked
        done (by the agent, or completed by its counterparty), give back the rest; not ``ok``:
        give back everything still held. Returns this task's agent ledger. Raises
        :class:`AgentSettlementError` (after settling the rest) when a release failed."""
        failed: list[str] = []
        with self._lock:
            self._settled = True
            for entry in [e for e in self._entries.values() if e["status"] in ledger_mod.OPEN_STATUSES]:
                record = self._recorder(self._number(entry["ref"]))
                if ok and entry["status"] == "locked" and self._is_done(entry):
                    try:
                        after = settle.release(self._client, entry, record, by=self.attempt)
                    except settle.SettlementError as exc:
                        after = exc.entry
                        failed.append(exc.message)
                else:
                    why = reason or ("the agent left it open when the step ended" if ok
                                     else "the step failed before the agent's work was paid")
                    after = settle.resolve(self._client, entry, why, record, by=self.attempt)
                self._keep(after)
                self._log(_line(after))
        if self.lease is not None:
            self.lease.end()
            self.lease = None
        entries = self.entries()
        if failed:
            raise AgentSettlementError("; ".join(failed), entries)
        return entries

    def __enter__(self) -> "AgentEscrowTools":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.settle(ok=True)
            return
        try:
            text = " ".join(str(exc).split())[:200]
            self.settle(ok=False, reason=f"step failed: {type(exc).__name__}: {text}")
        except Exception as settle_exc:  # noqa: BLE001 - the step's own exception matters more
            self._log(f"[pf-metaflow] could not settle the agent's escrows ({settle_exc}); "
                      "`pf-metaflow reconcile` will")

    # -- helpers ------------------------------------------------------------------------

    def _is_done(self, entry: Entry) -> bool:
        if entry["ref"] in self._done:
            return True
        try:  # the counterparty said it is done (live's mark_complete)
            return self._client.get(entry["escrow_id"]).status == "completed"
        except PurpleFleaError:
            return False

    def _own(self, escrow_id: Any) -> Entry:
        for entry in self._entries.values():
            if escrow_id and entry.get("escrow_id") == escrow_id:
                return entry
        raise _refusal("forbidden", f"{escrow_id!r} is not an escrow you created in this step; you may "
                                    "release, dispute or mark done only your own", status=403)

    def _answer(self) -> ToolResult:
        assert self._client.last_answer is not None
        is_error, text = self._client.last_answer
        return ToolResult(text, is_error)

    def _keep(self, entry: Entry) -> None:
        self._entries[entry["ref"]] = entry

    def _latest(self, ref: str) -> Optional[Entry]:
        mine = [r for r in self._earlier() if r.get("ref") == ref]
        merged = ledger_mod.merge(mine)
        return merged[0] if merged else None

    def _recorder(self, n: int) -> Callable[[Entry], None]:
        def record(entry: Entry) -> None:
            self._write(entry, n)
            self._note([entry])

        return record

    def _earlier(self) -> list[Entry]:
        prefix = self.task_ref + "/agent/"
        return [r for r in self._records() if str(r.get("ref", "")).startswith(prefix)]

    @staticmethod
    def _number(ref: str) -> int:
        tail = ref.rsplit("/agent/", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    def _take_over_earlier(self) -> None:
        """Escrows an earlier attempt's agent left open: that attempt has ended (this one runs),
        so nobody else will settle them. Look them up and give back what is still held."""
        leftovers = [e for e in ledger_mod.merge(self._earlier()) if e["status"] in ledger_mod.OPEN_STATUSES]
        for entry in leftovers:
            why = f"attempt {entry['attempt']} ended without settling its agent's escrow"
            after = settle.resolve(self._client, entry, why, self._recorder(self._number(entry["ref"])),
                                   by=self.attempt)
            self._log(_line(after))


def _refusal(code: str, message: str, *, status: int = 400, **details: Any) -> PurpleFleaError:
    return PurpleFleaError(message, code=code, status=status, details=details)


def _public(details: dict) -> dict:
    return {k: v for k, v in details.items() if k not in ("operation",)}


def _ok(body: dict) -> ToolResult:
    return ToolResult(dumps(body))


def _line(entry: Entry) -> str:
    tail = f" ({entry['reason']})" if entry.get("reason") and entry["status"] != "released" else ""
    return (f"[pf-metaflow] agent escrow {entry.get('escrow_id') or '(none)'} {entry['status']}: "
            f"{entry['amount_usdc']} USDC for {entry['recipient']}{tail}")


# ---------------------------------------------------------------------------------------
# Building the toolkit in a step


def connect(mcp_url: Optional[str] = None, api_key: Optional[str] = None) -> tuple[McpConnection, str, str]:
    """``(connection, key, where)`` for the service the step pays through: ``mcp_url`` or
    ``$PF_MCP_URL`` or ``$PF_ESCROW_URL``/mcp over streamable HTTP (``$PF_API_KEY``), else the
    embedded sandbox as an in-process MCP server (no network)."""
    from ..ids import check_api_key

    url = mcp_url or env_mcp_url()
    key = api_key or os.environ.get("PF_API_KEY") or None
    if url is not None:
        check_mcp_url(url)
        escrow_url = os.environ.get("PF_ESCROW_URL", "").strip()
        if _origin(escrow_url) != _origin(url):
            raise ConfigurationError(
                "the MCP URL and PF_ESCROW_URL must be the same service (refunds and reconcile go "
                "through PF_ESCROW_URL): set PF_ESCROW_URL to the escrow host of the MCP URL")
        if key is None:
            raise ConfigurationError(f"no API key for the MCP server at {_origin(url)}: set PF_API_KEY")
        check_api_key(key)
        return McpConnection(url), key, url
    from .._embedded import sandbox_path
    from ..sandbox.engine import PAYER_KEY, SandboxEngine
    from .server import build_server

    path = sandbox_path(os.environ.get("PF_ESCROW_URL", "").strip())
    server = build_server(lambda: SandboxEngine(path))
    return McpConnection(server=server), key or PAYER_KEY, f"sandbox://{path} (in-process MCP)"


def _origin(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme in ("http", "https") else ""


def agent_escrow_tools(flow: Any = None, *, allowance_usdc: Any = None, mcp_url: Optional[str] = None,
                       timeout_hours: Optional[int] = None) -> AgentEscrowTools:
    """The toolkit for the step running now (it needs ``@pf_escrow_step`` on the flow: the
    decorator hands over the task's context). ``allowance_usdc``: at most the step's remaining
    budget; default all of it (the step's budget, or its foreach shard's allowance, less the
    step's own escrow). Without a ``pf_budget`` give ``allowance_usdc``."""
    from . import context as context_mod

    ctx = context_mod.current()
    if ctx is None:
        raise ConfigurationError(
            "agent_escrow_tools() runs inside a step of a flow that uses @pf_escrow_step (the decorator "
            "records the step's escrows and holds its lease; with steps=... it need not bill this step)")
    flow = flow if flow is not None else ctx.flow
    allowance = _allowance(ctx, flow, allowance_usdc)
    connection, key, where = connect(mcp_url)
    from ..client import default_client

    client = McpEscrowClient(connection, key, default_client)
    flow_name, run_id, step, task_id = ctx.where
    stack = flow.foreach_stack() or []
    display = ledger_mod.escrow_key(step, [s[0] for s in stack]) if stack else step
    lease = None
    if not ctx.billed and ctx.write_lease is not None:
        from ..lease import LeaseKeeper

        lease = LeaseKeeper(ctx.attempt, ctx.write_lease)
        lease.start()
    tools = AgentEscrowTools(
        client, allowance_usdc=allowance, task_ref=ctx.task_ref, run=f"{flow_name}/{run_id}", step=step,
        task=task_id, attempt=ctx.attempt, display=display, records=lambda: _read_records(ctx),
        write=lambda entry, n: _write_record(ctx, entry, n), note=ctx.note, timeout_hours=timeout_hours)
    tools.lease = lease
    print(f"[pf-metaflow] agent escrow tools for {display}: allowance {usdc_str(tools.allowance)} USDC "
          f"via {where}")
    return tools


def _allowance(ctx: Any, flow: Any, explicit: Any) -> Decimal:
    from ..budget import budget_for

    budget = getattr(flow, "pf_budget", None)
    if budget is None:
        if explicit is None:
            raise BudgetError("the flow has no pf_budget: give agent_escrow_tools(allowance_usdc=...)")
        return parse_usdc(explicit, name="allowance_usdc", minimum=None)
    stack = flow.foreach_stack() or []
    index = stack[-1][0] if stack else None
    total = budget_for(budget, ctx.budget_key, index)
    own = ctx.own_entry() if ctx.billed else None
    if own and own.get("status") not in ("refunded", ledger_mod.VOID):
        total -= Decimal(own["amount_usdc"])
    total = max(total, ZERO)
    if explicit is None:
        return total
    wanted = parse_usdc(explicit, name="allowance_usdc", minimum=None)
    if wanted > total:
        raise BudgetError(f"allowance_usdc {usdc_str(wanted)} USDC is more than the {usdc_str(total)} USDC "
                          f"left of step {ctx.budget_key!r}'s budget after its own escrow")
    return wanted


def _read_records(ctx: Any) -> list:
    flow_name, run_id, step, task_id = ctx.where
    found = ctx.metadata.get_object("task", "metadata", None, None, flow_name, run_id, step, task_id) or []
    from ..decorator import METADATA_TYPE

    return [json.loads(m["value"]) for m in found if m.get("type") == METADATA_TYPE]


def _write_record(ctx: Any, entry: Entry, n: int) -> None:
    """The decorator's record format (type ``pf-escrow``; the field names the agent escrow's N)."""
    from ..decorator import escrow_metadatum

    _, run_id, step, task_id = ctx.where
    ctx.metadata.register_metadata(run_id, step, task_id, [escrow_metadatum(entry, ctx.attempt)])


def ledger_entries(entries: Iterable[Entry]) -> list[Entry]:
    """Only the agent escrows of a ledger (refs ``…/agent/N``)."""
    return [e for e in entries if "/agent/" in str(e.get("ref", ""))]
