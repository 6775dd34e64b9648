"""Fault matrix: every fault x phase ends with every escrow of the run settled.

Each cell runs ``tests/flows/fault_flow.py`` (one billable step, one escrow of 1.25 USDC) as
a subprocess against the HTTP sandbox of ``tests/faults.py``, injects one fault at one phase,
runs ``pf-metaflow reconcile`` once, and then requires:

- the ledger (``pf-metaflow ledger --json``) says ``released`` where the release took effect
  and ``refunded`` otherwise (``refund_pending`` on the live-like server, which has no refund
  call), never ``locked``; ``unknown`` only for a create whose outcome the live-like server
  cannot tell (no idempotency keys), and then reconcile's output says how to check;
- the sandbox holds exactly the escrows the ledger names (nothing lost), one per task
  attempt at most (nothing locked twice), in the matching state;
- the conservation invariant holds now, and 25 hours later, when every escrow still funded
  has come back by itself minus 1%, the payer has paid exactly what the ledger says.

Faults: ``refused`` (nothing listening), ``read_timeout`` (answer after the client's 10 s
timeout), ``http_500``, ``http_503`` / ``http_429`` (``Retry-After: 1``), ``malformed`` (an
HTML page instead of escrow JSON), ``sigkill`` (the task killed), ``timeout`` (``@timeout``
expiring), ``exception`` (raised by the step).

Phases: ``before_create`` (instead of the create), ``after_create`` (the create took effect,
its answer did not come back / the body has not started), ``during_body``, ``before_release``
(instead of the release), ``during_release`` (the release took effect, its answer did not come
back). A server fault ``during_body`` is an outage from the create's answer until the task
ended: the release and the refund both meet it.

Modes: ``idempotent`` (the sandbox as it is: refund call, ``Idempotency-Key``) and
``live_like`` (neither, like the live service).

The full matrix is ``@pytest.mark.slow`` (``pytest -m slow``); a few cells run by default.
The session ends by printing the matrix and ``cells passed: X/Y``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Union

import pytest
from faults import AFTER_CREATE, CREATE, FOREVER, READ_TIMEOUT, RELEASE, FaultServer, Rule
from mfrun import Workspace

from pf_metaflow.money import fee_for
from pf_metaflow.sandbox.engine import SandboxEngine

TESTFLOWS = Path(__file__).parent / "flows"
PAYER, WORKER = "ag_sandbox_payer", "ag_sandbox_worker"
PAYER_KEY = "pf_sandbox_payer_key"  # the built-in payer's documented sandbox key
AMOUNT = Decimal("1.25")
CATCH = "catch:var=work_error,print_exception=False"
TIMEOUT = "timeout:seconds=2"

FAULTS = ("refused", "read_timeout", "http_500", "http_503", "http_429", "malformed", "sigkill",
          "timeout", "exception")
PHASES = ("before_create", "after_create", "during_body", "before_release", "during_release")
MODES = ("idempotent", "live_like")

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
    flow_fault: str = ""  # PFMF_FAULT for the flow: <kill|raise|hang>@<point>
    catch: bool = True
    timeout: bool = False  # run --with timeout:seconds=2
    down_for_run: bool = False  # nothing listening while the flow runs


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
        "the create is answered 500 unprocessed: a 5xx may hide a create that took effect, so it is "
        "retried only with an Idempotency-Key; live-like: unknown (rule 4)",
        (RELEASED, UNKNOWN_NONE), instead_of(CREATE, "http_500")),
    ("http_500", "after_create"): NotApplicable(
        "500 is the service's own 'no' (never retried): locking funds and answering 500 "
        "breaks the wire contract; lost create answers are the refused/timeout/malformed cells"),
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
        "the create is answered 503 Retry-After: 1 unprocessed: retried with the key; live-like: "
        "unknown (a 5xx is not a provable no)", (RELEASED, UNKNOWN_NONE),
        instead_of(CREATE, "http_503")),
    ("http_503", "after_create"): NotApplicable(
        "503 says the create was not processed, so the client may retry it without a key: "
        "locking funds and answering 503 breaks the wire contract"),
    ("http_503", "during_body"): Cell(
        "every request after the create is answered 503 Retry-After: 1 until the task ended",
        both(REFUNDED), outage("http_503")),
    ("http_503", "before_release"): Cell(
        "the release is answered 503 Retry-After: 1 unprocessed", both(RELEASED),
        instead_of(RELEASE, "http_503")),
    ("http_503", "during_release"): Cell(
        "the service releases, then answers 503 Retry-After: 1 (the retry meets 409)",
        both(RELEASED), after(RELEASE, "http_503")),
    # -- HTTP 429 rate limiting ------------------------------------------------------------
    ("http_429", "before_create"): Cell(
        "the create is answered 429 Retry-After: 1", both(RELEASED),
        instead_of(CREATE, "http_429")),
    ("http_429", "after_create"): NotApplicable(
        "429 says the create was not processed, so the client may retry it without a key: "
        "locking funds and answering 429 breaks the wire contract"),
    ("http_429", "during_body"): Cell(
        "every request after the create is answered 429 Retry-After: 1 until the task ended",
        both(REFUNDED), outage("http_429")),
    ("http_429", "before_release"): Cell(
        "the release is answered 429 Retry-After: 1", both(RELEASED),
        instead_of(RELEASE, "http_429")),
    ("http_429", "during_release"): Cell(
        "the service releases, then answers 429 Retry-After: 1 (the retry meets 409)",
        both(RELEASED), after(RELEASE, "http_429")),
    # -- malformed body: an HTML page where escrow JSON belongs ----------------------------
    ("malformed", "before_create"): Cell(
        "a 200 HTML page answers the create unprocessed (a captive portal): outcome unknown",
        (RELEASED, UNKNOWN_NONE), instead_of(CREATE, "malformed")),
    ("malformed", "after_create"): Cell(
        "the service locks the funds; its 201 answer is an HTML page",
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
}

# The cells the default (fast) `pytest` runs; the rest is `pytest -m slow`.
FAST = {
    ("http_503", "before_create", "idempotent"),
    ("refused", "during_release", "idempotent"),
    ("malformed", "after_create", "idempotent"),
    ("http_500", "during_release", "live_like"),
    ("sigkill", "before_create", "live_like"),
    ("sigkill", "during_body", "live_like"),
}


def _params():
    for fault in FAULTS:
        for phase in PHASES:
            for mode in MODES:
                marks = () if (fault, phase, mode) in FAST else (pytest.mark.slow,)
                yield pytest.param(fault, phase, mode, id=f"{fault}-{phase}-{mode}", marks=marks)


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
def test_cell(fault: str, phase: str, mode: str, tmp_path: Path, server_for):
    cell = CELLS[fault, phase]
    if isinstance(cell, NotApplicable):
        pytest.skip(f"N/A: {cell.why}")
    expected = cell.expect[MODES.index(mode)]
    server = server_for(mode)
    (tmp_path / "ws").mkdir()
    ws = Workspace(tmp_path / "ws")
    env = {"PF_ESCROW_URL": server.url, "PF_API_KEY": PAYER_KEY}

    server.injector.add(*(dataclasses.replace(rule) for rule in cell.rules))
    if cell.down_for_run:
        server.stop_listening()
    options = [*(("--with", CATCH) if cell.catch else ()), *(("--with", TIMEOUT) if cell.timeout else ())]
    run = ws.run_flow(TESTFLOWS / "fault_flow.py", *options,
                      env={**env, "PFMF_FAULT": cell.flow_fault, "PFMF_PID_FILE": str(tmp_path / "task.pid")})
    server.injector.clear()
    server.listen()
    context = f"{cell.how}\nrequests: {server.injector.log}\n--- run output:\n{run.output[-4000:]}"
    if cell.catch:
        assert run.returncode == 0, f"the run should go on under @catch\n{context}"
    else:
        assert run.returncode != 0, f"the killed task should fail the run\n{context}"

    reconcile = ws.cli("reconcile", run.pathspec, env=env)
    context += f"\n--- reconcile:\n{reconcile.stdout}{reconcile.stderr}"
    still_open = expected in (UNKNOWN_NONE, UNKNOWN_ONE)
    assert reconcile.returncode == (1 if still_open else 0), context  # 1: still needs attention
    entries = ws.cli_json("ledger", run.pathspec, env=env)["entries"]
    context += f"\n--- ledger: {[(e['escrow_id'], e['status'], e['reason']) for e in entries]}"

    assert_settled(entries, expected, mode, server.engine, reconcile.stdout, context)
    assert_conserved_now_and_later(server.engine.path, entries, expected, context)


def assert_settled(entries: list, expected: str, mode: str, engine: SandboxEngine,
                   reconcile_output: str, context: str) -> None:
    escrows = engine.list_escrows()
    found = [(e["escrow_id"], e["status"], e["description"]) for e in escrows]
    context += f"\n--- sandbox escrows: {found}"
    if expected == NOTHING:
        assert entries == [] and escrows == [], context
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


def assert_conserved_now_and_later(db: Path, entries: list, expected: str, context: str) -> None:
    SandboxEngine(db).check_invariant()
    # 25 hours on, every escrow still funded has gone back to the payer minus the 1%.
    later = SandboxEngine(db, clock=lambda: time.time() + 25 * 3600)
    later.expire_due()
    later.check_invariant()
    assert {e["status"] for e in later.list_escrows()} <= {"released", "refunded"}, context
    balances = later.balances()
    payer, worker = balances["agents"][PAYER], balances["agents"][WORKER]
    fee = fee_for(AMOUNT)
    # What the payer is out of pocket: a release, or the 1% an escrow costs when it times out.
    timed_out = expected == UNKNOWN_ONE or (expected == REFUNDED and entries[0]["status"] == "refund_pending")
    paid = AMOUNT if expected == RELEASED else fee.commission if timed_out else 0
    assert payer["locked"] == 0, context
    assert balances["minted"] - payer["usdc"] == paid, context
    assert worker["usdc"] == (fee.net if expected == RELEASED else 0), context
    later.close()


# --------------------------------------------------------------------------- the printed matrix


class MatrixReport:
    """Collects each cell's outcome and prints the matrix at the end of the session."""

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
            self.outcomes.setdefault(key, "pass")

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for line in self.lines():
            terminalreporter.write_line(line)

    def lines(self) -> list[str]:
        width = max(len(p) for p in PHASES) + 2
        out = ["", "Fault matrix (each cell: idempotent / live_like)",
               (f"{'fault':<14}" + "".join(f"{p:<{width}}" for p in PHASES)).rstrip()]
        for fault in FAULTS:
            row = f"{fault:<14}"
            for phase in PHASES:
                marks = [self.outcomes.get((fault, phase, m), "-") for m in MODES]
                row += f"{(marks[0] if marks[0] == marks[1] == 'N/A' else '/'.join(marks)):<{width}}"
            out.append(row.rstrip())
        ran = [o for o in self.outcomes.values() if o != "N/A"]
        not_applicable = sum(1 for o in self.outcomes.values() if o == "N/A")
        total = len(FAULTS) * len(PHASES) * len(MODES)
        out.append(f"cells passed: {ran.count('pass')}/{len(ran)} (N/A: {not_applicable}, "
                   f"not run: {total - len(ran) - not_applicable} of {total})")
        for (fault, phase), cell in CELLS.items():
            if isinstance(cell, NotApplicable) and (fault, phase, MODES[0]) in self.outcomes:
                out.append(f"  N/A {fault} x {phase}: {cell.why}")
        return out


@pytest.fixture(scope="module", autouse=True)
def _print_matrix(request):
    plugins = request.config.pluginmanager
    if plugins.get_plugin("pf_fault_matrix") is None:
        plugins.register(MatrixReport(), "pf_fault_matrix")
