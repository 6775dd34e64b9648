"""The flow of ``tests/test_settlement_stateful.py``'s slow tier: one billable task whose attempts
fail the way the test says.

``PFMF_STATEFUL_PLAN``: JSON ``{"<attempt>": "<action>"}``; an attempt it does not name runs ``ok``.
Actions:

- ``ok``: the body succeeds and the release gate holds;
- ``gate_fails``: the body succeeds, the release gate (``release_if="gate_ok"``) does not hold;
- ``unpicklable``: the body succeeds but sets an artifact that cannot be pickled, so Metaflow
  fails the task while persisting artifacts, after ``@pf_escrow_step`` released;
- ``<raise|kill>@<point>``: a RuntimeError or SIGKILL at ``pre`` (after ``@pf_escrow_step``'s
  ``task_pre_step``: its lease runs, nothing is locked), ``body`` (first line of the body, the
  escrow locked), ``after_body`` (a ``task_post_step`` that runs before ``@pf_escrow_step``'s:
  before the release), ``after_release`` (a ``task_post_step`` that runs after it: paid, the
  artifacts not yet persisted);
- ``hang@body``: the body waits until the file ``$PFMF_STATEFUL_GO`` exists (the test runs
  ``reconcile`` meanwhile).

``PFMF_PID_FILE``: the task writes its pid there first, so the test's server can SIGKILL it while
one of its requests is in flight. Metaflow runs the hooks of the decorator nearest ``@step``
first, so ``@inner`` acts before ``@pf_escrow_step`` and ``@outer`` after it.
"""

import json
import os
import signal
import threading
import time
from functools import partial

from metaflow import FlowSpec, current, step
from metaflow.decorators import StepDecorator, _base_step_decorator

from pf_metaflow import pf_escrow_step


def action(attempt: int) -> str:
    plan = json.loads(os.environ.get("PFMF_STATEFUL_PLAN") or "{}")
    return plan.get(str(attempt), "ok")


def at(point: str, attempt: int) -> None:
    what, _, where = action(attempt).partition("@")
    if where != point:
        return
    print(f"[stateful] attempt {attempt}: {what} at {point}", flush=True)
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif what == "raise":
        raise RuntimeError(f"fault injected at {point} (attempt {attempt})")
    elif what == "hang":
        go = os.environ["PFMF_STATEFUL_GO"]
        while not os.path.exists(go):
            time.sleep(0.1)
    else:
        raise ValueError(f"unknown action {what!r}")


class Inner(StepDecorator):
    name = "pfmf_stateful_inner"
    defaults = {}

    def task_pre_step(self, step_name, task_datastore, metadata, run_id, task_id, flow, graph,
                      retry_count, max_user_code_retries, ubf_context, inputs):
        pid_file = os.environ.get("PFMF_PID_FILE")
        if pid_file:
            with open(pid_file, "w") as out:
                out.write(str(os.getpid()))

    def task_post_step(self, step_name, flow, graph, retry_count, max_user_code_retries):
        at("after_body", retry_count)


class Outer(StepDecorator):
    name = "pfmf_stateful_outer"
    defaults = {}

    def task_pre_step(self, step_name, task_datastore, metadata, run_id, task_id, flow, graph,
                      retry_count, max_user_code_retries, ubf_context, inputs):
        if retry_count <= max_user_code_retries:  # not @catch's fallback
            at("pre", retry_count)

    def task_post_step(self, step_name, flow, graph, retry_count, max_user_code_retries):
        at("after_release", retry_count)


inner = partial(_base_step_decorator, Inner)
outer = partial(_base_step_decorator, Outer)


class StatefulFlow(FlowSpec):
    @outer
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.25", label="work",
                    release_if="gate_ok")
    @inner
    @step
    def start(self):
        attempt = current.retry_count
        at("body", attempt)
        self.gate_ok = action(attempt) != "gate_fails"
        if action(attempt) == "unpicklable":
            self.lock = threading.Lock()
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    StatefulFlow()
