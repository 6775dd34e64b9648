"""Process faults for the fault matrix's flows, chosen by the test through the environment.

``PFMF_FAULT=<action>@<point>``:

- actions: ``kill`` (SIGKILL the task), ``raise`` (a RuntimeError), ``hang`` (sleep until
  ``@timeout`` interrupts it);
- points: ``body_start`` (first line of the step body), ``mid_body``, ``after_body`` (the
  ``@fault_point`` decorator's ``task_post_step``, which Metaflow runs before
  ``@pf_escrow_step``'s when ``@fault_point`` sits between it and ``@step``: after the body,
  before the release).

``PFMF_PID_FILE``: ``@fault_point`` writes the task's pid there before ``@pf_escrow_step``
creates the escrow, so the test's server can SIGKILL the task while a request is in flight.

``@fault_point`` is a test-only step decorator, attached without registering a plugin.
"""

import os
import signal
import time
from functools import partial

from metaflow.decorators import StepDecorator, _base_step_decorator


def at(point: str) -> None:
    """Inject the fault the test asked for, if it is meant for ``point``."""
    action, _, where = os.environ.get("PFMF_FAULT", "").partition("@")
    if where != point:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise RuntimeError(f"fault injected at {point}")
    elif action == "hang":
        time.sleep(60)
    else:
        raise ValueError(f"unknown PFMF_FAULT action {action!r}")


class FaultPointDecorator(StepDecorator):
    name = "pfmf_fault_point"
    defaults = {}

    def task_pre_step(self, step_name, task_datastore, metadata, run_id, task_id, flow, graph,
                      retry_count, max_user_code_retries, ubf_context, inputs):
        pid_file = os.environ.get("PFMF_PID_FILE")
        if pid_file:
            with open(pid_file, "w") as out:
                out.write(str(os.getpid()))

    def task_post_step(self, step_name, flow, graph, retry_count, max_user_code_retries):
        at("after_body")


fault_point = partial(_base_step_decorator, FaultPointDecorator)
