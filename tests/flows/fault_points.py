"""Process faults for the fault matrix's flows, chosen by the test through the environment.

``PFMF_FAULT=<action>@<point>[#<attempt>]``, or several separated by commas (for example
``raise@body_start#0,kill@mid_body#1``: attempt 0 raises, attempt 1 is killed):

- actions: ``kill`` (SIGKILL the task), ``raise`` (a RuntimeError), ``hang`` (sleep until
  ``@timeout`` interrupts it);
- points: ``body_start`` (first line of the step body), ``mid_body``, ``after_body`` (the
  ``@fault_point`` decorator's ``task_post_step``, which Metaflow runs before
  ``@pf_escrow_step``'s when ``@fault_point`` sits between it and ``@step``: after the body,
  before the release), ``persist`` (while Metaflow persists the task's artifacts, after every
  ``task_post_step``, so after the release: the body leaves an artifact that ``raise`` s when
  pickled (a ``threading.Lock``, which cannot be pickled) or ``kill`` s the task when pickled).

``PFMF_FAULT_ATTEMPT=<n>``: inject a fault without its own ``#<attempt>`` only in attempt ``n``
(default: every attempt that reaches the point), so a ``@retry`` attempt after it can succeed.

``PFMF_GATE=<path>``: the body writes ``<path>.started`` (holding its pid) and waits until the
test creates ``<path>`` (at most ``PFMF_GATE_WAIT`` seconds, default 120), so the test can act
(run ``pf-metaflow reconcile``) while the task is running with its escrow locked.

``PFMF_PID_FILE``: ``@fault_point`` writes the task's pid there before ``@pf_escrow_step``
creates the escrow, so the test's server can SIGKILL the task while a request is in flight.

``@fault_point`` is a test-only step decorator, attached without registering a plugin.
"""

import os
import signal
import threading
import time
from functools import partial
from typing import Optional

from metaflow.decorators import StepDecorator, _base_step_decorator


class _KillWhenPickled:
    """An artifact whose pickling SIGKILLs the task: a task killed while its artifacts persist."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # never reached: SIGKILL is not delivered late


def _attempt() -> Optional[int]:
    from metaflow import current

    return getattr(current, "retry_count", None)


def at(point: str, flow=None, attempt: Optional[int] = None) -> None:
    """Inject the fault the test asked for, if one is meant for ``point`` (and this attempt)."""
    for fault in filter(None, (f.strip() for f in os.environ.get("PFMF_FAULT", "").split(","))):
        spec, _, only = fault.partition("#")
        action, _, where = spec.partition("@")
        if where != point:
            continue
        only = only or os.environ.get("PFMF_FAULT_ATTEMPT", "").strip()
        if only:
            attempt = _attempt() if attempt is None else attempt
            if attempt != int(only):
                continue
        _inject(action, point, flow)


def _inject(action: str, point: str, flow) -> None:
    if point == "persist":
        if flow is None:
            raise ValueError("the persist point needs the flow, to leave an artifact on it")
        if action == "raise":
            flow.pfmf_unpicklable = threading.Lock()  # pickle raises TypeError on it
        elif action == "kill":
            flow.pfmf_unpicklable = _KillWhenPickled()
        else:
            raise ValueError(f"PFMF_FAULT action {action!r} makes no sense at persist")
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise RuntimeError(f"fault injected at {point}")
    elif action == "hang":
        time.sleep(60)
    else:
        raise ValueError(f"unknown PFMF_FAULT action {action!r}")


def gate() -> None:
    """Wait at the test's gate, if it set one (``PFMF_GATE``)."""
    path = os.environ.get("PFMF_GATE")
    if not path:
        return
    with open(path + ".started", "w") as out:
        out.write(str(os.getpid()))
    deadline = time.monotonic() + float(os.environ.get("PFMF_GATE_WAIT", "120"))
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nobody opened the gate {path}")
        time.sleep(0.05)


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
        at("after_body", attempt=retry_count)


fault_point = partial(_base_step_decorator, FaultPointDecorator)
