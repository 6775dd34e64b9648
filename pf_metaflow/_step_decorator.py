"""``@pf_escrow_step``: the decorator classes Metaflow registers.

Metaflow's extension mechanism imports this module whenever Metaflow itself is imported:
in every Metaflow command and every task process, paid or not. So it imports nothing but
Metaflow and defines only what Metaflow needs to know the decorators; what a paid step
does is in :mod:`pf_metaflow._paid_step`, which ``step_init`` loads for a flow that uses
the decorator (a flow without it never loads it, nor the escrow client, nor ``decimal``).

Import it as ``pf_metaflow.decorator`` (or ``from pf_metaflow import pf_escrow_step``):
this module is what Metaflow's extension loader imports while Metaflow itself is
still initialising, so it must never be the first pf_metaflow module a user imports.

The only module that knows Metaflow's decorator lifecycle; each hook hands over to the
step's :class:`~pf_metaflow._paid_step.PaidStep`: :mod:`pf_metaflow.terms` checks the
arguments, :mod:`pf_metaflow.task_escrow` keeps the task's one escrow across its attempts,
:mod:`pf_metaflow.lease` tells ``reconcile`` whether the task is still running. Every
state an escrow reaches is written to the task's Metaflow metadata before the step goes on.
"""

from __future__ import annotations

from functools import partial, update_wrapper

from metaflow.decorators import StepDecorator, _base_step_decorator
from metaflow.exception import MetaflowException

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

    # -- graph time (every process that loads the flow) ----------------------------------

    def step_init(self, flow, graph, step_name, decorators, environment, flow_datastore, logger):
        from ._paid_step import PaidStep  # the implementation: loaded only by flows that pay

        self._paid = PaidStep(self.attributes, flow, graph, step_name, decorators)

    def add_to_package(self):
        # Remote tasks import pf_metaflow: the code package carries it (issue 12).
        from . import remote

        return remote.package_contents()

    # -- Metaflow's runtime process (local runs) -------------------------------------------

    def runtime_task_created(self, task_datastore, task_id, split_index, input_paths, is_cloned,
                             ubf_context):
        self._paid.runtime_task_created()

    def runtime_finished(self, exception):
        paid = getattr(self, "_paid", None)
        if paid is not None:
            paid.runtime_finished()

    # -- task time ----------------------------------------------------------------------

    def task_pre_step(self, step_name, task_datastore, metadata, run_id, task_id, flow, graph,
                      retry_count, max_user_code_retries, ubf_context, inputs):
        self._paid.task_pre_step(step_name, metadata, run_id, task_id, flow, graph, retry_count, inputs)

    def task_decorate(self, step_func, flow, graph, retry_count, max_user_code_retries, ubf_context):
        return self._paid.task_decorate(step_func, flow, retry_count, max_user_code_retries)

    def task_post_step(self, step_name, flow, graph, retry_count, max_user_code_retries):
        self._paid.task_post_step(step_name, flow)

    def task_exception(self, exception, step_name, flow, graph, retry_count, max_user_code_retries):
        # Never raise from here: Metaflow calls every decorator's task_exception in turn, and
        # an error here would keep @catch from recording the step's failure.
        paid = getattr(self, "_paid", None)
        try:
            if paid is not None:
                paid.task_exception(exception, flow, retry_count, max_user_code_retries)
        except Exception as exc:  # noqa: BLE001
            print(f"[pf-metaflow] could not settle this task's escrow ({type(exc).__name__}: {exc}); "
                  "`pf-metaflow reconcile` will")
        return False  # the step failed; @catch (if any) decides what happens next

    def task_finished(self, step_name, flow, graph, is_task_ok, retry_count, max_user_code_retries):
        paid = getattr(self, "_paid", None)
        try:
            if paid is not None:
                paid.task_finished()
        except Exception as exc:  # noqa: BLE001 - the lease runs out by itself
            print(f"[pf-metaflow] could not end this task's lease: {exc}")


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
        from . import ledger as ledger_mod
        from ._paid_step import incoming_ledger

        merged = incoming_ledger(flow, graph, step_name, inputs)
        setattr(flow, LEDGER_ARTIFACT, merged)
        setattr(flow, ESCROWS_ARTIFACT, ledger_mod.escrow_map(merged))


# `from pf_metaflow import pf_escrow_step`: the same decorator Metaflow's own are,
# usable as `@pf_escrow_step` or `@pf_escrow_step(...)` above `@step`.
pf_escrow_step = update_wrapper(partial(_base_step_decorator, PfEscrowStepDecorator), PfEscrowStepDecorator)
