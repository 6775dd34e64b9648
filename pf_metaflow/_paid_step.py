"""What ``@pf_escrow_step`` does for one step: its terms, and its task's escrow and lease.

:mod:`pf_metaflow._step_decorator` is the thin class Metaflow registers (and imports in
every Metaflow process, paid or not); its ``step_init`` builds a :class:`PaidStep` and
each lifecycle hook hands over to it. So this module, and the modules it imports, load
only in processes that load a flow with a paid step.

At graph time (``PaidStep(...)``), the arguments are checked (:mod:`pf_metaflow.terms`)
and, once per flow and process, the budget keys and join mergers. At task time the work
is delegated: :mod:`pf_metaflow.task_escrow` keeps the task's one escrow across its
attempts, :mod:`pf_metaflow.lease` tells ``reconcile`` whether the task is still running.
Every state an escrow reaches is written to the task's Metaflow metadata before the step
goes on. The escrow client, settlement and lease modules are imported by the task hooks
that use them: Metaflow's runtime process and ``check``/``show`` never settle anything.
"""

from __future__ import annotations

import metaflow  # noqa: F401  -- must finish initialising (it loads _step_decorator) first

import hashlib
import json
import os
import re
import signal
import weakref
from decimal import Decimal
from typing import Any, Optional

from metaflow.metadata_provider import MetaDatum

from . import ledger as ledger_mod
from . import terms
from ._step_decorator import (
    BUDGET_ARTIFACT,
    ESCROWS_ARTIFACT,
    LEDGER_ARTIFACT,
    METADATA_TYPE,
    SANDBOX_AGENT_PREFIX,
    PfEscrowReleaseError,
    PfEscrowRuntimeError,
    PfEscrowStepException,
    PfLedgerJoinDecorator,
)
from .budget import budget_for
from .errors import BudgetError, InvalidAgentId, InvalidAmount, PurpleFleaError
from .ids import check_agent_id, redact
from .money import parse_usdc, usdc_str


# Whether this process (Metaflow's runtime) holds the embedded sandbox's database open.
_runtime_holds = False


class PaidStep:
    """One step's ``@pf_escrow_step``: built by the decorator's ``step_init``, in every process
    that loads the flow; its task methods run in the step's task processes."""

    def __init__(self, attributes: dict, flow, graph, step_name: str, decorators) -> None:
        self.attributes = attributes
        self._step_name = step_name
        try:
            self._parse(graph, step_name)
            _check_flow(flow, graph)
        except (InvalidAmount, InvalidAgentId, BudgetError, terms.TermsError) as exc:
            raise PfEscrowStepException(f"step *{step_name}*: {exc.message}") from None
        from . import remote  # remote compute needs a shared escrow and metadata (issue 12)

        remote.check(step_name, decorators, billed=self.billed)
        self._has_timeout = any(d.name == "timeout" for d in decorators)
        self._retry_wait = _retry_wait_seconds(decorators)

    def _parse(self, graph, step_name):
        a = self.attributes
        self._payee = terms.payee_value(a["agent_wallet"])
        self._amount = terms.amount_value(a["amount_usdc"])
        self._gate = terms.parse_gate(a["release_if"])
        self.billed, self.budget_key = _billing(a, step_name, graph)
        if a["budget_key"] is not None and self._amount is not None:
            raise terms.TermsError("give amount_usdc or budget_key, not both")
        self._timeout_hours = terms.timeout_hours(a["timeout_hours"])
        node = graph[step_name]
        if node.type == "split-parallel" or getattr(node, "parallel_step", False):
            raise terms.TermsError(
                "@parallel steps run one task per node with a shared id; pay for them in the "
                "step that launches them"
            )

    # -- Metaflow's runtime process ---------------------------------------------------------

    def runtime_task_created(self) -> None:
        """The runtime is about to start one of this step's tasks: hold the embedded sandbox's
        database open while the run lasts, so that the tasks' processes, each opening and
        closing it, do not each checkpoint and delete its log (``sandbox.engine.hold_open``)."""
        global _runtime_holds
        if not self.billed:
            return
        from ._embedded import is_sandbox_url, sandbox_path

        url = os.environ.get("PF_ESCROW_URL", "").strip()
        if not is_sandbox_url(url):
            return
        try:
            from .sandbox.engine import hold_open

            _runtime_holds = hold_open(sandbox_path(url)) or _runtime_holds
        except Exception:  # noqa: BLE001 - only a saving: the tasks report a bad URL or file
            pass

    def runtime_finished(self) -> None:
        global _runtime_holds
        if _runtime_holds:
            from .sandbox.engine import release_held

            release_held()
            _runtime_holds = False

    # -- task time ----------------------------------------------------------------------

    def task_pre_step(self, step_name, metadata, run_id, task_id, flow, graph, retry_count, inputs):
        from .lease import LeaseKeeper
        from .task_escrow import TaskEscrow

        self._metadata = metadata
        self._where = (flow.name, str(run_id), step_name, str(task_id))
        self._attempt = retry_count
        self._client = None
        self._ledger = incoming_ledger(flow, graph, step_name, inputs)
        self._escrow = TaskEscrow("/".join(self._where), retry_count, read=self._records,
                                  write=self._record, client=self._get_client)
        self._lease = None
        self._publish(flow)
        if self.billed:
            # Before any escrow record: a task that may be running is never settled by others.
            self._lease = LeaseKeeper(retry_count, self._write_lease)
            self._lease.start()
        # --- issue 14 hook: pf_metaflow.mcp's agent toolkit reaches this task's escrow context (in
        # this process only: nothing persisted, no key). See pf_metaflow/mcp/context.py.
        from .mcp.context import TaskContext, set_current

        def _note_agent(entries, _flow=flow):
            self._ledger = ledger_mod.merge(self._ledger, entries)
            self._publish(_flow)

        set_current(TaskContext(flow=flow, where=self._where, attempt=retry_count, metadata=metadata,
                                budget_key=self.budget_key, billed=self.billed, note=_note_agent,
                                own_entry=lambda: self._escrow.entry, write_lease=self._write_lease))
        # --- end of issue 14 hook

    def task_decorate(self, step_func, flow, retry_count, max_user_code_retries):
        if not self.billed or retry_count > max_user_code_retries:
            return step_func  # not billed here, or @catch's fallback attempt (no user code runs)

        def step_with_escrow(*args, **kwargs):
            # Escrow is locked here, after every decorator's task_pre_step, so that
            # @secrets / @environment have put PF_ESCROW_URL and PF_API_KEY in place,
            # whatever order the decorators are written in.
            self._lock_escrow(flow)
            return step_func(*args, **kwargs)

        return step_with_escrow

    def _lock_escrow(self, flow) -> None:
        from .settle import SettlementError

        intent: list = []

        def build(ref: str, generation: int):
            intent.append(self._new_entry(flow, ref, generation))
            return intent[-1]

        try:
            self._escrow.lock(build)
        except (SettlementError, PurpleFleaError, terms.TermsError) as exc:
            what = f"could not lock {intent[-1]['amount_usdc']} USDC for {intent[-1]['recipient']}: " \
                if intent and not isinstance(exc, SettlementError) else ""
            raise PfEscrowRuntimeError(
                f"step *{self._step_name}*: {what}{exc.message}. The step did not run.") from None
        finally:
            self._note(flow)

    def task_post_step(self, step_name, flow) -> None:
        entry = getattr(self, "_escrow", None) and self._escrow.entry
        if not entry:
            return
        self._disarm_timeout()
        ok, why = self._check_gate(flow)
        from .settle import SettlementError

        before = entry.get("seq")
        try:
            self._escrow.succeed(ok, why)
        except SettlementError as exc:
            raise PfEscrowReleaseError(f"step *{step_name}*: {exc.message}") from None
        finally:
            self._note(flow)
        if self._escrow.entry.get("seq") != before:  # an earlier attempt's payment is not this one's
            print(_settlement_line(self._escrow.entry))

    def task_exception(self, exception, flow, retry_count, max_user_code_retries) -> None:
        """Settle what the failed attempt holds. Raises only what the caller must swallow."""
        if not self.billed or getattr(self, "_escrow", None) is None:
            return
        self._disarm_timeout()
        # No user retry left (or @catch's fallback attempt): the task has finally failed.
        final = retry_count >= max_user_code_retries
        before = self._escrow.entry
        reason = _failure_reason(exception)
        if retry_count > max_user_code_retries:
            reason = (f"attempt {retry_count - 1} ended before settling (killed or crashed); "
                      "@catch's fallback gives the escrow back")
        after = self._escrow.fail(reason, final=final)
        self._note(flow)
        if after is not None and (before is None or after.get("seq") != before.get("seq")):
            print(_settlement_line(after))

    def task_finished(self) -> None:
        lease = getattr(self, "_lease", None)
        if lease is None:
            return
        if self._escrow.held_for_retry:
            lease.retrying(self._retry_wait)
        else:
            lease.end()

    # -- helpers ------------------------------------------------------------------------

    def _get_client(self):
        if self._client is None:
            from .client import default_client

            self._client = default_client()
        return self._client

    def _new_entry(self, flow, ref: str, generation: int):
        recipient, amount = self._resolve_terms(flow)
        flow_name, run_id, step, task_id = self._where
        stack = flow.foreach_stack() or []
        shard = ledger_mod.escrow_key(step, [s[0] for s in stack]) if stack else None
        label = self.attributes["label"] or step
        description = f"pf-metaflow {ref} {label}"[:200]
        return ledger_mod.new_entry(
            ref=ref, run=f"{flow_name}/{run_id}", step=step, task=task_id, attempt=self._attempt,
            recipient=recipient, amount_usdc=amount, description=description, label=label,
            shard=shard, idempotency_key="pfmf-" + hashlib.sha256(ref.encode()).hexdigest()[:40],
            timeout_hours=self._timeout_hours, referral_code=self._referral_code(flow) or None,
        )

    def _resolve_terms(self, flow) -> tuple[str, Decimal]:
        recipient = check_agent_id(self._payee.resolve(flow, "agent_wallet"))
        if recipient.startswith(SANDBOX_AGENT_PREFIX) and not self._get_client().is_sandbox:
            raise terms.TermsError(
                f"agent_wallet {recipient} is a sandbox agent, but the escrow service at "
                f"{self._get_client().url} is not a sandbox: pass the real agent's id "
                "(--agent_wallet ag_…). No escrow was created"
            )
        budget = getattr(flow, BUDGET_ARTIFACT, None)
        if self._amount is not None:
            raw = self._amount.resolve(flow, "amount_usdc")
            amount = parse_usdc(raw, name=self._amount.attribute or "amount_usdc")
            if budget is not None:
                _check_within_budget(flow, budget, self.budget_key, amount)
            return recipient, amount
        if budget is None:
            raise BudgetError(
                "no amount_usdc given and the flow has no pf_budget artifact: set amount_usdc, or "
                "make a budget with pf_metaflow.plan_budget(...) in an earlier step"
            )
        return recipient, _allowance(flow, budget, self.budget_key)

    def _referral_code(self, flow) -> Optional[str]:
        """A literal code, or the name of a flow Parameter holding one (the guide's
        ``--referral_code``); else ``$PF_REFERRAL_CODE``."""
        raw = self.attributes["referral_code"]
        if isinstance(raw, str) and terms._IDENTIFIER.match(raw) and hasattr(flow, raw):
            raw = getattr(flow, raw)
        return (str(raw).strip() if raw else "") or os.environ.get("PF_REFERRAL_CODE") or None

    def _check_gate(self, flow) -> tuple[bool, str]:
        if self._gate is None:
            return True, ""
        if callable(self._gate):
            try:
                return bool(self._gate(flow)), "release gate returned False"
            except Exception as exc:  # a broken gate must not release money
                return False, f"release gate raised {type(exc).__name__}: {exc}"
        try:
            return self._gate.check(flow)
        except terms.TermsError as exc:
            return False, f"release gate {self._gate.text!r}: {exc.message}"

    def _records(self) -> list:
        return _task_records(self._metadata, *self._where)

    def _record(self, entry) -> None:
        """Write one state of an escrow to the task's metadata (durable before we go on)."""
        _, run_id, step, task_id = self._where
        self._metadata.register_metadata(run_id, step, task_id, [escrow_metadatum(entry, self._attempt)])

    def _write_lease(self, field: str, value: dict) -> None:
        from .lease import LEASE_TYPE

        _, run_id, step, task_id = self._where
        self._metadata.register_metadata(run_id, step, task_id, [MetaDatum(
            field=field, value=json.dumps(value, sort_keys=True), type=LEASE_TYPE,
            tags=[f"attempt_id:{self._attempt}"])])

    def _note(self, flow) -> None:
        """Put the escrow's latest state on the ledger artifacts."""
        entry = self._escrow.entry
        if entry is not None:
            self._ledger = ledger_mod.merge(self._ledger, [entry])
        self._publish(flow)

    def _publish(self, flow) -> None:
        setattr(flow, LEDGER_ARTIFACT, self._ledger)
        setattr(flow, ESCROWS_ARTIFACT, ledger_mod.escrow_map(self._ledger))

    def _disarm_timeout(self) -> None:
        # @timeout arms SIGALRM for the body and only disarms it in its own
        # task_post_step (never after an exception). The body is over: don't let
        # the alarm interrupt a release or refund half-way.
        if self._has_timeout:
            signal.alarm(0)


# ---------------------------------------------------------------------------------------
# Graph-time checks across steps


def _billing(attributes, step_name: str, graph) -> tuple[bool, str]:
    """(is this step billed, which budget pays it)."""
    steps = terms.steps_filter(attributes["steps"])
    names = {node.name for node in graph}
    if steps is not None:
        unknown = sorted(steps - names)
        if unknown:
            raise terms.TermsError(f"steps names {', '.join(unknown)}, not steps of this flow")
    budget_key = attributes["budget_key"]
    if budget_key is not None and budget_key not in names:
        raise terms.TermsError(
            f"budget_key {budget_key!r} is not a step of this flow (steps: {', '.join(sorted(names))})"
        )
    return steps is None or step_name in steps, budget_key or step_name


# The graphs whose flow-wide checks passed in this process: Metaflow calls every paid step's
# step_init, and the checks look at every step, so they run once per flow, not once per step.
_checked_graphs: "weakref.WeakSet" = weakref.WeakSet()


def _check_flow(flow, graph) -> None:
    if graph in _checked_graphs:
        return
    _check_budget_keys(flow, graph)
    _attach_join_mergers(flow, graph)
    _checked_graphs.add(graph)


def _check_budget_keys(flow, graph) -> None:
    """Each budget pays one step: two billed steps drawing on the same budget would lock it twice."""
    payers: dict[str, str] = {}
    for node in graph:
        for deco in getattr(flow, node.name).decorators:
            if deco.name != "pf_escrow_step":
                continue
            billed, key = _billing(deco.attributes, node.name, graph)
            if not billed:
                continue
            if key in payers and payers[key] != node.name:
                raise terms.TermsError(
                    f"steps {payers[key]!r} and {node.name!r} both draw on the budget of {key!r}; each "
                    "budget pays one step (a run never locks more than its budget): give each its own "
                    "weight in step_weights"
                )
            payers[key] = node.name


def _retry_wait_seconds(decorators) -> float:
    for deco in decorators:
        if deco.name == "retry":
            try:
                return float(deco.attributes.get("minutes_between_retries") or 0) * 60
            except (TypeError, ValueError):
                return 120.0
    return 0.0


def _attach_join_mergers(flow, graph) -> None:
    for node in graph:
        if node.type != "join":
            continue
        step_func = getattr(flow, node.name)
        if not any(d.name in ("pf_escrow_step", "pf_ledger_join") for d in step_func.decorators):
            step_func.decorators.append(
                PfLedgerJoinDecorator(statically_defined=True, inserted_by=["pf_escrow_step"])
            )


# ---------------------------------------------------------------------------------------
# Budgets at task time


def _shard_index(flow, key: str) -> Optional[int]:
    stack = flow.foreach_stack() or []
    if not stack:
        return None
    if len(stack) > 1:
        raise BudgetError(
            f"step {key!r} pays from a budget inside a nested foreach; budgets are split over one "
            "foreach level (allot_shards before it fans out). Give the step a literal amount_usdc "
            "in a run without pf_budget, or pay in the outer foreach"
        )
    return stack[-1][0]


def _allowance(flow, budget, key: str) -> Decimal:
    return budget_for(budget, key, _shard_index(flow, key))


def _check_within_budget(flow, budget, key: str, amount: Decimal) -> None:
    """A run never locks more than its budget: in a run with a pf_budget, an explicit
    amount_usdc must fit the step's budget (or, in a foreach, the shard's allowance)."""
    if not isinstance(budget, dict) or key not in budget.get("steps", {}):
        planned = ", ".join(sorted(budget.get("steps", {}))) if isinstance(budget, dict) else ""
        raise BudgetError(
            f"step {key!r} has no share of the run's budget (pf_budget plans: {planned or 'nothing'}), "
            f"so its amount_usdc {usdc_str(amount)} USDC would be paid on top of the total: give it "
            "a weight in step_weights, or pay it from a planned step's budget with budget_key"
        )
    index = _shard_index(flow, key)
    limit = budget_for(budget, key, index)
    if amount > limit:
        what = f"shard {index}'s allowance" if index is not None else "budget"
        raise BudgetError(
            f"amount_usdc {usdc_str(amount)} USDC is above step {key!r}'s {what} of "
            f"{usdc_str(limit)} USDC in pf_budget: lower amount_usdc, or leave it out to "
            "lock the budgeted amount"
        )


# ---------------------------------------------------------------------------------------


def incoming_ledger(flow, graph, step_name, inputs) -> list:
    """The ledger a task starts from: its input's, or at a join all its inputs' merged."""
    if graph[step_name].type == "join":
        ledgers = [inp[LEDGER_ARTIFACT] for inp in inputs if LEDGER_ARTIFACT in inp]
        return ledger_mod.merge(*ledgers)
    return ledger_mod.merge(getattr(flow, LEDGER_ARTIFACT, None) or [])


def escrow_metadatum(entry, writer: Any = None) -> MetaDatum:
    """One state of an escrow as a task metadata record (a unique field per writer and state)."""
    who = entry["attempt"] if writer is None else writer
    # A task may hold several escrows (a second generation `#2`, its agents' `…/agent/N`) whose
    # writers and seqs coincide, and local metadata drops a second record of the same field in
    # the same millisecond: what the ref adds to the task's own goes in the field.
    extra = _field_tag(str(entry.get("ref", "")))
    return MetaDatum(
        field=f"pf_escrow_{who}_{extra + '_' if extra else ''}{entry['seq']}",
        value=json.dumps(entry, sort_keys=True),
        type=METADATA_TYPE,
        tags=[f"attempt_id:{who}"] if isinstance(who, int) else [],
    )


def _field_tag(ref: str) -> str:
    """What a ref adds to its task's own (``F/1/s/2#2`` -> ``g2``, ``…/agent/3`` -> ``agent3``)."""
    task_ref, _, generation = ref.partition("#")
    beyond = task_ref.split("/", 4)[4] if task_ref.count("/") >= 4 else ""
    return re.sub(r"[^A-Za-z0-9]", "", beyond) + (f"g{generation}" if generation else "")


def _task_records(metadata, flow_name, run_id, step, task_id) -> list:
    found = metadata.get_object("task", "metadata", None, None, flow_name, run_id, step, task_id) or []
    return [json.loads(m["value"]) for m in found if m.get("type") == METADATA_TYPE]


def _failure_reason(exception: BaseException) -> str:
    text = " ".join(str(exception).split())
    if len(text) > 240:
        text = text[:237] + "..."
    return redact(f"step failed: {type(exception).__name__}: {text}", os.environ.get("PF_API_KEY"))


def _settlement_line(entry) -> str:
    what = {
        "released": f"{entry['amount_usdc']} USDC paid to {entry['recipient']} ({entry['net_usdc']} after fees)",
        "refunded": f"{entry['amount_usdc']} USDC back to the payer",
        "refund_pending": f"{entry['amount_usdc']} USDC comes back to the payer at {entry.get('expected_at')}",
        "locked": f"{entry['amount_usdc']} USDC still held for {entry['recipient']}",
    }.get(entry["status"], f"{entry['amount_usdc']} USDC for {entry['recipient']}")
    tail = f" ({entry['reason']})" if entry.get("reason") and entry["status"] != "released" else ""
    return f"[pf-metaflow] escrow {entry.get('escrow_id') or '(none)'} {entry['status']}: {what}{tail}"
