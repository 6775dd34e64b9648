"""``@pf_escrow_step``: Purple Flea escrow around a Metaflow step (implementation).

Metaflow imports this module every time it is imported itself (the extension
mechanism registers the decorator), so it stays light: the escrow client and the
settlement code are imported in the task hooks that use them.

Import it as ``pf_metaflow.decorator`` (or ``from pf_metaflow import pf_escrow_step``):
this module is what Metaflow's extension loader imports while Metaflow itself is
still initialising, so it must never be the first pf_metaflow module a user imports.

The only module that knows Metaflow's decorator lifecycle; the hooks delegate:
:mod:`pf_metaflow.terms` checks the arguments, :mod:`pf_metaflow.task_escrow` keeps
the task's one escrow across its attempts, :mod:`pf_metaflow.lease` tells
``reconcile`` whether the task is still running. Every state an escrow reaches is
written to the task's Metaflow metadata before the step goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from decimal import Decimal
from functools import partial, update_wrapper
from typing import Any, Optional

from metaflow.decorators import StepDecorator, _base_step_decorator
from metaflow.exception import MetaflowException
from metaflow.metadata_provider import MetaDatum

from . import ledger as ledger_mod
from . import terms
from .budget import budget_for
from .errors import BudgetError, InvalidAgentId, InvalidAmount, PurpleFleaError
from .ids import check_agent_id, redact
from .money import parse_usdc, usdc_str

METADATA_TYPE = "pf-escrow"
LEDGER_ARTIFACT = "pf_ledger"
ESCROWS_ARTIFACT = "pf_escrows"
BUDGET_ARTIFACT = "pf_budget"
SANDBOX_AGENT_PREFIX = "ag_sandbox_"


class PfEscrowStepException(MetaflowException):
    headline = "Invalid @pf_escrow_step"


class PfEscrowRuntimeError(MetaflowException):
    headline = "pf_escrow_step could not lock escrow"


class PfEscrowReleaseError(MetaflowException):
    headline = "pf_escrow_step could not pay the agent"


class PfEscrowStepDecorator(StepDecorator):
    """
    Locks Purple Flea escrow before the step runs; releases it to the agent when the
    step succeeds, refunds it when the step has finally failed (then lets the exception
    go on, so `@catch` records it and the run continues).

    One escrow per task, shared by its attempts: a `@retry` attempt pays from the
    escrow its task already holds, and a task is paid at most once (a later attempt
    of a task already paid runs unpaid, and says so). A failed attempt with a retry
    left keeps the escrow for the next one; the refund comes when no user retry is
    left, in `@catch`'s fallback, or when the release gate fails. A release that
    finds its escrow refunded or disputed fails the step: a step never succeeds with
    its agent unpaid. Every state is written to the task's metadata before the step
    goes on, so `pf-metaflow reconcile FLOW/RUN` settles what a killed task left.
    Each task adds its entry to the `pf_ledger` artifact (joins merge their inputs'
    ledgers) and to `pf_escrows`.

    Parameters
    ----------
    agent_wallet : str, optional
        The agent paid for this step: an agent id (`ag_…`), or the name of a flow
        attribute or Parameter holding one. Default: the flow's `agent_wallet`.
    amount_usdc : float or str, optional
        USDC to lock: a literal (`2.5`, `"2.50"`; at least 0.10, at most 6 decimal
        places) or the name of a flow attribute or Parameter. Default: this step's
        budget in `self.pf_budget` (see `pf_metaflow.plan_budget`); inside a foreach,
        the shard's allowance (`pf_metaflow.allot_shards`). In a run with a budget,
        an explicit amount may not exceed the step's budget.
    budget_key : str, optional
        Which step's budget pays for this step, when not its own. Each budget pays
        one step: two billed steps may not share a key.
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
            _check_budget_keys(flow, graph)
        except (InvalidAmount, InvalidAgentId, BudgetError, terms.TermsError) as exc:
            raise PfEscrowStepException(f"step *{step_name}*: {exc.message}") from None
        from . import remote  # remote compute needs a shared escrow and metadata (issue 12)
        remote.check(step_name, decorators, billed=self._billed)
        self._has_timeout = any(d.name == "timeout" for d in decorators)
        self._retry_wait = _retry_wait_seconds(decorators)
        _attach_join_mergers(flow, graph)

    def _parse(self, graph, step_name):
        a = self.attributes
        self._payee = terms.payee_value(a["agent_wallet"])
        self._amount = terms.amount_value(a["amount_usdc"])
        self._gate = terms.parse_gate(a["release_if"])
        self._billed, self._budget_key = _billing(a, step_name, graph)
        if a["budget_key"] is not None and self._amount is not None:
            raise terms.TermsError("give amount_usdc or budget_key, not both")
        self._timeout_hours = terms.timeout_hours(a["timeout_hours"])
        node = graph[step_name]
        if node.type == "split-parallel" or getattr(node, "parallel_step", False):
            raise terms.TermsError(
                "@parallel steps run one task per node with a shared id; pay for them in the "
                "step that launches them"
            )

    def add_to_package(self):
        # Remote tasks import pf_metaflow: the code package carries it (issue 12).
        from . import remote

        return remote.package_contents()

    # -- task time ----------------------------------------------------------------------

    def task_pre_step(self, step_name, task_datastore, metadata, run_id, task_id, flow, graph,
                      retry_count, max_user_code_retries, ubf_context, inputs):
        from .lease import LeaseKeeper
        from .task_escrow import TaskEscrow

        self._metadata = metadata
        self._where = (flow.name, str(run_id), step_name, str(task_id))
        self._attempt = retry_count
        self._client = None
        self._ledger = _incoming_ledger(flow, graph, step_name, inputs)
        self._escrow = TaskEscrow("/".join(self._where), retry_count, read=self._records,
                                  write=self._record, client=self._get_client)
        self._lease = None
        self._publish(flow)
        if self._billed:
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
                                budget_key=self._budget_key, billed=self._billed, note=_note_agent,
                                own_entry=lambda: self._escrow.entry, write_lease=self._write_lease))
        # --- end of issue 14 hook

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

    def task_post_step(self, step_name, flow, graph, retry_count, max_user_code_retries):
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

    def task_exception(self, exception, step_name, flow, graph, retry_count, max_user_code_retries):
        # Never raise from here: Metaflow calls every decorator's task_exception in turn, and
        # an error here would keep @catch from recording the step's failure.
        try:
            if not getattr(self, "_billed", False) or getattr(self, "_escrow", None) is None:
                return False
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
        except Exception as exc:  # noqa: BLE001
            print(f"[pf-metaflow] could not settle this task's escrow ({type(exc).__name__}: {exc}); "
                  "`pf-metaflow reconcile` will")
        return False  # the step failed; @catch (if any) decides what happens next

    def task_finished(self, step_name, flow, graph, is_task_ok, retry_count, max_user_code_retries):
        lease = getattr(self, "_lease", None)
        if lease is None:
            return
        try:
            if self._escrow.held_for_retry:
                lease.retrying(self._retry_wait)
            else:
                lease.end()
        except Exception as exc:  # noqa: BLE001 - the lease runs out by itself
            print(f"[pf-metaflow] could not end this task's lease: {exc}")

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
                _check_within_budget(flow, budget, self._budget_key, amount)
            return recipient, amount
        if budget is None:
            raise BudgetError(
                "no amount_usdc given and the flow has no pf_budget artifact: set amount_usdc, or "
                "make a budget with pf_metaflow.plan_budget(...) in an earlier step"
            )
        return recipient, _allowance(flow, budget, self._budget_key)

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


def _incoming_ledger(flow, graph, step_name, inputs) -> list:
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


# `from pf_metaflow import pf_escrow_step`: the same decorator Metaflow's own are,
# usable as `@pf_escrow_step` or `@pf_escrow_step(...)` above `@step`.
pf_escrow_step = update_wrapper(partial(_base_step_decorator, PfEscrowStepDecorator), PfEscrowStepDecorator)
