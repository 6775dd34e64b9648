"""Fault matrix: every fault x phase ends with every escrow of the run settled, and the ledger
equal to what moved on the service.

Each cell runs ``tests/flows/fault_flow.py`` (one billable step, one escrow of 1.25 USDC) as
a subprocess against the HTTP sandbox of ``tests/faults.py``, injects one fault at one phase,
runs ``pf-metaflow reconcile`` once, and then requires:

- the ledger (``pf-metaflow ledger --json``) says ``released`` where the release took effect
  and ``refunded`` otherwise (``refund_pending`` on the live-like server, which has no refund
  call), never ``locked``; ``unknown`` only for a create whose outcome the live-like server
  cannot tell (no idempotency keys), and then reconcile's output says how to check; and the
  ledger says it saw every paid task of the run (``complete``);
- the sandbox holds exactly the escrows the ledger names (nothing lost), one per task at most
  (its attempts share it: nothing locked twice), in the matching state;
- the money: the sandbox's balance movements (what the payer is out of pocket and has locked,
  what the worker received, the house fees) equal, to the micro-USDC, what the ledger says
  moved (released amounts, fees including the commission a timeout refund keeps, net to
  agents), now and 25 hours later when every escrow still funded has come back by itself
  minus 1% (an ``unknown`` create counts as what the service holds under the description the
  ledger says to look for). The matrix's "paid" figure is read from those balances: what the
  payer is out of pocket once everything has settled.

Faults: ``refused`` (nothing listening), ``read_timeout`` (answer after the client's 10 s
timeout), ``http_500``, ``http_503`` / ``http_429`` (``Retry-After: 1``), ``malformed`` (an
HTML page instead of escrow JSON), ``sigkill`` (the task killed), ``timeout`` (``@timeout``
expiring), ``exception`` (raised by the step); in the second table also ``none`` (nothing but
the phase's own event).

Phases, first table: ``before_create`` (instead of the create), ``after_create`` (the create
took effect, its answer did not come back / the body has not started), ``during_body``,
``before_release`` (instead of the release), ``during_release`` (the release took effect, its
answer did not come back). A server fault ``during_body`` is an outage from the create's answer
until the task ended: the release and the refund both meet it.

Phases, second table:

- ``after_persist``: the release took effect, then the task fails while Metaflow persists its
  artifacts (the body left a ``threading.Lock``, or an artifact whose pickling SIGKILLs the
  task); ``after_persist_retry``: the same under ``--with retry:times=1`` (attempt 0 only), where
  attempt 1 runs the body again and must not pay again;
- ``reconcile_running``: the body waits at a gate (a file the test creates) while the test runs
  ``pf-metaflow reconcile``, which must exit 1 listing the task as possibly running and move
  nothing; then the gate opens and the task ends as the fault says;
- ``orchestrated``: the run is driven task by task as an orchestrator does (``init``, then
  ``step start --task-id 2``, ``step end --task-id 3``, an integer run id, retries as new
  ``--retry-count`` processes), tasks Metaflow's client does not list under local metadata;
  the ledger must still see every paid task and reconcile must not give a false all-clear.

Modes: ``idempotent`` (the sandbox as it is: refund call, ``Idempotency-Key``) and
``live_like`` (neither, like the live service).

The full matrix is ``@pytest.mark.slow`` (``pytest -m slow``); a few cells run by default.
The session ends by printing both tables (outcome and paid per cell) and ``cells passed: X/Y``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional, Union

import pytest
from faults import AFTER_CREATE, CREATE, FOREVER, READ_TIMEOUT, RELEASE, FaultServer, Rule
from mfrun import FlowRun, Workspace
from orchestrate import Orchestrator

from pf_metaflow.sandbox.engine import SandboxEngine

TESTFLOWS = Path(__file__).parent / "flows"
FAULT_FLOW = TESTFLOWS / "fault_flow.py"
FLOW_NAME = "FaultFlow"
PAYER, WORKER = "ag_sandbox_payer", "ag_sandbox_worker"
PAYER_KEY = "pf_sandbox_payer_key"  # the built-in payer's documented sandbox key
AMOUNT = Decimal("1.25")
CATCH = "catch:var=work_error,print_exception=False"
TIMEOUT = "timeout:seconds=2"
RETRY = "retry:times=1,minutes_between_retries=0"
# An outage of answers paced by Retry-After keeps each escrow call retrying this long (s).
PACED_MAX_WAIT = "10"
ORCHESTRATED_RUN_ID = "1729"  # an integer run id, as orchestrators may give (local metadata registers none)

# `pf-metaflow reconcile` exit codes (pf_metaflow/cli.py).
EXIT_SETTLED, EXIT_OPEN = 0, 1

FAULTS = ("refused", "read_timeout", "http_500", "http_503", "http_429", "malformed", "sigkill",
          "timeout", "exception")
PHASES = ("before_create", "after_create", "during_body", "before_release", "during_release")
NEW_FAULTS = ("none",) + FAULTS
NEW_PHASES = ("after_persist", "after_persist_retry", "reconcile_running", "orchestrated")
MODES = ("idempotent", "live_like")
TABLES = ((FAULTS, PHASES), (NEW_FAULTS, NEW_PHASES))

# What a cell must end with (after at most one reconcile).
RELEASED = "released"
REFUNDED = "refunded"  # refund_pending on the live-like server
NOTHING = "no escrow"
UNKNOWN_NONE = "unknown (no escrow was created)"  # live-like only: the create cannot be checked
UNKNOWN_ONE = "unknown (one escrow was created)"


@dataclass(frozen=True)
class Cell:
    how: str
    expect: tuple[str, str]  # (idempotent, live_like)
    rules: tuple[Rule, ...] = ()
    flow_fault: str = ""  # PFMF_FAULT for the flow: <kill|raise|hang>@<point>[#attempt][,...]
    fault_attempt: Optional[int] = None  # PFMF_FAULT_ATTEMPT: only this attempt meets flow_fault
    catch: bool = True
    timeout: bool = False  # run --with timeout:seconds=2
    retry: bool = False  # run --with retry:times=1,minutes_between_retries=0
    down_for_run: bool = False  # nothing listening while the flow runs
    down_for_reconcile: bool = False  # reconcile_running: nothing listening while reconcile runs
    run_ok: Optional[bool] = None  # the run (or orchestrated run) succeeds; default: under @catch
    says: tuple[str, ...] = ()  # the run's output says these
    settled_by: Any = None  # the ledger entry's settled_by, when the cell cares who settled
    env: tuple[tuple[str, str], ...] = ()  # more environment for the flow's tasks

    @property
    def succeeds(self) -> bool:
        return self.catch if self.run_ok is None else self.run_ok


@dataclass(frozen=True)
class NotApplicable:
    why: str


def both(outcome: str) -> tuple[str, str]:
    return outcome, outcome


def instead_of(request: str, answer: str, **kw) -> tuple[Rule, ...]:
    """The fault answers the first such request; the sandbox never sees it."""
    return (Rule((request,), answer, **kw),)


def after(request: str, answer: str, **kw) -> tuple[Rule, ...]:
    """The sandbox acts on the first such request; the fault replaces its answer."""
    return (Rule((request,), answer, acts=True, **kw),)


def outage(answer: str) -> tuple[Rule, ...]:
    """Every request after the create (release, refund, read-backs) meets the fault."""
    return (Rule(AFTER_CREATE, answer, times=None),)


# Reasons shared by several N/A cells of the second table.
_PERSIST_IS_THE_FAULT = NotApplicable(
    "the phase is itself a failure while Metaflow persists artifacts: its faults are exception "
    "(an artifact that cannot be pickled) and sigkill (killed while pickling)")
_PERSIST_NEEDS_NO_SERVICE = NotApplicable(
    "after the release is recorded no attempt of the task needs the service (the next attempt "
    "adopts the recorded release); the refused cell runs the phase with the service unreachable, "
    "and what an error answer looks like cannot matter where nothing waits for one")
_PERSIST_NO_TIMEOUT = NotApplicable(
    "@timeout's alarm is disarmed before artifacts persist (by @pf_escrow_step after the body, "
    "and by @timeout's own task_post_step): it cannot go off in this phase")
_RECONCILE_SENDS_NOTHING = NotApplicable(
    "reconcile sends no request for a task it skips (the refused cell runs it with the service "
    "unreachable); the task's own requests meeting these answers are the first table's cells")
_RECONCILE_NO_TIMEOUT = NotApplicable(
    "@timeout ends an attempt through task_exception as the exception cell does, and one short "
    "enough for the matrix goes off before reconcile (a process of its own) has run")
_ORCHESTRATED_SAME_PATH = NotApplicable(
    "this fault meets the same requests and hooks whoever starts the task (first table); the "
    "column is about reading and reconciling a run of integer task ids, for which a clean run "
    "(none), an unknown create (refused), an escrow left open (http_500), a dead task (sigkill) "
    "and a retried task (exception) suffice")


CELLS: dict[tuple[str, str], Union[Cell, NotApplicable]] = {
    # -- connection refused ---------------------------------------------------------------
    ("refused", "before_create"): Cell(
        "nothing listens while the task runs: the create is never sent", both(NOTHING),
        down_for_run=True),
    ("refused", "after_create"): Cell(
        "the service locks the funds, goes down before answering, is back 1.5 s later",
        (RELEASED, UNKNOWN_ONE), after(CREATE, "drop", stop_listening=1.5)),
    ("refused", "during_body"): Cell(
        "the service goes down once the create is answered, until the task ended",
        both(REFUNDED), after(CREATE, "as_is", stop_listening=FOREVER)),
    ("refused", "before_release"): Cell(
        "the service goes down once the create is answered, back 2 s later (body: 0.2 s)",
        both(RELEASED), after(CREATE, "as_is", stop_listening=2.0)),
    ("refused", "during_release"): Cell(
        "the service releases, goes down before answering, is back 1.5 s later",
        both(RELEASED), after(RELEASE, "drop", stop_listening=1.5)),
    # -- read timeout: the answer comes after the client's timeout ------------------------
    ("read_timeout", "before_create"): Cell(
        "the create is held past the client's timeout, then dropped unprocessed",
        (RELEASED, UNKNOWN_NONE), instead_of(CREATE, "drop", hold=READ_TIMEOUT)),
    ("read_timeout", "after_create"): Cell(
        "the service locks the funds; its answer comes after the client's timeout",
        (RELEASED, UNKNOWN_ONE), after(CREATE, "as_is", hold=READ_TIMEOUT)),
    ("read_timeout", "during_body"): NotApplicable(
        "an outage of 10 s read timeouts (the client's timeout is fixed) costs ~75 s a run; "
        "the other outages in this column take the same release-then-refund path"),
    ("read_timeout", "before_release"): Cell(
        "the release is held past the client's timeout, then dropped unprocessed",
        both(RELEASED), instead_of(RELEASE, "drop", hold=READ_TIMEOUT)),
    ("read_timeout", "during_release"): Cell(
        "the service releases; its answer comes after the client's timeout",
        both(RELEASED), after(RELEASE, "as_is", hold=READ_TIMEOUT)),
    # -- HTTP 500 --------------------------------------------------------------------------
    ("http_500", "before_create"): Cell(
        "the create is answered 500 unprocessed. A 5xx does not prove the service did nothing "
        "(debit_failed may follow the debit), so the create is re-sent with its Idempotency-Key "
        "where the server honours it, and on the live-like server it is unknown, not retried "
        "(DESIGN rule 4)", (RELEASED, UNKNOWN_NONE), instead_of(CREATE, "http_500")),
    ("http_500", "after_create"): Cell(
        "the service locks the funds, then answers 500: re-sent with the same key, the replay "
        "names the same escrow; unknown on the live-like server (one escrow exists)",
        (RELEASED, UNKNOWN_ONE), after(CREATE, "http_500")),
    ("http_500", "during_body"): Cell(
        "every request after the create is answered 500 until the task ended",
        both(REFUNDED), outage("http_500")),
    ("http_500", "before_release"): Cell(
        "the release is answered 500 unprocessed: the step fails", both(REFUNDED),
        instead_of(RELEASE, "http_500")),
    ("http_500", "during_release"): Cell(
        "the service releases, then answers 500", both(RELEASED), after(RELEASE, "http_500")),
    # -- HTTP 503 with Retry-After ---------------------------------------------------------
    ("http_503", "before_create"): Cell(
        "the create is answered 503 Retry-After: 1 unprocessed. A 503 (a proxy's too) does not "
        "prove the service did nothing: re-sent with its Idempotency-Key where honoured, unknown "
        "(not retried) on the live-like server", (RELEASED, UNKNOWN_NONE),
        instead_of(CREATE, "http_503")),
    ("http_503", "after_create"): Cell(
        "the service locks the funds behind a proxy that answers 503 Retry-After: 1: re-sent "
        "with the same key, the replay names the same escrow; unknown on the live-like server",
        (RELEASED, UNKNOWN_ONE), after(CREATE, "http_503")),
    ("http_503", "during_body"): Cell(
        "every request after the create is answered 503 Retry-After: 1 until the task ended "
        f"(PF_ESCROW_MAX_WAIT={PACED_MAX_WAIT}: each call is paced by Retry-After for up to 50 "
        "requests otherwise, ~200 s a cell)",
        both(REFUNDED), outage("http_503"), env=(("PF_ESCROW_MAX_WAIT", PACED_MAX_WAIT),)),
    ("http_503", "before_release"): Cell(
        "the release is answered 503 Retry-After: 1 unprocessed", both(RELEASED),
        instead_of(RELEASE, "http_503")),
    ("http_503", "during_release"): Cell(
        "the service releases, then answers 503 Retry-After: 1 (the retry meets 409)",
        both(RELEASED), after(RELEASE, "http_503")),
    # -- HTTP 429 rate limiting ------------------------------------------------------------
    ("http_429", "before_create"): Cell(
        "the create is answered 429 Retry-After: 1: the rate limiter refused it before the "
        "handler ran, so it is retried even without a key", both(RELEASED),
        instead_of(CREATE, "http_429")),
    ("http_429", "after_create"): NotApplicable(
        "429 is the rate limiter's answer before any handler runs: it proves the create was not "
        "processed (so the client retries it without a key), and locking funds and answering 429 "
        "breaks the wire contract"),
    ("http_429", "during_body"): Cell(
        "every request after the create is answered 429 Retry-After: 1 until the task ended "
        f"(PF_ESCROW_MAX_WAIT={PACED_MAX_WAIT}, as for http_503)",
        both(REFUNDED), outage("http_429"), env=(("PF_ESCROW_MAX_WAIT", PACED_MAX_WAIT),)),
    ("http_429", "before_release"): Cell(
        "the release is answered 429 Retry-After: 1", both(RELEASED),
        instead_of(RELEASE, "http_429")),
    ("http_429", "during_release"): Cell(
        "the service releases, then answers 429 Retry-After: 1 (the retry meets 409)",
        both(RELEASED), after(RELEASE, "http_429")),
    # -- malformed body: an HTML page where escrow JSON belongs ----------------------------
    ("malformed", "before_create"): Cell(
        "a 200 HTML page answers the create unprocessed (a captive portal): it may hide a yes, "
        "so the create is re-sent with its Idempotency-Key where honoured; unknown on the "
        "live-like server", (RELEASED, UNKNOWN_NONE), instead_of(CREATE, "malformed")),
    ("malformed", "after_create"): Cell(
        "the service locks the funds; its 201 answer is an HTML page: re-sent with the same key, "
        "the replay names the same escrow; unknown on the live-like server",
        (RELEASED, UNKNOWN_ONE), after(CREATE, "malformed")),
    ("malformed", "during_body"): Cell(
        "every request after the create is answered with a 200 HTML page until the task ended",
        both(REFUNDED), outage("malformed")),
    ("malformed", "before_release"): Cell(
        "a 200 HTML page answers the release unprocessed: the step fails", both(REFUNDED),
        instead_of(RELEASE, "malformed")),
    ("malformed", "during_release"): Cell(
        "the service releases; its 200 answer is an HTML page", both(RELEASED),
        after(RELEASE, "malformed")),
    # -- the task killed with SIGKILL (no @catch: reconcile settles) -----------------------
    ("sigkill", "before_create"): Cell(
        "the task is killed while its create is in flight (the service never processes it)",
        (REFUNDED, UNKNOWN_NONE), instead_of(CREATE, "drop", kill_task=True), catch=False),
    ("sigkill", "after_create"): Cell(
        "the task is killed on the first line of the body", both(REFUNDED),
        flow_fault="kill@body_start", catch=False),
    ("sigkill", "during_body"): Cell(
        "the task is killed mid-body", both(REFUNDED), flow_fault="kill@mid_body", catch=False),
    ("sigkill", "before_release"): Cell(
        "the task is killed by a decorator hook after the body, before the release",
        both(REFUNDED), flow_fault="kill@after_body", catch=False),
    ("sigkill", "during_release"): Cell(
        "the service releases, and the task is killed before the answer reaches it",
        both(RELEASED), after(RELEASE, "as_is", kill_task=True), catch=False),
    # -- @timeout expiring ----------------------------------------------------------------
    ("timeout", "before_create"): Cell(
        "@timeout(2 s) goes off while the create is in flight (the service locks the funds "
        "and answers after 3 s)",
        (REFUNDED, UNKNOWN_ONE), after(CREATE, "as_is", hold=3.0), timeout=True),
    ("timeout", "after_create"): Cell(
        "the body hangs on its first line until @timeout(2 s) goes off", both(REFUNDED),
        flow_fault="hang@body_start", timeout=True),
    ("timeout", "during_body"): Cell(
        "the body hangs mid-way until @timeout(2 s) goes off", both(REFUNDED),
        flow_fault="hang@mid_body", timeout=True),
    ("timeout", "before_release"): Cell(
        "a decorator hook after the body hangs until @timeout(2 s) goes off", both(REFUNDED),
        flow_fault="hang@after_body", timeout=True),
    ("timeout", "during_release"): Cell(
        "the release is held 3 s, past @timeout(2 s): its alarm must not cut the release",
        both(RELEASED), after(RELEASE, "as_is", hold=3.0), timeout=True),
    # -- an exception in the step ---------------------------------------------------------
    ("exception", "before_create"): NotApplicable("the step body runs only after the create"),
    ("exception", "after_create"): Cell(
        "the body raises on its first line", both(REFUNDED), flow_fault="raise@body_start"),
    ("exception", "during_body"): Cell(
        "the body raises mid-way", both(REFUNDED), flow_fault="raise@mid_body"),
    ("exception", "before_release"): Cell(
        "a decorator hook after the body raises", both(REFUNDED), flow_fault="raise@after_body"),
    ("exception", "during_release"): NotApplicable(
        "no user code runs while the release is in flight"),

    # ===================================================================== second table
    # -- after release, before artifacts persist (@catch, no retry) -----------------------
    ("none", "after_persist"): _PERSIST_IS_THE_FAULT,
    ("refused", "after_persist"): Cell(
        "the release took effect, the service then stops listening for good, and Metaflow fails "
        "the task persisting a threading.Lock artifact: @catch's fallback attempt runs with the "
        "service unreachable and must neither refund nor pay again", both(RELEASED),
        after(RELEASE, "as_is", stop_listening=FOREVER), flow_fault="raise@persist", settled_by=0),
    ("read_timeout", "after_persist"): _PERSIST_NEEDS_NO_SERVICE,
    ("http_500", "after_persist"): _PERSIST_NEEDS_NO_SERVICE,
    ("http_503", "after_persist"): _PERSIST_NEEDS_NO_SERVICE,
    ("http_429", "after_persist"): _PERSIST_NEEDS_NO_SERVICE,
    ("malformed", "after_persist"): _PERSIST_NEEDS_NO_SERVICE,
    ("sigkill", "after_persist"): Cell(
        "the release took effect, then the task is SIGKILLed while Metaflow pickles its "
        "artifacts (no @catch): reconcile finds the escrow released and has nothing to do",
        both(RELEASED), flow_fault="kill@persist", catch=False, settled_by=0),
    ("timeout", "after_persist"): _PERSIST_NO_TIMEOUT,
    ("exception", "after_persist"): Cell(
        "the release took effect, then Metaflow fails the task persisting a threading.Lock "
        "artifact: @catch's fallback attempt must not refund what was paid, nor pay again",
        both(RELEASED), flow_fault="raise@persist", settled_by=0),
    # -- the same under --with retry:times=1 (the fault in attempt 0 only) ----------------
    ("none", "after_persist_retry"): _PERSIST_IS_THE_FAULT,
    ("refused", "after_persist_retry"): Cell(
        "attempt 0 is paid, the service then stops listening for good, and Metaflow fails attempt "
        "0 persisting a threading.Lock: @retry's attempt 1 runs the body again, unpaid, with the "
        "service unreachable", both(RELEASED),
        after(RELEASE, "as_is", stop_listening=FOREVER), flow_fault="raise@persist",
        fault_attempt=0, retry=True, says=("runs unpaid",), settled_by=0),
    ("read_timeout", "after_persist_retry"): _PERSIST_NEEDS_NO_SERVICE,
    ("http_500", "after_persist_retry"): _PERSIST_NEEDS_NO_SERVICE,
    ("http_503", "after_persist_retry"): _PERSIST_NEEDS_NO_SERVICE,
    ("http_429", "after_persist_retry"): _PERSIST_NEEDS_NO_SERVICE,
    ("malformed", "after_persist_retry"): _PERSIST_NEEDS_NO_SERVICE,
    ("sigkill", "after_persist_retry"): Cell(
        "attempt 0 is paid, then SIGKILLed while Metaflow pickles its artifacts: @retry's attempt "
        "1 runs the body again, unpaid (no @catch; the run succeeds)", both(RELEASED),
        flow_fault="kill@persist", fault_attempt=0, catch=False, retry=True, run_ok=True,
        says=("runs unpaid",), settled_by=0),
    ("timeout", "after_persist_retry"): _PERSIST_NO_TIMEOUT,
    ("exception", "after_persist_retry"): Cell(
        "issue 9 case 1: attempt 0 is paid, then Metaflow fails it persisting a threading.Lock; "
        "@retry's attempt 1 runs the body again, unpaid (it used to lock and release a second "
        "escrow: paid twice)", both(RELEASED), flow_fault="raise@persist", fault_attempt=0,
        retry=True, says=("runs unpaid",), settled_by=0),
    # -- reconcile while the task runs (the body waits at a gate) -------------------------
    ("none", "reconcile_running"): Cell(
        "the body waits at a gate while `pf-metaflow reconcile` runs: reconcile skips the task "
        "(exit 1, listed as possibly running) and moves nothing; the gate opens, the task is paid",
        both(RELEASED), settled_by=0),
    ("refused", "reconcile_running"): Cell(
        "as none, with the service unreachable while reconcile runs: skipping a running task "
        "needs no service", both(RELEASED), down_for_reconcile=True, settled_by=0),
    ("read_timeout", "reconcile_running"): _RECONCILE_SENDS_NOTHING,
    ("http_500", "reconcile_running"): _RECONCILE_SENDS_NOTHING,
    ("http_503", "reconcile_running"): _RECONCILE_SENDS_NOTHING,
    ("http_429", "reconcile_running"): _RECONCILE_SENDS_NOTHING,
    ("malformed", "reconcile_running"): _RECONCILE_SENDS_NOTHING,
    ("sigkill", "reconcile_running"): Cell(
        "attempt 0 raises on its first line and @retry holds its escrow; attempt 1 waits at the "
        "gate while reconcile runs (skipped), then is SIGKILLed mid-body (no @catch): its lease "
        "ends with its process, so the reconcile after the run refunds at once and says all is "
        "settled", both(REFUNDED), flow_fault="raise@body_start#0,kill@mid_body#1", catch=False,
        retry=True, settled_by="reconcile"),
    ("timeout", "reconcile_running"): _RECONCILE_NO_TIMEOUT,
    ("exception", "reconcile_running"): Cell(
        "attempt 0 raises on its first line and @retry holds its escrow; attempt 1 waits at the "
        "gate while reconcile runs (skipped: attempt 1 holds the lease), then pays from the same "
        "escrow", both(RELEASED), flow_fault="raise@body_start", fault_attempt=0, retry=True,
        says=("pays from escrow",), settled_by=1),
    # -- orchestrator-style task ids ------------------------------------------------------
    ("none", "orchestrated"): Cell(
        "an orchestrator runs start and end as tasks 2 and 3 of run 1729, which Metaflow's client "
        "does not list: the ledger still finds the release and says it saw every paid task",
        both(RELEASED), settled_by=0),
    ("refused", "orchestrated"): Cell(
        "under integer task ids, the service locks the funds, goes down before answering, is back "
        "1.5 s later: on the live-like server reconcile must report the unknown create (exit 1, "
        "how to check), never an all-clear", (RELEASED, UNKNOWN_ONE),
        after(CREATE, "drop", stop_listening=1.5)),
    ("read_timeout", "orchestrated"): NotApplicable(
        "a lost create answer under integer task ids is the refused cell; a 10 s timeout adds "
        "time, not a path"),
    ("http_500", "orchestrated"): Cell(
        "under integer task ids, every request after the create is answered 500 until the task "
        "ended (and @catch's fallback attempt, started by the orchestrator): the escrow is left "
        "open, and reconcile must find the task and refund it", both(REFUNDED), outage("http_500"),
        settled_by="reconcile"),
    ("http_503", "orchestrated"): _ORCHESTRATED_SAME_PATH,
    ("http_429", "orchestrated"): _ORCHESTRATED_SAME_PATH,
    ("malformed", "orchestrated"): _ORCHESTRATED_SAME_PATH,
    ("sigkill", "orchestrated"): Cell(
        "issue 9 case 4: under integer task ids the task is SIGKILLed mid-body and the "
        "orchestrator stops there: reconcile must find the locked escrow and refund it, never "
        "say 'nothing to do'", both(REFUNDED), flow_fault="kill@mid_body", catch=False,
        settled_by="reconcile"),
    ("timeout", "orchestrated"): _ORCHESTRATED_SAME_PATH,
    ("exception", "orchestrated"): Cell(
        "under integer task ids, attempt 0 raises mid-body and the orchestrator starts the task "
        "again with --retry-count 1 (--with retry): attempt 1 pays from the same escrow",
        both(RELEASED), flow_fault="raise@mid_body", fault_attempt=0, retry=True,
        says=("pays from escrow",), settled_by=1),
}

# The cells the default (fast) `pytest` runs; the rest is `pytest -m slow`.
FAST = {
    ("http_503", "before_create", "idempotent"),
    ("malformed", "after_create", "idempotent"),
    ("http_500", "during_release", "live_like"),
    ("sigkill", "before_create", "live_like"),
    ("sigkill", "during_body", "live_like"),
    ("exception", "after_persist_retry", "idempotent"),
    ("none", "reconcile_running", "live_like"),
    ("sigkill", "orchestrated", "idempotent"),
}


def _params():
    for faults, phases in TABLES:
        for fault in faults:
            for phase in phases:
                for mode in MODES:
                    marks = () if (fault, phase, mode) in FAST else (pytest.mark.slow,)
                    yield pytest.param(fault, phase, mode, id=f"{fault}-{phase}-{mode}", marks=marks)


def test_every_cell_is_decided():
    """Each fault x phase of both tables is a cell or says why it is not applicable."""
    wanted = {(f, p) for faults, phases in TABLES for f in faults for p in phases}
    assert set(CELLS) == wanted
    assert {(f, p) for f, p, _ in FAST} <= wanted


# --------------------------------------------------------------------------- the cells


@pytest.fixture
def server_for(tmp_path: Path):
    servers = []

    def start(mode: str) -> FaultServer:
        on = mode == "idempotent"
        server = FaultServer(tmp_path / "server" / "escrow.db", idempotency=on, refunds=on,
                             pid_file=tmp_path / "task.pid")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize(("fault", "phase", "mode"), list(_params()))
def test_cell(fault: str, phase: str, mode: str, tmp_path: Path, server_for, request):
    cell = CELLS[fault, phase]
    if isinstance(cell, NotApplicable):
        pytest.skip(f"N/A: {cell.why}")
    expected = cell.expect[MODES.index(mode)]
    server = server_for(mode)
    (tmp_path / "ws").mkdir()
    ws = Workspace(tmp_path / "ws")
    env = {"PF_ESCROW_URL": server.url, "PF_API_KEY": PAYER_KEY}
    flow_env = {**env, "PFMF_FAULT": cell.flow_fault, "PFMF_PID_FILE": str(tmp_path / "task.pid")}
    if cell.fault_attempt is not None:
        flow_env["PFMF_FAULT_ATTEMPT"] = str(cell.fault_attempt)
    flow_env.update(dict(cell.env))
    options = [*(("--with", CATCH) if cell.catch else ()), *(("--with", TIMEOUT) if cell.timeout else ()),
               *(("--with", RETRY) if cell.retry else ())]

    server.injector.add(*(dataclasses.replace(rule) for rule in cell.rules))
    if cell.down_for_run:
        server.stop_listening()
    during = ""
    if phase == "reconcile_running":
        run, during = run_reconciling_while_it_runs(ws, server, cell, options, flow_env, env, tmp_path)
    elif phase == "orchestrated":
        run = run_orchestrated(ws, cell, flow_env)
    else:
        run = ws.run_flow(FAULT_FLOW, *options, env=flow_env)
    server.injector.clear()
    server.listen()
    context = (f"{cell.how}\nrequests: {server.injector.log}\n{during}"
               f"--- run output:\n{run.output[-6000:]}")
    if cell.succeeds:
        assert run.returncode == 0, f"the run should succeed (@catch / @retry)\n{context}"
    else:
        assert run.returncode != 0, f"the killed task should fail the run\n{context}"
    for words in cell.says:
        assert words in run.output, f"the run should say {words!r}\n{context}"

    reconcile = ws.cli("reconcile", run.pathspec, env=env)
    context += f"\n--- reconcile:\n{reconcile.stdout}{reconcile.stderr}"
    still_open = expected in (UNKNOWN_NONE, UNKNOWN_ONE)
    assert reconcile.returncode == (EXIT_OPEN if still_open else EXIT_SETTLED), context
    ledger = ws.cli_json("ledger", run.pathspec, env=env)
    entries = ledger["entries"]
    context += (f"\n--- ledger (complete: {ledger.get('complete')}, unseen: {ledger.get('unseen')}): "
                f"{[(e['escrow_id'], e['status'], e.get('settled_by'), e['reason']) for e in entries]}")
    assert ledger.get("complete") is True, f"the ledger must see every paid task\n{context}"

    assert_settled(entries, expected, mode, server.engine, reconcile.stdout, context)
    if cell.settled_by is not None and entries:
        assert entries[0].get("settled_by") == cell.settled_by, context
    paid = assert_ledger_equals_service(server.engine.path, ledger, context)
    request.node.user_properties.append(("paid", paid))


def run_reconciling_while_it_runs(ws: Workspace, server: FaultServer, cell: Cell, options: list,
                                  flow_env: dict, env: dict, tmp_path: Path) -> tuple[FlowRun, str]:
    """Start the run; once the body waits at the gate (its escrow locked), run reconcile and
    require it to leave the task alone; then open the gate and let the run finish."""
    gate = tmp_path / "gate"
    run_id_file = ws.path / ".run-id-background"
    out, err = tmp_path / "run.stdout", tmp_path / "run.stderr"
    cmd = [sys.executable, str(FAULT_FLOW), "--no-pylint", "run", "--run-id-file", str(run_id_file),
           *options]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ws.path, env={**ws.env, **flow_env, "PFMF_GATE": str(gate)},
                                stdout=stdout, stderr=stderr, text=True, start_new_session=True)
    try:
        started = Path(str(gate) + ".started")
        deadline = time.monotonic() + 180
        while not started.exists():
            assert proc.poll() is None, f"the run ended before its body reached the gate:\n{out.read_text()}"
            assert time.monotonic() < deadline, f"the body never reached the gate:\n{out.read_text()}"
            time.sleep(0.1)
        pathspec = f"{FLOW_NAME}/{run_id_file.read_text().strip()}"
        escrows_before, balances_before = server.engine.list_escrows(), server.engine.balances()
        if cell.down_for_reconcile:
            server.stop_listening()
        reconcile = ws.cli("reconcile", pathspec, env=env)
        server.listen()
        said = f"--- reconcile while the task runs (exit {reconcile.returncode}):\n" \
               f"{reconcile.stdout}{reconcile.stderr}"
        escrows_after, balances_after = server.engine.list_escrows(), server.engine.balances()
        assert proc.poll() is None, f"the task should still be waiting at the gate\n{said}"
        assert [e["status"] for e in escrows_before] == ["funded"], f"{escrows_before}\n{said}"
        assert (escrows_after, balances_after) == (escrows_before, balances_before), (
            f"reconcile moved money of a running task\n{said}")
        assert reconcile.returncode == EXIT_OPEN, said
        skipped = [line for line in reconcile.stdout.splitlines()
                   if "skipped, its task may still be running" in line and "start/" in line]
        assert skipped and escrows_before[0]["escrow_id"] in skipped[0], said
        assert "nothing to do" not in reconcile.stdout and "is settled" not in reconcile.stdout, said
    finally:
        gate.touch()
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this test started
            proc.wait()
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else None
    return FlowRun(proc.returncode, out.read_text(), err.read_text(), run_id, FLOW_NAME), said + "\n"


def run_orchestrated(ws: Workspace, cell: Cell, flow_env: dict):
    decospecs = [*((CATCH,) if cell.catch else ()), *((TIMEOUT,) if cell.timeout else ()),
                 *((RETRY,) if cell.retry else ())]
    orchestrator = Orchestrator(ws, FAULT_FLOW, FLOW_NAME, ORCHESTRATED_RUN_ID, decospecs=decospecs,
                                env=flow_env)
    run = orchestrator.linear(["start", "end"], user_retries=1 if cell.retry else 0,
                              fallback_retries=1 if cell.catch else 0)
    # The tasks are invisible to Metaflow's client listing: what the ledger finds, it found
    # without it (an integer run id is not even registered).
    meta = ws.path / ".metaflow" / FLOW_NAME / ORCHESTRATED_RUN_ID / "start" / "2" / "_meta"
    assert meta.is_dir() and not (meta / "_self.json").exists(), run.output
    return run


def assert_settled(entries: list, expected: str, mode: str, engine: SandboxEngine,
                   reconcile_output: str, context: str) -> None:
    escrows = engine.list_escrows()
    found = [(e["escrow_id"], e["status"], e["description"]) for e in escrows]
    context += f"\n--- sandbox escrows: {found}"
    if expected == NOTHING:
        # No escrow behind it: the task is on the ledger as unpaid work (the service refused the
        # create), or not at all (the service could not even be asked: the step failed first).
        assert [(e["status"], e["escrow_id"]) for e in entries] in ([], [("not_created", None)]), context
        assert escrows == [], context
        return
    assert len(entries) == 1, context
    [entry] = entries
    if expected in (UNKNOWN_NONE, UNKNOWN_ONE):
        assert mode == "live_like", "only a server without idempotency keys leaves a create unknown"
        assert (entry["status"], entry["escrow_id"]) == ("unknown", None), context
        # The escrow, if the create took effect, is the one its description names...
        created = 1 if expected == UNKNOWN_ONE else 0
        assert [e["description"] for e in escrows] == [entry["description"]] * created, context
        assert all(e["status"] == "funded" for e in escrows), context
        # ...and reconcile says how to look for it.
        assert "check it with" in reconcile_output and entry["description"] in reconcile_output, (
            context)
        return
    # Exactly the escrow the ledger names exists: nothing lost, nothing locked twice.
    assert [e["escrow_id"] for e in escrows] == [entry["escrow_id"]], context
    [escrow] = escrows
    assert escrow["description"] == entry["description"], context
    if expected == RELEASED:
        assert (entry["status"], escrow["status"]) == ("released", "released"), context
    elif mode == "idempotent":
        assert (entry["status"], escrow["status"]) == ("refunded", "refunded"), context
    else:  # no refund call: the escrow comes back by itself at its timeout, less 1%
        assert (entry["status"], escrow["status"]) == ("refund_pending", "funded"), context
        assert entry["expected_at"] == escrow["auto_release_at"], context


# --------------------------------------------------------------------------- the money


@dataclass(frozen=True)
class Moved:
    """Money moved by a run, from the payer's point of view and the receivers'."""

    payer_spent: Decimal  # gone from the payer for good
    payer_locked: Decimal  # held in escrows the payer created
    worker_received: Decimal
    house_fees: Decimal


def moved_on_service(balances: dict) -> Moved:
    """Read from the sandbox's balances (each cell's sandbox starts empty; only the payer is
    minted, on its first create)."""
    agents = balances["agents"]
    assert set(agents) <= {PAYER, WORKER}, agents
    zero = {"usdc": Decimal(0), "locked": Decimal(0)}
    payer, worker = agents.get(PAYER, zero), agents.get(WORKER, zero)
    assert worker["locked"] == 0
    return Moved(balances["minted"] - payer["usdc"] - payer["locked"], payer["locked"], worker["usdc"],
                 balances["house_fees"])


def moved_per_ledger(ledger: dict, unknown_found: list[dict], *, settled: bool) -> Moved:
    """What the ledger says moved: now, or (``settled``) once every escrow still held has come
    back by itself less the commission the ledger records for it.

    ``unknown_found``: the escrows the service holds under the description of an ``unknown``
    entry (the ledger says to look for them there; it cannot know their fate by itself).
    """
    def d(value: Any) -> Decimal:
        return Decimal(value or "0")

    entries = ledger["entries"]
    totals = {k: d(v) for k, v in ledger["totals"].items()}
    by = {s: [e for e in entries if e["status"] == s] for s in
          ("released", "refunded", "refund_pending", "locked", "unknown")}
    assert sum(len(v) for v in by.values()) == len(entries), entries
    # The ledger's totals are its entries' sums.
    assert totals["released"] == sum((d(e["amount_usdc"]) for e in by["released"]), Decimal(0))
    assert totals["fees"] == sum((d(e["fee_usdc"]) for e in entries), Decimal(0))
    assert totals["net_paid"] == sum((d(e["net_usdc"]) for e in entries), Decimal(0))
    released_fees = sum((d(e["fee_usdc"]) for e in by["released"]), Decimal(0))
    referrals = sum((d(e.get("referral_usdc")) for e in by["released"]), Decimal(0))
    kept_by_refunds = sum((d(e["fee_usdc"]) for e in by["refunded"]), Decimal(0))  # timeout refunds
    held = sum((d(e["amount_usdc"]) for e in by["locked"] + by["refund_pending"]), Decimal(0))
    if not settled:
        return Moved(
            payer_spent=totals["released"] + kept_by_refunds,
            payer_locked=held + sum((e["amount_usd"] for e in unknown_found), Decimal(0)),
            worker_received=totals["net_paid"],
            house_fees=released_fees - referrals + kept_by_refunds,
        )
    assert not by["locked"], "a cell ends with nothing locked"
    # Every fee the ledger records is paid by the payer: release commissions, and the
    # commission kept by a timeout refund (done or pending); plus what an unknown create cost.
    unknown_cost = sum((e["commission_usd"] for e in unknown_found), Decimal(0))
    return Moved(
        payer_spent=totals["released"] + totals["fees"] - released_fees + unknown_cost,
        payer_locked=Decimal(0),
        worker_received=totals["net_paid"],
        house_fees=totals["fees"] - referrals + unknown_cost,
    )


def assert_ledger_equals_service(db: Path, ledger: dict, context: str) -> str:
    """The ledger equals the service's balance movements to the micro-USDC, now and once every
    escrow has settled (25 hours on); returns what the payer paid in the end, read from the
    service's balances."""
    now = SandboxEngine(db)
    now.check_invariant()
    unknown = {e["description"] for e in ledger["entries"] if e["status"] == "unknown"}
    found = [e for e in now.list_escrows() if e["description"] in unknown]
    service, per_ledger = moved_on_service(now.balances()), moved_per_ledger(ledger, found, settled=False)
    now.close()
    assert service == per_ledger, f"now: service {service} != ledger {per_ledger}\n{context}"

    # 25 hours on, every escrow still funded has gone back to the payer minus the 1%.
    later = SandboxEngine(db, clock=lambda: time.time() + 25 * 3600)
    later.expire_due()
    later.check_invariant()
    assert {e["status"] for e in later.list_escrows()} <= {"released", "refunded"}, context
    found_later = [e for e in later.list_escrows() if e["description"] in unknown]
    service = moved_on_service(later.balances())
    later.close()
    per_ledger = moved_per_ledger(ledger, found_later, settled=True)
    assert service == per_ledger, f"25 h on: service {service} != ledger {per_ledger}\n{context}"
    # Paid at most once: never more than the task's one escrow.
    assert service.payer_spent <= AMOUNT and service.worker_received < AMOUNT, context
    return _usdc(service.payer_spent)


def _usdc(amount: Decimal) -> str:
    text = format(amount.normalize(), "f")
    return "0" if amount == 0 else text


# --------------------------------------------------------------------------- the printed matrix


class MatrixReport:
    """Collects each cell's outcome (and paid figure) and prints both tables at the end."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str, str], str] = {}

    def pytest_runtest_logreport(self, report) -> None:
        if "test_cell[" not in report.nodeid:
            return
        key = tuple(report.nodeid.rsplit("[", 1)[1].rstrip("]").split("-"))
        if report.skipped:
            self.outcomes[key] = "N/A"
        elif report.failed:
            self.outcomes[key] = "FAIL"
        elif report.when == "call":
            paid = dict(report.user_properties).get("paid")
            self.outcomes.setdefault(key, "pass" + (f" {paid}" if paid is not None else ""))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for line in self.lines():
            terminalreporter.write_line(line)

    def _table(self, faults: tuple[str, ...], phases: tuple[str, ...]) -> list[str]:
        widths = [max(len(p), len("FAIL 0.0125")) + 2 for p in phases]
        out = [(f"{'fault':<14}{'mode':<12}" + "".join(f"{p:<{w}}" for p, w in zip(phases, widths))).rstrip()]
        for fault in faults:
            for n, mode in enumerate(MODES):
                row = f"{fault if n == 0 else '':<14}{mode:<12}"
                for phase, width in zip(phases, widths):
                    row += f"{self.outcomes.get((fault, phase, mode), '-'):<{width}}"
                out.append(row.rstrip())
        return out

    def lines(self) -> list[str]:
        out = ["", "Fault matrix: each cell is its outcome and 'paid', the USDC the payer is out of "
                   "pocket once every escrow has settled",
               "(read from the sandbox's balances 25 h on: 1.25 released once, 0.0125 the 1% a "
               "timeout keeps, 0 refunded; the ledger equals them to the micro-USDC)", ""]
        out += self._table(FAULTS, PHASES)
        out += ["", "New phases: after release before artifacts persist (without / with @retry), "
                    "reconcile while the task runs, orchestrator-style task ids", ""]
        out += self._table(NEW_FAULTS, NEW_PHASES)
        ran = [o for o in self.outcomes.values() if o != "N/A"]
        not_applicable = sum(1 for o in self.outcomes.values() if o == "N/A")
        total = sum(len(f) * len(p) for f, p in TABLES) * len(MODES)
        passed = sum(1 for o in ran if o.startswith("pass"))
        out.append(f"cells passed: {passed}/{len(ran)} (N/A: {not_applicable}, "
                   f"not run: {total - len(ran) - not_applicable} of {total})")
        seen: set[str] = set()
        for (fault, phase), cell in CELLS.items():
            if isinstance(cell, NotApplicable) and (fault, phase, MODES[0]) in self.outcomes:
                out.append(f"  N/A {fault} x {phase}: {cell.why if cell.why not in seen else '(as above)'}")
                seen.add(cell.why)
        return out

# tests/conftest.py registers the report (pytest_configure): in the process that prints the
# summary, which under ``pytest -n`` is the controller, not a worker running the cells.
