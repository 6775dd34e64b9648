"""``@pf_escrow_step``: Purple Flea escrow around a Metaflow step (implementation).

Metaflow imports this module every time it is imported itself (the extension
mechanism registers the decorator), so it stays light: the escrow client and the
settlement code are imported in the task hooks that use them.

Import it as ``pf_metaflow.decorator`` (or ``from pf_metaflow import pf_escrow_step``):
this module is what Metaflow's extension loader imports while Metaflow itself is
still initialising, so it must never be the first pf_metaflow module a user imports.

The only module that knows about Metaflow's decorator lifecycle. Money moves
through :mod:`pf_metaflow.settle`; every state an escrow reaches is written to
the task's Metaflow metadata before the step goes on, so a task killed at any
instant leaves a record that the next attempt or ``pf-metaflow reconcile`` settles.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
import signal
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Any, Callable, Optional

from metaflow.decorators import StepDecorator, _base_step_decorator
from metaflow.exception import MetaflowException
from metaflow.metadata_provider import MetaDatum

from . import ledger as ledger_mod
from .budget import budget_for
from .errors import BudgetError, InvalidAmount, InvalidAgentId, PurpleFleaError
from .ids import AGENT_ID_RE, check_agent_id, redact
from .money import parse_usdc, usdc_str

METADATA_TYPE = "pf-escrow"
LEDGER_ARTIFACT = "pf_ledger"
ESCROWS_ARTIFACT = "pf_escrows"
BUDGET_ARTIFACT = "pf_budget"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GATE = re.compile(
    r"^\s*(?P<left>[A-Za-z_][A-Za-z0-9_]*)\s*(?:(?P<op>>=|<=|==|!=|>|<)\s*(?P<right>[^\s].*?))?\s*$"
)
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq,
    "!=": operator.ne, ">": operator.gt, "<": operator.lt,
}


class PfEscrowStepException(MetaflowException):
    headline = "Invalid @pf_escrow_step"


class PfEscrowRuntimeError(MetaflowException):
    headline = "pf_escrow_step could not lock escrow"


# ---------------------------------------------------------------------------------------
# The decorator's arguments, checked once at graph time.


@dataclass(frozen=True)
class _Value:
    """A literal, or the name of a flow attribute (Parameter or artifact) read at run time."""

    literal: Any = None
    attribute: Optional[str] = None

    def resolve(self, flow: Any, what: str) -> Any:
        if self.attribute is None:
            return self.literal
        if not hasattr(flow, self.attribute):
            raise PfEscrowRuntimeError(
                f"{what} names the flow attribute {self.attribute!r}, but the flow has no "
                "Parameter or artifact of that name at this step"
            )
        return getattr(flow, self.attribute)


def _payee_value(raw: Any) -> _Value:
    if raw is None:
        return _Value(attribute="agent_wallet")
    if isinstance(raw, str) and AGENT_ID_RE.match(raw):
        return _Value(literal=raw)
    if isinstance(raw, str) and _IDENTIFIER.match(raw) and not raw.startswith("ag_"):
        return _Value(attribute=raw)
    check_agent_id(raw)  # raises with the precise complaint
    raise InvalidAgentId(f"agent_wallet {raw!r} is neither an agent id nor a flow attribute name")


def _amount_value(raw: Any) -> Optional[_Value]:
    if raw is None:
        return None  # from the run's budget
    if isinstance(raw, str) and _IDENTIFIER.match(raw.strip()) and raw.strip().lower() not in (
        "nan", "inf", "infinity", "snan",
    ):
        return _Value(attribute=raw.strip())
    return _Value(literal=parse_usdc(raw, name="amount_usdc"))


@dataclass(frozen=True)
class _Gate:
    text: str
    left: str
    op: Optional[str] = None
    right: Optional[_Value] = None

    def check(self, flow: Any) -> tuple[bool, str]:
        if not hasattr(flow, self.left):
            return False, f"release gate {self.text!r}: the step did not set {self.left!r}"
        left = getattr(flow, self.left)
        if self.op is None:
            return bool(left), f"release gate {self.text!r}: {self.left} is {left!r}"
        right = self.right.resolve(flow, "release_if")
        try:
            ok = _OPS[self.op](left, right)
        except TypeError:
            return False, f"release gate {self.text!r}: cannot compare {left!r} with {right!r}"
        verdict = "holds" if ok else "does not hold"
        limit = self.right.attribute or "limit"
        return ok, f"release gate {self.text!r} {verdict}: {self.left}={left!r}, {limit}={right!r}"


def _parse_gate(raw: Any) -> Any:
    if raw is None or callable(raw):
        return raw
    match = _GATE.match(str(raw))
    if not match:
        raise PfEscrowStepException(
            f"release_if {raw!r} is not a gate: use an attribute name ('model_ok') or a comparison "
            "('accuracy >= min_accuracy', 'null_rate <= 0.05')"
        )
    right = None
    if match.group("op"):
        text = match.group("right").strip()
        if _IDENTIFIER.match(text):
            right = _Value(attribute=text)
        else:
            try:
                right = _Value(literal=json.loads(text))
            except json.JSONDecodeError:
                raise PfEscrowStepException(
                    f"release_if {raw!r}: the right side must be an attribute name or a number"
                ) from None
    return _Gate(text=str(raw).strip(), left=match.group("left"), op=match.group("op"), right=right)


def _steps_filter(raw: Any) -> Optional[frozenset[str]]:
    if raw is None:
        return None
    names = raw if isinstance(raw, (list, tuple, set, frozenset)) else str(raw).replace("+", ",").split(",")
    return frozenset(n.strip() for n in names if n and n.strip())


# ---------------------------------------------------------------------------------------


class PfEscrowStepDecorator(StepDecorator):
    """
    Locks Purple Flea escrow before the step runs; releases it to the agent when the
    step succeeds, refunds it when the step fails (then lets the exception go on, so
    `@catch` records it and the run continues).

    One escrow per task attempt. Its id is written to the task's metadata before the
    step body runs, so a task that dies is settled by its next attempt or by
    `pf-metaflow reconcile FLOW/RUN`. Each task adds its entry to the `pf_ledger`
    artifact (joins merge their inputs' ledgers) and to `pf_escrows`.

    Parameters
    ----------
    agent_wallet : str, optional
        The agent paid for this step: an agent id (`ag_…`), or the name of a flow
        attribute or Parameter holding one. Default: the flow's `agent_wallet`.
    amount_usdc : float or str, optional
        USDC to lock: a literal (`2.5`, `"2.50"`; at least 0.10, at most 6 decimal
        places) or the name of a flow attribute or Parameter. Default: this step's
        budget in `self.pf_budget` (see `pf_metaflow.plan_budget`); inside a foreach,
        the shard's allowance (`pf_metaflow.allot_shards`).
    budget_key : str, optional
        Which step's budget pays for this step, when not its own.
    label : str, optional
        A short name for the work, shown in ledgers. Default: the step name.
    release_if : str or callable, optional
        Release gate, checked after the body succeeds: an attribute name
        (`"model_ok"`), a comparison (`"accuracy >= min_accuracy"`,
        `"null_rate <= 0.05"`), or a callable taking the flow. When it does not
        hold, the escrow is refunded with the reason and the step still succeeds.
    timeout_hours : int, optional
        Escrow timeout on the service (1-720; service default 24). An escrow never
        settled returns to the payer by itself after this long, less 1%.
    referral_code : str, optional
        Purple Flea referral code, or the name of a flow Parameter holding one (an
        empty value means none); default `PF_REFERRAL_CODE`.
    steps : str, optional
        Comma-separated steps to bill (useful with `--with`, which adds the decorator
        to every step). Default: every step that has the decorator.
    """

    name = "pf_escrow_step"
    defaults = {
        "agent_wallet": None,
        "amount_usdc": None,
        "budget_key": None,
        "label": None,
        "release_if": None,
        "timeout_hours": None,
        "referral_code": None,
        "steps": None,
    }

    # -- graph time ---------------------------------------------------------------------

    def step_init(self, flow, graph, step_name, decorators, environment, flow_datastore, logger):
        self._step_name = step_name
        try:
            self._parse(graph, step_name)
        except (InvalidAmount, InvalidAgentId, BudgetError) as exc:
            raise PfEscrowStepException(f"step *{step_name}*: {exc.message}") from None
        except PfEscrowStepException as exc:
            raise PfEscrowStepException(f"step *{step_name}*: {exc.message}") from None
        self._has_timeout = any(d.name == "timeout" for d in decorators)
        _attach_join_mergers(flow, graph)

    def _parse(self, graph, step_name):
        a = self.attributes
        self._payee = _payee_value(a["agent_wallet"])
        self._amount = _amount_value(a["amount_usdc"])
        self._gate = _parse_gate(a["release_if"])
        steps = _steps_filter(a["steps"])
        names = {node.name for node in graph}
        if steps is not None:
            unknown = sorted(steps - names)
            if unknown:
                raise PfEscrowStepException(f"steps names {', '.join(unknown)}, not steps of this flow")
        self._billed = steps is None or step_name in steps
        budget_key = a["budget_key"]
        if budget_key is not None and budget_key not in names:
            raise PfEscrowStepException(
                f"budget_key {budget_key!r} is not a step of this flow (steps: {', '.join(sorted(names))})"
            )
        if budget_key is not None and self._amount is not None:
            raise PfEscrowStepException("give amount_usdc or budget_key, not both")
        self._budget_key = budget_key or step_name
        self._timeout_hours = _timeout_hours(a["timeout_hours"])
        node = graph[step_name]
        if node.type == "split-parallel" or getattr(node, "parallel_step", False):
            raise PfEscrowStepException(
                "@parallel steps run one task per node with a shared id; pay for them in the "
                "step that launches them"
            )

    # -- task time ----------------------------------------------------------------------

    def task_pre_step(self, step_name, task_datastore, metadata, run_id, task_id, flow, graph,
                      retry_count, max_user_code_retries, ubf_context, inputs):
        self._entry = None
        self._release_tried = False
        self._earlier_settled = False
        self._metadata = metadata
        self._where = (flow.name, str(run_id), step_name, str(task_id))
        self._attempt = retry_count
        self._client = None
        self._ledger = _incoming_ledger(flow, graph, step_name, inputs)
        self._publish(flow)

    def task_decorate(self, step_func, flow, graph, retry_count, max_user_code_retries, ubf_context):
        if not self._billed or retry_count > max_user_code_retries:
            return step_func  # not billed here, or @catch's fallback attempt (no user code runs)

        def step_with_escrow(*args, **kwargs):
            # Escrow is locked here, after every decorator's task_pre_step, so that
            # @secrets / @environment have put PF_ESCROW_URL and PF_API_KEY in place,
            # whatever order the decorators are written in.
            self._lock_escrow(flow)
            return step_func(*args, **kwargs)

        return step_with_escrow

    def _lock_escrow(self, flow) -> None:
        earlier = self._settle_earlier_attempts(flow)
        recipient, amount = self._resolve_terms(flow, earlier)
        entry = self._new_entry(flow, recipient, amount)
        try:
            self._entry = _settle().open_escrow(self._get_client(), entry, self._record)
        except PurpleFleaError as exc:
            raise PfEscrowRuntimeError(
                f"step *{self._step_name}*: could not lock {usdc_str(amount)} USDC for {recipient}: "
                f"{exc.message}. The step did not run."
            ) from None
        self._ledger = ledger_mod.merge(self._ledger, [self._entry])
        self._publish(flow)

    def task_post_step(self, step_name, flow, graph, retry_count, max_user_code_retries):
        if self._entry is None:
            self._settle_earlier_attempts(flow)
            return
        self._disarm_timeout()
        ok, why = self._check_gate(flow)
        if ok:
            self._release_tried = True
            try:
                self._entry = _settle().release(self._get_client(), self._entry, self._record)
            finally:
                self._ledger = ledger_mod.merge(self._ledger, [self._entry])
                self._publish(flow)
        else:
            self._entry = _settle().refund(self._get_client(), self._entry, why, self._record)
            self._ledger = ledger_mod.merge(self._ledger, [self._entry])
            self._publish(flow)
        print(_settlement_line(self._entry))

    def task_exception(self, exception, step_name, flow, graph, retry_count, max_user_code_retries):
        if self._entry is None:
            # Failed before locking (bad terms, a refused create), or @catch's fallback
            # attempt after a killed one: what earlier attempts left open is settled now.
            try:
                self._settle_earlier_attempts(flow)
            except PurpleFleaError as exc:
                print(f"[pf-metaflow] could not settle earlier attempts: {exc.message}; "
                      "`pf-metaflow reconcile` will")
            return False
        if self._entry["status"] not in ledger_mod.OPEN_STATUSES:
            return False
        self._disarm_timeout()
        reason = _failure_reason(exception)
        settle_fn = _settle().resolve if self._release_tried else _settle().refund
        try:
            self._entry = settle_fn(self._get_client(), self._entry, reason, self._record)
        except PurpleFleaError as exc:
            print(f"[pf-metaflow] could not settle {self._entry.get('escrow_id')}: {exc.message}; "
                  "`pf-metaflow reconcile` will")
        self._ledger = ledger_mod.merge(self._ledger, [self._entry])
        self._publish(flow)
        print(_settlement_line(self._entry))
        return False  # the step failed; @catch (if any) decides what happens next

    # -- helpers ------------------------------------------------------------------------

    def _get_client(self):
        if self._client is None:
            from .client import default_client

            self._client = default_client()
        return self._client

    def _resolve_terms(self, flow, earlier):
        step = self._step_name
        try:
            recipient = check_agent_id(self._payee.resolve(flow, "agent_wallet"))
            if self._amount is not None:
                raw = self._amount.resolve(flow, "amount_usdc")
                amount = parse_usdc(raw, name=self._amount.attribute or "amount_usdc")
                self._check_within_budget(flow, amount)
            else:
                amount = self._budgeted_amount(flow, earlier)
        except PurpleFleaError as exc:
            raise PfEscrowRuntimeError(f"step *{step}*: {exc.message}. No escrow was created.") from None
        return recipient, amount

    def _check_within_budget(self, flow, amount: Decimal) -> None:
        """A run never locks more than its budget: an explicit amount_usdc on a step the
        run's budget plans for may not exceed that step's budget (or shard allowance)."""
        budget = getattr(flow, BUDGET_ARTIFACT, None)
        key = self._budget_key
        if not isinstance(budget, dict) or key not in budget.get("steps", {}):
            return  # the budget does not plan this step: amount_usdc is the plan
        stack = flow.foreach_stack() or []
        split = stack and key in budget.get("shards", {})
        limit = budget_for(budget, key, stack[-1][0] if split else None)
        if amount > limit:
            what = f"shard {stack[-1][0]}'s allowance" if split else "budget"
            raise BudgetError(
                f"amount_usdc {usdc_str(amount)} USDC is above step {key!r}'s {what} of "
                f"{usdc_str(limit)} USDC in pf_budget: lower amount_usdc, or leave it out to "
                "lock the budgeted amount"
            )

    def _budgeted_amount(self, flow, earlier) -> Decimal:
        budget = getattr(flow, BUDGET_ARTIFACT, None)
        if budget is None:
            raise BudgetError(
                "no amount_usdc given and the flow has no pf_budget artifact: set amount_usdc, or "
                "make a budget with pf_metaflow.plan_budget(...) in an earlier step"
            )
        stack = flow.foreach_stack() or []
        shard_index = stack[-1][0] if stack else None
        allowance = budget_for(budget, self._budget_key, shard_index)
        # A run never locks more than its budget: what earlier attempts still hold
        # (a refund the live service has not paid back yet) counts against it.
        held = sum((Decimal(e["amount_usdc"]) for e in earlier if e["status"] in ledger_mod.OPEN_STATUSES),
                   Decimal(0))
        if held:
            raise BudgetError(
                f"an earlier attempt's {usdc_str(held)} USDC is still held in escrow "
                f"({', '.join(sorted({e['status'] for e in earlier}))}); locking the step's "
                f"{usdc_str(allowance)} USDC again would exceed its budget"
            )
        return allowance

    def _new_entry(self, flow, recipient: str, amount: Decimal):
        flow_name, run_id, step, task_id = self._where
        stack = flow.foreach_stack() or []
        shard = ledger_mod.escrow_key(step, [s[0] for s in stack]) if stack else None
        ref = f"{flow_name}/{run_id}/{step}/{task_id}/{self._attempt}"
        label = self.attributes["label"] or step
        description = f"pf-metaflow {ref} {label}"[:200]
        referral = self._referral_code(flow)
        return ledger_mod.new_entry(
            ref=ref, run=f"{flow_name}/{run_id}", step=step, task=task_id, attempt=self._attempt,
            recipient=recipient, amount_usdc=amount, description=description, label=label,
            shard=shard, idempotency_key="pfmf-" + hashlib.sha256(ref.encode()).hexdigest()[:40],
            timeout_hours=self._timeout_hours, referral_code=referral or None,
        )

    def _referral_code(self, flow) -> Optional[str]:
        """A literal code, or the name of a flow Parameter holding one (the guide's
        ``--referral_code``); else ``$PF_REFERRAL_CODE``."""
        raw = self.attributes["referral_code"]
        if isinstance(raw, str) and _IDENTIFIER.match(raw) and hasattr(flow, raw):
            raw = getattr(flow, raw)
        return (str(raw).strip() if raw else "") or _env("PF_REFERRAL_CODE")

    def _check_gate(self, flow) -> tuple[bool, str]:
        if self._gate is None:
            return True, ""
        if callable(self._gate):
            try:
                return bool(self._gate(flow)), "release gate returned False"
            except Exception as exc:  # a broken gate must not release money
                return False, f"release gate raised {type(exc).__name__}: {exc}"
        return self._gate.check(flow)

    def _settle_earlier_attempts(self, flow) -> list:
        """Settle what earlier attempts of this task left open; add them to the ledger (once)."""
        if self._attempt == 0 or self._earlier_settled:
            return []
        self._earlier_settled = True
        records = [e for e in _task_records(self._metadata, *self._where) if e["attempt"] < self._attempt]
        settled = []
        for entry in ledger_mod.merge(records):
            if entry["status"] in ledger_mod.OPEN_STATUSES:
                reason = f"attempt {entry['attempt']} ended before settling (killed or crashed)"
                entry = _settle().resolve(self._get_client(), entry, reason, self._record)
            settled.append(entry)
        self._ledger = ledger_mod.merge(self._ledger, settled)
        self._publish(flow)
        return settled

    def _record(self, entry) -> None:
        """Write one state of an escrow to the task's metadata (durable before we go on)."""
        flow_name, run_id, step, task_id = self._where
        self._metadata.register_metadata(run_id, step, task_id, [escrow_metadatum(entry)])

    def _publish(self, flow) -> None:
        setattr(flow, LEDGER_ARTIFACT, self._ledger)
        setattr(flow, ESCROWS_ARTIFACT, ledger_mod.escrow_map(self._ledger))

    def _disarm_timeout(self) -> None:
        # @timeout arms SIGALRM for the body and only disarms it in its own
        # task_post_step (never after an exception). The body is over: don't let
        # the alarm interrupt a release or refund half-way.
        if getattr(self, "_has_timeout", False):
            signal.alarm(0)


class PfLedgerJoinDecorator(StepDecorator):
    """
    Merges the `pf_ledger` and `pf_escrows` artifacts of a join's inputs before the
    join runs. `@pf_escrow_step` adds it to every join of a flow that uses escrow,
    so joins written without pf-metaflow in mind (even with `merge_artifacts`)
    still carry the whole run's ledger.
    """

    name = "pf_ledger_join"
    defaults = {}

    def task_pre_step(self, step_name, task_datastore, metadata, run_id, task_id, flow, graph,
                      retry_count, max_user_code_retries, ubf_context, inputs):
        merged = _incoming_ledger(flow, graph, step_name, inputs)
        setattr(flow, LEDGER_ARTIFACT, merged)
        setattr(flow, ESCROWS_ARTIFACT, ledger_mod.escrow_map(merged))


def _attach_join_mergers(flow, graph) -> None:
    for node in graph:
        if node.type != "join":
            continue
        step_func = getattr(flow, node.name)
        if not any(d.name in ("pf_escrow_step", "pf_ledger_join") for d in step_func.decorators):
            step_func.decorators.append(
                PfLedgerJoinDecorator(statically_defined=True, inserted_by=["pf_escrow_step"])
            )


def _incoming_ledger(flow, graph, step_name, inputs) -> list:
    if graph[step_name].type == "join":
        ledgers = [inp[LEDGER_ARTIFACT] for inp in inputs if LEDGER_ARTIFACT in inp]
        return ledger_mod.merge(*ledgers)
    return ledger_mod.merge(getattr(flow, LEDGER_ARTIFACT, None) or [])


def _settle():
    from . import settle

    return settle


def escrow_metadatum(entry) -> MetaDatum:
    """One state of an escrow as a task metadata record (unique field per attempt and state)."""
    return MetaDatum(
        field=f"pf_escrow_{entry['attempt']}_{entry['seq']}",
        value=json.dumps(entry, sort_keys=True),
        type=METADATA_TYPE,
        tags=[f"attempt_id:{entry['attempt']}"],
    )


def _task_records(metadata, flow_name, run_id, step, task_id) -> list:
    found = metadata.get_object("task", "metadata", None, None, flow_name, run_id, step, task_id) or []
    return [json.loads(m["value"]) for m in found if m.get("type") == METADATA_TYPE]


def _failure_reason(exception: BaseException) -> str:
    text = " ".join(str(exception).split())
    if len(text) > 240:
        text = text[:237] + "..."
    return redact(f"step failed: {type(exception).__name__}: {text}", _env("PF_API_KEY"))


def _timeout_hours(raw: Any) -> Optional[int]:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, str)) or not str(raw).isdigit() \
            or not 1 <= int(raw) <= 720:
        raise PfEscrowStepException(f"timeout_hours must be a whole number from 1 to 720, got {raw!r}")
    return int(raw)


def _settlement_line(entry) -> str:
    what = {
        "released": f"{entry['amount_usdc']} USDC paid to {entry['recipient']} ({entry['net_usdc']} after fees)",
        "refunded": f"{entry['amount_usdc']} USDC back to the payer",
        "refund_pending": f"{entry['amount_usdc']} USDC comes back to the payer at {entry.get('expected_at')}",
    }.get(entry["status"], f"{entry['amount_usdc']} USDC for {entry['recipient']}")
    tail = f" ({entry['reason']})" if entry.get("reason") and entry["status"] != "released" else ""
    return f"[pf-metaflow] escrow {entry.get('escrow_id') or '(none)'} {entry['status']}: {what}{tail}"


def _env(name: str) -> Optional[str]:
    import os

    return os.environ.get(name) or None


# `from pf_metaflow import pf_escrow_step`: the same decorator Metaflow's own are,
# usable as `@pf_escrow_step` or `@pf_escrow_step(...)` above `@step`.
pf_escrow_step = partial(_base_step_decorator, PfEscrowStepDecorator)
pf_escrow_step.__doc__ = PfEscrowStepDecorator.__doc__
