"""Settlement as a state machine: billable tasks driven through attempts and faults, the money
read back from the service after every step (issue 9, "Done when", first bullet).

Fast tier (default ``pytest``): :class:`SettlementMachine` drives :class:`TaskEscrow` directly, the
way ``@pf_escrow_step``'s hooks do (``task_pre_step`` starts a lease, the step wrapper locks,
``task_post_step`` releases, ``task_exception`` fails the attempt, ``task_finished`` ends or holds
the lease), without a Metaflow process. Each task has a budget (its amount), a number of user
retries and maybe ``@catch``; Metaflow's runtime is modelled as it behaves:

- a failed attempt with a retry left is retried; so is a killed one, and one whose artifacts
  could not be persisted (after ``task_post_step``: the release already happened);
- under ``@catch`` a task whose last user attempt died hard gets a fallback attempt
  (``retry_count > max_user_code_retries``), which only settles;
- a SIGKILL abandons the attempt object between two phases or in the middle of a request
  (before the service acted, or after it acted and before its answer arrived): no hook runs,
  its lease stays ``running`` with a pid that is gone;
- ``reconcile`` (any time, while other tasks run) settles the open escrows of every task whose
  lease says it has ended (``lease.activity``) with ``settle.resolve``, as ``pf-metaflow
  reconcile`` does, and writes its records as ``reconcile``.

Faults, on the first request of an operation within a phase (create, release, refund, GET):
``http_429`` / ``http_503`` (Retry-After: 1), ``http_500``, ``timeout`` (the answer comes after the
client's timeout), ``drop`` (connection closed, no answer), ``malformed`` (an HTML page),
``refused`` (nothing listening; ``outage``: for every request of that operation in the phase,
so the client's retries run out), each either *instead of* the request or *after the service
acted on it* (``_acted``; only where the wire contract allows it: a 429/503 never follows an
action), and ``kill`` / ``kill_acted``. A metadata write can fail too. Over HTTP the faults come
from ``tests/faults.py``'s :class:`FaultInjector` in front of the real sandbox server (refused: the
request really goes to a port where nothing listens); the embedded sandbox has no network, so there the transport
raises what the HTTP transport raises for that fault (after calling the engine, for ``_acted``).

Three services: the embedded sandbox (``sandbox:///…``), the HTTP sandbox, and the HTTP sandbox
run like live (``--no-refund --no-idempotency``). One server (one database) per service for the
module; every example registers its own payer, payee and referrer, so the balances it reads are
its own (house fees: the change since the example began).

After every step, from the service (engine balances, ``list_escrows``, the escrows table):
conservation (``check_invariant``); no task has more than one released escrow, or more than one
escrow holding funds (its budget); the payee received exactly the net of the released escrows;
a step that succeeded has its agent paid. At teardown the run goes on to its end without
faults, ``reconcile`` runs once, and then: nothing is left locked (except escrows the ledger
records ``refund_pending``, with the service's own return date and commission, or creates the
live-like server cannot tell about, recorded ``unknown``); the ledger (``ledger.totals`` over
the merged metadata records and artifacts) equals the balance movements to the micro-USDC,
now and 25 hours later when the service has returned what was pending.

Reconcile is modelled twice: at one moment (``reconcile``), and slowly (``slow_reconcile``: it
reads the run, the run moves on, then it settles what it read). Before it acts, the model checks
``lease.activity`` against what it knows: a running attempt must read as active. A task whose last
attempt ran its hooks without meeting a fault must leave nothing for reconcile, and a second
reconcile must change nothing.

Slow tier (``pytest -m slow``): the same checks after real Metaflow runs of
``tests/flows/stateful_flow.py`` (retries, ``@catch``, a fault per attempt chosen by environment
variables; over HTTP, faults on the first create and release), ``pf-metaflow reconcile`` once, and
``reconcile`` while the paid step runs (it must skip it).

Runs are derandomized (the same examples every time). To explore: ``PF_STATEFUL_RANDOM=1`` and
``PF_STATEFUL_EXAMPLES=500`` (fast tier, 40 by default, about 15 s) or ``PF_STATEFUL_RUNS=20``
(slow tier, 4 runs per service by default). What the machine found is pinned below as plain
regression tests (minimised sequences).
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import itertools
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
from faults import CREATE, RELEASE, FaultServer, Rule
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import pf_metaflow.client as client_mod
from pf_metaflow import lease as lease_mod
from pf_metaflow import ledger as ledger_mod
from pf_metaflow import settle
from pf_metaflow.client import EscrowClient
from pf_metaflow.errors import (
    AmbiguousOutcome,
    InsufficientFunds,
    NetworkError,
    ProtocolError,
    RateLimited,
    ServerError,
    ServiceUnavailable,
)
from pf_metaflow.sandbox.engine import SandboxEngine
from pf_metaflow.task_escrow import TaskEscrow

SERVICES = ("embedded", "http", "live_like")
NOT_CREATED = getattr(ledger_mod, "NOT_CREATED", "not_created")  # a create the service refused
ZERO = Decimal(0)
FLOW, STEP, LABEL = "StatefulFlow", "work", "work"
AMOUNTS = ("1.00", "1.25", "0.10", "0.333333", "2.345678")
PAYER_FUNDS = Decimal("100")
CLIENT_TIMEOUT = 10.0  # seconds the test's clients wait for an answer
SHORT_TIMEOUT = 0.3  # ... for the one request a "timeout" fault hits,
HOLD = SHORT_TIMEOUT + 0.2  # which is answered this late
HELD = ("funded", "completed", "disputed")  # escrow states that hold the payer's money

# Fault names: kind[_acted]. "_acted": the service acts on the request, then the fault answers.
CREATE_FAULTS = ("none", "http_429", "http_503", "http_500", "http_500_acted", "timeout",
                 "timeout_acted", "drop_acted", "malformed", "malformed_acted", "refused", "outage",
                 "kill", "kill_acted")
SETTLE_FAULTS = ("none", "http_429", "http_503", "http_500", "http_429_acted", "http_503_acted",
                 "http_500_acted", "timeout", "timeout_acted", "drop_acted", "malformed_acted",
                 "refused", "outage", "kill", "kill_acted")
GET_FAULTS = ("none", "http_500", "http_503", "timeout", "malformed", "refused", "outage", "kill")
WRITE_FAULTS = (None, 1, 2)  # fail the n-th metadata write of the phase
BODY = ("ok", "raise", "gate_fails", "unpicklable")  # unpicklable: persisting artifacts fails
NO_FAULTS: dict = {}
# What the next step of the run is (an attempt moving on is the common case; shrinks to it).
ACTIONS = ("advance", "advance", "advance", "advance", "kill", "reconcile", "slow_reconcile")

PREFIX = {"create": CREATE, "release": RELEASE, "refund": "POST /escrow/refund/", "get": "GET /escrow/"}


class Killed(BaseException):
    """The task's process got SIGKILL here: nothing after this point runs in it."""


# --------------------------------------------------------------------------- the services


class Service:
    """One escrow service for the module, and what the test reads from it (never the ledger)."""

    def __init__(self, mode: str, root: Path) -> None:
        self.mode = mode
        self.db = root / mode / "escrow.db"
        self.server: Optional[FaultServer] = None
        if mode == "embedded":
            self.db.parent.mkdir(parents=True)
            self.engine = SandboxEngine(self.db)
            self.engine.check_invariant()
        else:
            on = mode == "http"
            self.server = FaultServer(self.db, idempotency=on, refunds=on, pid_file=root / mode / "task.pid")
            self.engine = self.server.engine

    @property
    def url(self) -> str:
        return f"sandbox://{self.db}" if self.server is None else self.server.url

    @property
    def live_like(self) -> bool:
        return self.mode == "live_like"

    def client(self, key: str) -> EscrowClient:
        return EscrowClient(self.url, key, timeout=CLIENT_TIMEOUT)

    def escrows(self, creator: str) -> list[dict]:
        return self.engine.list_escrows(creator_id=creator)

    def referral_shares(self, creator: str) -> dict[str, Decimal]:
        """escrow id -> the referral share the service pays (or paid) on it (its own table)."""
        with sqlite3.connect(self.db) as conn:
            rows = conn.execute("SELECT escrow_id, referral_commission, referrer_id FROM escrows "
                                "WHERE creator_id = ?", (creator,)).fetchall()
        return {i: (Decimal(micro).scaleb(-6) if referrer else ZERO) for i, micro, referrer in rows}

    def money(self, agents: dict[str, str], engine: Optional[SandboxEngine] = None) -> dict:
        balances = (engine or self.engine).balances()
        out = {name: balances["agents"][agent] for name, agent in agents.items()}
        out["house"] = balances["house_fees"]
        return out

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        else:
            self.engine.close()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Service]]:
    root = tmp_path_factory.mktemp("stateful")
    made = {mode: Service(mode, root) for mode in SERVICES}
    yield made
    for service in made.values():
        service.close()


# --------------------------------------------------------------------------- fault injection


@dataclass
class Fault:
    kind: str  # http_429 http_503 http_500 timeout drop malformed refused kill
    acts: bool

    @classmethod
    def parse(cls, name: str) -> Optional["Fault"]:
        if name == "none":
            return None
        kind, acted, _ = name.partition("_acted")
        return cls(kind, bool(acted))


class FaultyTransport:
    """Wraps a client's transport: the first request of each faulted operation meets its fault."""

    def __init__(self, inner: Any, machine: "SettlementMachine") -> None:
        self.inner = inner
        self.machine = machine

    def create(self, *args: Any) -> Any:
        return self._call("create", self.inner.create, *args)

    def release(self, escrow_id: str) -> Any:
        return self._call("release", self.inner.release, escrow_id)

    def refund(self, escrow_id: str) -> Any:
        return self._call("refund", self.inner.refund, escrow_id)

    def get(self, escrow_id: str) -> Any:
        return self._call("get", self.inner.get, escrow_id)

    def __getattr__(self, name: str) -> Any:  # capabilities, balance, agent_id...: no faults
        return getattr(self.inner, name)

    def _call(self, op: str, send: Callable, *args: Any) -> Any:
        fault = self.machine.take_fault(op)
        if fault is None:
            return send(*args)
        self.machine.note(f"    {op}: fault {fault.kind}{'_acted' if fault.acts else ''}")
        _seen(f"fault {op} {fault.kind}{'_acted' if fault.acts else ''}")
        if fault.kind == "kill":
            if fault.acts:
                send(*args)
            raise Killed(f"SIGKILL during {op}")
        server = self.machine.service.server
        if server is None:
            return self._simulate(op, fault, send, *args)
        if fault.kind in ("refused", "outage"):
            # This request goes to a port where nothing listens: refused, nothing sent. (Not
            # FaultServer.stop_listening: a connect right after it is sometimes accepted and
            # reset instead, an ambiguous outcome, which would make the examples flaky.)
            base = self.inner.base
            self.inner.base = f"http://127.0.0.1:{_dead_port()}"
            try:
                return send(*args)
            finally:
                self.inner.base = base
        answer = {"timeout": "as_is" if fault.acts else "drop"}.get(fault.kind, fault.kind)
        # A dropped answer leaves the connection open: the client waits out its timeout.
        late = fault.kind in ("timeout", "drop")
        server.injector.add(Rule((PREFIX[op],), answer, acts=fault.acts,
                                 hold=HOLD if fault.kind == "timeout" else 0.0, times=1))
        # Only this request waits a short time for its answer: the others keep the client's
        # own timeout, so that a slow machine makes no timeouts the test did not ask for.
        patience = getattr(self.inner, "_timeout", None)
        if late and patience is not None:
            self.inner._timeout = SHORT_TIMEOUT
        try:
            return send(*args)
        finally:
            server.injector.clear()
            if patience is not None:
                self.inner._timeout = patience

    @staticmethod
    def _simulate(op: str, fault: Fault, send: Callable, *args: Any) -> Any:
        """The embedded sandbox: what the HTTP transport raises for this fault."""
        if fault.acts:
            send(*args)
        what = f"{op} (injected {fault.kind})"
        if fault.kind == "http_429":
            raise RateLimited(f"{what}: rate limited", status=429, details={"retry_after": 1.0})
        if fault.kind == "http_503":
            raise ServiceUnavailable(f"{what}: unavailable", status=503, details={"retry_after": 1.0})
        if fault.kind == "http_500":
            raise ServerError(f"{what}: internal error", status=500)
        if fault.kind in ("timeout", "drop"):
            raise AmbiguousOutcome(f"{what}: no answer", details={"reason": "timed out"})
        if fault.kind == "malformed":
            status = (201 if op == "create" else 200) if fault.acts else 200
            raise ProtocolError(f"{what}: an HTML page", status=status)
        if fault.kind in ("refused", "outage"):
            raise NetworkError(f"{what}: connection refused; nothing was sent")
        raise AssertionError(fault)


_DEAD_PORT: list[int] = []


def _dead_port() -> int:
    """A loopback port nobody listens on (bound once, then closed)."""
    if not _DEAD_PORT:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            _DEAD_PORT.append(probe.getsockname()[1])
    return _DEAD_PORT[0]


# --------------------------------------------------------------------------- the model


def _iso(moment: _dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _in(seconds: float) -> str:
    return _iso(_dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=seconds))


@dataclass
class Attempt:
    no: int
    pid: int
    escrow: TaskEscrow
    fallback: bool  # @catch's fallback: no user code, only settles
    phase: str = "pre"  # pre -> body -> post -> persist
    body: str = "ok"
    leases: int = 0
    client: Optional[EscrowClient] = None
    post_hit: bool = False  # task_post_step met a fault


@dataclass(repr=False)
class Task:
    index: int
    ref: str
    amount: Decimal
    retries: int  # max_user_code_retries
    catch: bool
    records: list = field(default_factory=list)  # pf-escrow task metadata, as JSON values
    leases: list = field(default_factory=list)  # pf-escrow-lease task metadata
    artifact: Optional[dict] = None  # the entry in the newest persisted pf_ledger artifact
    attempt: Optional[Attempt] = None  # the attempt running now
    next_no: int = 0
    state: str = "ready"  # ready (an attempt will start) | running | done
    outcome: str = ""  # succeeded | gate_refunded | caught | failed
    clean_end: bool = False  # its last attempt ran its hooks and met no fault while settling
    log: list = field(default_factory=list)

    def __repr__(self) -> str:
        return f"task{self.index}"


RUN_IDS = itertools.count(1)
PIDS = itertools.count(4_000_000)  # fake pids of the simulated task processes


class SettlementMachine(RuleBasedStateMachine):
    """Tasks of one run, their attempts and faults; see the module docstring."""

    def __init__(self, service: Service) -> None:
        super().__init__()
        self.service = service
        self.run_id = f"{next(RUN_IDS)}{os.getpid()}"
        self.tasks: list[Task] = []
        self.alive: set[int] = set()
        self.faults: dict[str, Fault] = {}
        self.write_fail: Optional[int] = None
        self.writes = 0
        self.trace: list[str] = []
        self.in_step = False  # a step raised: teardown must not pile a second failure on it
        self.hit = False
        self.plan: Optional[list] = None  # a reconcile that has read the run and not yet acted
        engine = service.engine
        payer = engine.register("stateful payer")
        engine.claim(payer["agent_id"], PAYER_FUNDS)
        self.payer_key = payer["api_key"]
        self.agents = {
            "payer": payer["agent_id"],
            "payee": engine.register("stateful payee")["agent_id"],
        }
        referrer = engine.register("stateful referrer")
        self.agents["referrer"] = referrer["agent_id"]
        self.referral_code = referrer["referral_code"]
        self.before = service.money(self.agents)

    # -- plumbing ------------------------------------------------------------------------

    def note(self, line: str) -> None:
        self.trace.append(line)

    def take_fault(self, op: str) -> Optional[Fault]:
        fault = self.faults.get(op) if op in self.faults and self.faults[op].kind == "outage" else \
            self.faults.pop(op, None)
        self.hit = self.hit or fault is not None
        return fault

    def _phase(self, faults: dict[str, str], write_fail: Optional[int] = None):
        self.faults = {op: f for op, name in faults.items() if (f := Fault.parse(name)) is not None}
        self.write_fail = write_fail
        self.writes = 0
        self.hit = False  # a fault met a request or a write in this phase

    def _end_phase(self) -> None:
        self.faults = {}
        self.write_fail = None

    def _client_for(self, attempt: Attempt) -> Callable[[], EscrowClient]:
        def get() -> EscrowClient:
            if attempt.client is None:  # one client per task process, as default_client()
                client = self.service.client(self.payer_key)
                client._transport = FaultyTransport(client._transport, self)
                attempt.client = client
            return attempt.client

        return get

    def _writer(self, task: Task) -> Callable[[dict], None]:
        def write(entry: dict) -> None:
            self.writes += 1
            if self.writes == self.write_fail:
                self.hit = True
                self.note(f"    metadata write {self.writes} fails ({entry.get('status')})")
                raise OSError("metadata service unavailable (injected)")
            task.records.append(json.loads(json.dumps(entry)))

        return write

    def _lease(self, task: Task, attempt: Attempt, state: str, seconds: float) -> None:
        """What LeaseKeeper writes: one record per state, newest (attempt, n) wins."""
        attempt.leases += 1
        task.leases.append({"attempt": attempt.no, "n": attempt.leases, "state": state,
                            "until": _in(seconds), "written_at": _in(0), "host": socket.gethostname(),
                            "pid": attempt.pid})

    def _activity(self, task: Task) -> lease_mod.Activity:
        return lease_mod.activity(task.leases, pid_alive=self.alive.__contains__)

    def _build(self, task: Task, attempt: Attempt, referral: bool):
        def build(ref: str, generation: int) -> dict:
            return ledger_mod.new_entry(
                ref=ref, run=f"{FLOW}/{self.run_id}", step=STEP, task=str(task.index),
                attempt=attempt.no, recipient=self.agents["payee"], amount_usdc=task.amount,
                description=f"pf-metaflow {ref} {LABEL}", label=LABEL,
                idempotency_key="pfmf-" + hashlib.sha256(ref.encode()).hexdigest()[:40],
                timeout_hours=None, referral_code=self.referral_code if referral else None,
            )

        return build

    # -- the run -------------------------------------------------------------------------

    @initialize(
        specs=st.lists(st.tuples(st.sampled_from(AMOUNTS), st.integers(0, 2), st.booleans()),
                       min_size=1, max_size=3),
        referral=st.booleans(),
    )
    def start_run(self, specs, referral):
        self.referral = referral
        for i, (amount, retries, catch) in enumerate(specs):
            ref = f"{FLOW}/{self.run_id}/{STEP}/{i}"
            self.tasks.append(Task(i, ref, Decimal(amount), retries, catch))
        self.note(f"run {self.run_id}: {[(t.amount, t.retries, t.catch) for t in self.tasks]}, "
                  f"referral={referral}")

    def _open(self) -> list[Task]:
        return [t for t in self.tasks if t.state != "done"]

    def _running(self) -> list[Task]:
        return [t for t in self.tasks if t.attempt is not None]

    @rule(data=st.data())
    def step(self, data):
        """What happens next in the run: a task's attempt moves one phase on (starting the task's
        next attempt if none runs), an attempt is SIGKILLed between two phases, or someone runs
        ``pf-metaflow reconcile`` while the run goes on."""
        self.in_step = True
        action = data.draw(st.sampled_from(ACTIONS), label="action")
        if not self._open():
            pass  # the run is over: teardown reconciles once and checks
        elif action == "reconcile":
            self._reconcile()
        elif action == "slow_reconcile":
            self._reconcile_done()
            self.plan = self._reconcile_plan()
            self.note(f"reconcile reads the run: will settle {[e['ref'] for _, e in self.plan]}")
        elif action == "kill" and self._running():
            task = self._pick(data, self._running())
            self.note(f"{task} attempt {task.attempt.no}: SIGKILL before phase {task.attempt.phase}")
            self._gone(task)
        else:
            self._step(data, self._pick(data, self._open()))
        if self.plan is not None and action != "slow_reconcile" and data.draw(st.booleans(),
                                                                              label="reconcile acts now"):
            self._reconcile_done()
        self.in_step = False

    def _pick(self, data, tasks: list[Task]) -> Task:
        index = data.draw(st.sampled_from([t.index for t in tasks]), label="task")
        return self.tasks[index]

    def _step(self, data, task: Task) -> None:
        def fault(op: str, table: tuple) -> str:
            # Half the requests meet no fault, so that attempts get to their later phases.
            return data.draw(st.one_of(st.just("none"), st.sampled_from(table[1:])), label=op)

        attempt = task.attempt
        if attempt is None:
            self._start(task)
        elif attempt.fallback:
            self._advance(task, {"refund": fault("refund", SETTLE_FAULTS), "get": fault("get", GET_FAULTS)})
        elif attempt.phase == "pre":
            faults = {"create": fault("create", CREATE_FAULTS), "get": fault("get", GET_FAULTS)}
            self._advance(task, faults, data.draw(st.sampled_from(WRITE_FAULTS), label="write"))
        elif attempt.phase == "body":
            attempt.body = data.draw(st.sampled_from(BODY), label="body")
            faults = ({"refund": fault("refund", SETTLE_FAULTS), "get": fault("get", GET_FAULTS)}
                      if attempt.body == "raise" else {})
            self._advance(task, faults)
        elif attempt.phase == "post":
            faults = {"release": fault("release", SETTLE_FAULTS), "refund": fault("refund", SETTLE_FAULTS),
                      "get": fault("get", GET_FAULTS)}
            self._advance(task, faults, data.draw(st.sampled_from(WRITE_FAULTS), label="write"))
        else:
            self._advance(task, NO_FAULTS)

    # -- attempts, as the decorator's hooks and Metaflow's runtime drive them ---------------

    def _start(self, task: Task) -> None:
        no = task.next_no
        task.next_no += 1
        fallback = no > task.retries  # only reached under @catch
        attempt = Attempt(no, next(PIDS), None, fallback)  # type: ignore[arg-type]
        attempt.escrow = TaskEscrow(task.ref, no, read=lambda: list(task.records), write=self._writer(task),
                                    client=self._client_for(attempt), log=task.log.append)
        task.attempt, task.state = attempt, "running"
        self.alive.add(attempt.pid)
        self._lease(task, attempt, "running", 120)  # task_pre_step: the lease comes first
        self.note(f"{task} attempt {no}{' (@catch fallback)' if fallback else ''}: started")

    def _advance(self, task: Task, faults: dict, write_fail: Optional[int] = None) -> None:
        attempt = task.attempt
        assert attempt is not None
        te = attempt.escrow
        self._phase(faults, write_fail)
        try:
            if attempt.fallback:
                # FailureHandledByCatch: task_exception with retry_count > max_user_code_retries
                self._failed(task, "attempt ended before settling (killed); @catch's fallback", final=True)
                return
            if attempt.phase == "pre":  # the step wrapper: lock, then the body
                try:
                    entry = te.lock(self._build(task, attempt, self.referral))
                except Exception as exc:  # PfEscrowRuntimeError: the step fails before its body
                    self.note(f"{task} attempt {attempt.no}: lock failed: {type(exc).__name__}: {exc}")
                    self._failed(task, f"lock failed: {type(exc).__name__}", final=attempt.no >= task.retries)
                    return
                self.note(f"{task} attempt {attempt.no}: lock -> {_show(entry)}")
                attempt.phase = "body"
            elif attempt.phase == "body":
                self.note(f"{task} attempt {attempt.no}: body {attempt.body}")
                if attempt.body == "raise":
                    self._failed(task, "step failed: RuntimeError: boom", final=attempt.no >= task.retries)
                    return
                attempt.phase = "post"
            elif attempt.phase == "post":  # task_post_step
                gate_ok = attempt.body != "gate_fails"
                try:
                    entry = te.succeed(gate_ok, "release gate returned False")
                except settle.SettlementError as exc:  # PfEscrowReleaseError: the step fails
                    self.note(f"{task} attempt {attempt.no}: settle failed: {type(exc).__name__}: {exc}")
                    self._failed(task, f"step failed: {type(exc).__name__}", final=attempt.no >= task.retries)
                    return
                self.note(f"{task} attempt {attempt.no}: post_step -> {_show(entry)}")
                attempt.phase = "persist"
                attempt.post_hit = self.hit
            elif attempt.phase == "persist":
                if attempt.body == "unpicklable":
                    # Metaflow fails the task while persisting artifacts: no task_exception, no
                    # task_finished; the process exits (its lease says running, its pid is gone).
                    self.note(f"{task} attempt {attempt.no}: persisting artifacts fails")
                    self._gone(task)
                    return
                task.artifact = _copy(te.entry)
                self._lease(task, attempt, "ended", 0)  # task_finished
                task.outcome = "succeeded" if attempt.body == "ok" else "gate_refunded"
                self.note(f"{task} attempt {attempt.no}: {task.outcome}")
                self._finish(task, clean=not attempt.post_hit)
        except Killed as exc:
            self.note(f"{task} attempt {attempt.no}: {exc}")
            self._gone(task)
        finally:
            self._end_phase()

    def _failed(self, task: Task, reason: str, *, final: bool) -> None:
        """task_exception (never raises), then task_finished; then the runtime retries or not."""
        attempt = task.attempt
        te = attempt.escrow
        try:
            after = te.fail(reason, final=final)
            self.note(f"{task} attempt {attempt.no}: fail(final={final}) -> {_show(after)}")
        except Killed:
            raise
        except Exception as exc:  # noqa: BLE001 - the decorator prints it and goes on
            self.note(f"{task} attempt {attempt.no}: fail raised {type(exc).__name__}: {exc}")
        # Metaflow persists artifacts in its finally, whatever happened.
        task.artifact = _copy(te.entry) if te.entry is not None else task.artifact
        if te.held_for_retry:
            self._lease(task, attempt, "retrying", 120)
        else:
            self._lease(task, attempt, "ended", 0)
        self.alive.discard(attempt.pid)
        task.attempt = None
        if not final:
            task.state = "ready"
        else:
            task.outcome = "caught" if task.catch else "failed"
            self._finish(task, clean=not self.hit)

    def _gone(self, task: Task) -> None:
        """The attempt's process is gone without its hooks: the runtime retries if it may."""
        attempt = task.attempt
        self.alive.discard(attempt.pid)
        task.attempt = None
        if attempt.no < task.retries or (task.catch and attempt.no == task.retries):
            task.state = "ready"
        else:
            task.outcome = "failed"
            self._finish(task)

    def _finish(self, task: Task, clean: bool = False) -> None:
        task.attempt, task.state, task.clean_end = None, "done", clean

    def _reconcile(self) -> None:
        """``pf-metaflow reconcile`` at one moment: read the run, settle what has ended."""
        self.plan = self._reconcile_plan()
        self._reconcile_done()

    def _reconcile_plan(self) -> list:
        """What reconcile reads: every open escrow of each task whose lease says it ended."""
        plan = []
        for task in self.tasks:
            activity = self._activity(task)
            if task.attempt is not None:
                assert activity.active, self._why(
                    f"{task}'s attempt {task.attempt.no} is running, but its lease says "
                    f"{activity.why!r}: reconcile would settle its escrow under it")
            if activity.active:
                _seen("reconcile: skipped a running task")
                continue
            merged = ledger_mod.merge(task.records, [task.artifact] if task.artifact else [])
            plan += [(task, e) for e in merged if e["status"] in ledger_mod.OPEN_STATUSES]
        return plan

    def _reconcile_done(self) -> None:
        """Reconcile settles what it read (the run may have moved on since: a slow reconcile)."""
        plan, self.plan = self.plan, None
        if plan is None:
            return
        client = self.service.client(self.payer_key)
        acted = []
        for task, entry in plan:
            def write(record: dict, records=task.records) -> None:
                records.append(json.loads(json.dumps(record)))

            after = settle.resolve(client, entry, "reconciled: its task ended without settling it",
                                   write, by="reconcile")
            acted.append(f"{entry['ref']}: {entry['status']} -> {_show(after)}")
            _seen(f"reconcile: {entry['status']} -> {after['status']}")
        self.note(f"reconcile: {acted or 'nothing to do'}")

    # -- invariants ------------------------------------------------------------------------

    def _by_task(self, escrows: list[dict]) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        refs = {t.ref for t in self.tasks}
        for escrow in escrows:
            ref = _task_ref(escrow)
            assert ref in refs, f"escrow {escrow['escrow_id']} belongs to no task of this run: {escrow}"
            out.setdefault(ref, []).append(escrow)
        return out

    @invariant()
    def money_is_right_at_every_step(self):
        if not self.tasks or self.in_step:
            return
        self.service.engine.check_invariant()
        escrows = self.service.escrows(self.agents["payer"])
        by_task = self._by_task(escrows)
        for task in self.tasks:
            mine = by_task.get(task.ref, [])
            released = [e["escrow_id"] for e in mine if e["status"] == "released"]
            held = [e for e in mine if e["status"] in HELD]
            assert len(released) <= 1, self._why(f"{task} was paid {len(released)} times: {released}")
            assert len(held) <= 1 and sum((e["amount_usd"] for e in held), ZERO) <= task.amount, (
                self._why(f"{task} holds {len(held)} escrows, more than its budget {task.amount}: "
                          f"{[(e['escrow_id'], e['amount_usd']) for e in held]}"))
            if task.outcome == "succeeded":
                assert len(released) == 1, self._why(f"{task}'s step succeeded but its agent is unpaid")
        paid = sum((e["amount_usd"] - e["commission_usd"] for e in escrows if e["status"] == "released"), ZERO)
        now = self.service.money(self.agents)
        assert now["payee"]["usdc"] - self.before["payee"]["usdc"] == paid, self._why(
            f"the payee received {now['payee']['usdc'] - self.before['payee']['usdc']}, the released "
            f"escrows' net is {paid}")

    def _why(self, message: str) -> str:
        ledger = self._ledger()
        lines = [message, "--- what happened:", *self.trace, "--- ledger:"]
        lines += [f"  {e['ref']} {e.get('escrow_id')} {e['status']} amount={e['amount_usdc']} "
                  f"fee={e['fee_usdc']} net={e['net_usdc']} ref={e.get('referral_usdc')} by={e.get('settled_by')} "
                  f"reason={e.get('reason')}" for e in ledger]
        lines += ["--- service:"]
        lines += [f"  {e['escrow_id']} {e['status']} {e['amount_usd']} {e['description']}"
                  for e in self.service.escrows(self.agents["payer"])]
        return "\n".join(lines)

    def _ledger(self) -> list[dict]:
        """What ``pf-metaflow ledger`` shows: every task's metadata records and artifacts, merged."""
        return ledger_mod.merge(*(t.records for t in self.tasks),
                                [t.artifact for t in self.tasks if t.artifact])

    # -- the end of the run ------------------------------------------------------------------

    def teardown(self):
        try:
            if self.tasks and not self.in_step:
                self._reconcile_done()
                self._run_to_the_end()
                self._check_clean_ends()
                self._reconcile()
                self._check_settled()
                self._check_second_reconcile_is_a_no_op()
                self._check_later()
        finally:
            self._end_phase()
            if self.service.server is not None:
                self.service.server.injector.clear()
                self.service.server.listen()
            # Whatever this example left funded times out now, so that the next example's
            # house fees move only by its own escrows.
            later = SandboxEngine(self.service.db, clock=lambda: time.time() + 25 * 3600)
            try:
                later.expire_due()
            finally:
                later.close()

    def _run_to_the_end(self) -> None:
        """The run goes on without faults: every task ends its attempts (bodies succeed)."""
        for _ in range(50):
            open_tasks = self._open()
            if not open_tasks:
                break
            for task in open_tasks:
                if task.attempt is None:
                    self._start(task)
                else:
                    self._advance(task, NO_FAULTS)
        assert not self._open(), "the run did not end"
        for task in self.tasks:
            activity = self._activity(task)
            assert not activity.active, self._why(
                f"{task} has ended ({task.outcome}) but its lease says {activity.why!r}: reconcile "
                "would skip it")

    def _check_clean_ends(self) -> None:
        """A task whose last attempt ran its hooks without meeting a fault leaves nothing for
        reconcile (settlement rule 3: the attempt that finally fails refunds)."""
        for task in self.tasks:
            if not task.clean_end:
                continue
            for e in ledger_mod.merge(task.records, [task.artifact] if task.artifact else []):
                left = e["status"] == "locked" or (e["status"] == "unknown" and not self.service.live_like)
                assert not left, self._why(
                    f"{task} ended cleanly ({task.outcome}) but left {e['ref']} {e['status']} for reconcile")

    def _check_later(self) -> None:
        problems = later_problems(self._ledger(), self.service, self.agents, self.before)
        assert not problems, self._why("the service's timeouts broke the ledger:\n  " + "\n  ".join(problems))

    def _check_second_reconcile_is_a_no_op(self) -> None:
        payer = self.agents["payer"]
        before = ({e["ref"]: e["status"] for e in self._ledger()},
                  {x["escrow_id"]: x["status"] for x in self.service.escrows(payer)})
        self._reconcile()
        after = ({e["ref"]: e["status"] for e in self._ledger()},
                 {x["escrow_id"]: x["status"] for x in self.service.escrows(payer)})
        assert after == before, self._why(f"a second reconcile changed things: {before} -> {after}")

    def _check_settled(self) -> None:
        ledger = self._ledger()
        outcomes = {t.ref: t.outcome for t in self.tasks}
        problems = settled_problems(ledger, self.service, self.agents, self.before, outcomes)
        for e in ledger:
            _seen(f"ledger entry {e['status']}{' (generation 2+)' if '#' in e['ref'] else ''}")
        for task in self.tasks:
            _seen(f"task {task.outcome}")
        assert not problems, self._why("settlement broke its rules:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- the checks, after a run


def _task_ref(escrow: dict) -> str:
    """The task an escrow belongs to, by its description: ``pf-metaflow Flow/run/step/task[#n] label``."""
    return escrow["description"].split()[1].split("#", 1)[0]


def _moved(before: dict, now: dict, who: str) -> Decimal:
    return now[who]["usdc"] - before[who]["usdc"] if who in before else ZERO


def settled_problems(ledger: list[dict], service: Service, agents: dict[str, str], before: dict,
                     outcomes: dict[str, str]) -> list[str]:
    """How the run's ledger (after the run and one reconcile) disagrees with the service.

    ``outcomes``: task ref -> ``succeeded`` (its step succeeded with the release gate
    holding: it must be paid exactly once) or anything else (paid at most once).
    """
    payer = agents["payer"]
    service.engine.check_invariant()
    escrows = {e["escrow_id"]: e for e in service.escrows(payer)}
    shares = service.referral_shares(payer)
    problems: list[str] = []
    named = {e["escrow_id"] for e in ledger if e.get("escrow_id")}
    unknown = [e for e in ledger if e["status"] == "unknown"]

    for e in ledger:
        where = f"{e['ref']} ({e.get('escrow_id')}, {e['status']})"
        if e["status"] == "locked":
            problems.append(f"{where}: still locked after the run and one reconcile")
            continue
        if e["status"] == NOT_CREATED:  # the service refused the create: no escrow, no money
            if e.get("escrow_id") or Decimal(e["fee_usdc"]) != 0 or Decimal(e["net_usdc"]) != 0:
                problems.append(f"{where}: not created, yet it names an escrow or a fee")
            if outcomes.get(_task_ref({"description": e["description"]})) == "succeeded":
                problems.append(f"{where}: its step succeeded, yet no escrow was created")
            continue
        if e["status"] == "unknown":
            if not service.live_like:
                problems.append(f"{where}: a create left unknown on a server with idempotency keys")
            if e.get("escrow_id"):
                problems.append(f"{where}: unknown, yet it names an escrow")
            continue
        escrow = escrows.get(e["escrow_id"])
        if escrow is None:
            problems.append(f"{where}: the service has no such escrow of this payer")
            continue
        want = {"released": "released", "refunded": "refunded", "refund_pending": "funded"}[e["status"]]
        if escrow["status"] != want:
            problems.append(f"{where}: the service says {escrow['status']}")
        if Decimal(e["amount_usdc"]) != escrow["amount_usd"]:
            problems.append(f"{where}: amount {e['amount_usdc']} != the service's {escrow['amount_usd']}")
        if e["status"] == "released":
            if Decimal(e["fee_usdc"]) != escrow["commission_usd"]:
                problems.append(f"{where}: fee {e['fee_usdc']} != commission {escrow['commission_usd']}")
            if Decimal(e["net_usdc"]) != escrow["net_to_counterparty"]:
                problems.append(f"{where}: net {e['net_usdc']} != {escrow['net_to_counterparty']}")
            if e.get("referral_usdc") is not None and Decimal(e["referral_usdc"]) != shares[e["escrow_id"]]:
                problems.append(f"{where}: referral {e['referral_usdc']} but the service paid the "
                                f"referrer {shares[e['escrow_id']]}")
        elif e["status"] == "refund_pending":
            if not service.live_like:
                problems.append(f"{where}: refund_pending on a server with a refund call")
            if e.get("expected_at") != escrow["auto_release_at"]:
                problems.append(f"{where}: expected_at {e.get('expected_at')} != the service's "
                                f"auto_release_at {escrow['auto_release_at']}")
            if Decimal(e["fee_usdc"]) != escrow["commission_usd"]:
                problems.append(f"{where}: the timeout keeps {escrow['commission_usd']}, the ledger "
                                f"says {e['fee_usdc']}")
        elif Decimal(e["fee_usdc"]) != 0 or Decimal(e["net_usdc"]) != 0:  # a full refund
            problems.append(f"{where}: a full refund with fee {e['fee_usdc']} / net {e['net_usdc']}")

    # Escrows no ledger entry names: only creates whose outcome the live-like server cannot tell.
    strays = [x for i, x in escrows.items() if i not in named]
    for escrow in strays:
        matches = [u for u in unknown if u["description"] == escrow["description"]]
        if not (service.live_like and matches and escrow["status"] == "funded"):
            problems.append(f"escrow {escrow['escrow_id']} ({escrow['status']}, {escrow['amount_usd']}, "
                            f"{escrow['description']!r}) is on no ledger")
    for u in unknown:
        if len([x for x in strays if x["description"] == u["description"]]) > 1:
            problems.append(f"{u['ref']}: more than one escrow matches its unknown create")

    # Paid at most once; a step that succeeded paid exactly once.
    for ref, outcome in outcomes.items():
        released = [x["escrow_id"] for x in escrows.values() if _task_ref(x) == ref and x["status"] == "released"]
        if len(released) > 1:
            problems.append(f"{ref} paid {len(released)} times: {released}")
        if outcome == "succeeded" and len(released) != 1:
            problems.append(f"{ref}: the step succeeded and its agent got {len(released)} payments")
    for x in escrows.values():
        if _task_ref(x) not in outcomes:
            problems.append(f"escrow {x['escrow_id']} belongs to no task of the run: {x['description']!r}")

    # The ledger's totals are the balance movements, to the micro-USDC.
    totals = ledger_mod.totals(ledger)
    now = service.money(agents)
    released = [x for x in escrows.values() if x["status"] == "released"]
    pending_fees = sum((Decimal(e["fee_usdc"]) for e in ledger if e["status"] == "refund_pending"), ZERO)
    stray_held = sum((x["amount_usd"] for x in strays), ZERO)

    def check(name: str, ours: Decimal, service_says: Decimal) -> None:
        if ours != service_says:
            problems.append(f"{name}: ledger {ours} != service {service_says}")

    check("released (gross)", totals["released"], sum((x["amount_usd"] for x in released), ZERO))
    check("net paid = payee's gain", totals["net_paid"], _moved(before, now, "payee"))
    check("refunded", totals["refunded"],
          sum((x["amount_usd"] for i, x in escrows.items() if x["status"] == "refunded" and i in named), ZERO))
    check("fees moved = house + referral", totals["fees"] - pending_fees,
          (now["house"] - before["house"]) + _moved(before, now, "referrer"))
    check("payer's spend = paid + fees + still held",
          totals["net_paid"] + totals["fees"] - pending_fees + now["payer"]["locked"] - before["payer"]["locked"],
          -_moved(before, now, "payer"))
    check("still held = refund_pending + unknown creates that happened",
          totals["refund_pending"] + stray_held, now["payer"]["locked"] - before["payer"]["locked"])
    return problems


def later_problems(ledger: list[dict], service: Service, agents: dict[str, str], before: dict) -> list[str]:
    """25 hours on, the service has returned what was pending, less the commission the ledger says."""
    totals = ledger_mod.totals(ledger)
    named = {e["escrow_id"] for e in ledger if e.get("escrow_id")}
    strays = [x for x in service.escrows(agents["payer"]) if x["escrow_id"] not in named]
    pending = [e for e in ledger if e["status"] == "refund_pending"]
    if not (pending or strays):
        return []
    later = SandboxEngine(service.db, clock=lambda: time.time() + 25 * 3600)
    try:
        later.expire_due()
        later.check_invariant()
        after = service.money(agents, later)
    finally:
        later.close()
    problems: list[str] = []

    def check(name: str, ours: Decimal, service_says: Decimal) -> None:
        if ours != service_says:
            problems.append(f"{name}: ledger {ours} != service {service_says}")

    stray_fees = sum((x["commission_usd"] for x in strays), ZERO)
    check("25 h later: payer's spend", totals["net_paid"] + totals["fees"] + stray_fees,
          -_moved(before, after, "payer"))
    check("25 h later: house + referral", totals["fees"] + stray_fees,
          (after["house"] - before["house"]) + _moved(before, after, "referrer"))
    if after["payer"]["locked"] != before["payer"]["locked"]:
        problems.append(f"25 h later the payer still has {after['payer']['locked']} locked")
    return problems


SEEN: collections.Counter = collections.Counter()  # what the examples exercised (-s prints it)


def _seen(what: str) -> None:
    SEEN[what] += 1


def _show(entry: Optional[dict]) -> str:
    if entry is None:
        return "no escrow"
    return f"{entry['status']} {entry.get('escrow_id') or ''} (seq {entry.get('seq')})".replace("  ", " ")


def _copy(entry: Optional[dict]) -> Optional[dict]:
    return None if entry is None else json.loads(json.dumps(entry))


# --------------------------------------------------------------------------- fast tier

# The default run is the same every time (derandomized: no flaky red); explore with
# PF_STATEFUL_RANDOM=1 and more examples, e.g. PF_STATEFUL_EXAMPLES=500.
FAST = settings(
    max_examples=int(os.environ.get("PF_STATEFUL_EXAMPLES", "40")),
    stateful_step_count=40,
    deadline=None,
    database=None,
    derandomize=os.environ.get("PF_STATEFUL_RANDOM") != "1",
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=False,
)


@pytest.fixture
def quiet_client_log() -> Iterator[None]:
    """The client warns once per client that a server ignores idempotency keys: thousands here."""
    logger = logging.getLogger("pf_metaflow.client")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture
def no_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry-After waits of the client take no time here (they are counted, not slept)."""
    try:
        from pf_metaflow import retries as waits
    except ImportError:  # the retry policy still lives in the client
        waits = client_mod
    monkeypatch.setattr(waits, "_sleep", lambda seconds: None)


@pytest.mark.parametrize("mode", SERVICES)
def test_settlement_state_machine(mode: str, services: dict[str, Service], no_waits, quiet_client_log) -> None:
    service = services[mode]
    SEEN.clear()
    started = time.monotonic()
    run_state_machine_as_test(lambda: SettlementMachine(service), settings=FAST)
    print(f"\n{mode}: {time.monotonic() - started:.1f} s; exercised:")
    for what, count in sorted(SEEN.items()):
        print(f"  {count:5d}  {what}")


# --------------------------------------------------------------------------- what the machine found


@pytest.mark.parametrize("mode", SERVICES)
def test_an_escrow_locked_after_a_refused_create_stays_on_the_ledger(mode: str, services: dict[str, Service],
                                                                     no_waits, quiet_client_log) -> None:
    """Found by the state machine (minimised): attempt 0's create is refused (402, the payer not
    funded yet), the payer is funded, attempt 1 locks and is SIGKILLed, attempt 2 starts. The
    second escrow reused ref generation 1 from seq 0, so its ``locked`` record tied on seq with the
    refused create's record, which won the merge: the escrow was on no ledger, reconcile could not
    see it, and (live-like) attempt 2 locked a second one."""
    service = services[mode]
    engine = service.engine
    payer = engine.register("repro payer")
    payee = engine.register("repro payee")["agent_id"]
    ref = f"{FLOW}/repro{next(RUN_IDS)}{os.getpid()}/{STEP}/1"
    records: list[dict] = []

    def attempt(no: int) -> TaskEscrow:
        return TaskEscrow(ref, no, read=lambda: list(records), write=lambda e: records.append(_copy(e)),
                          client=lambda: service.client(payer["api_key"]), log=lambda line: None)

    def build(r: str, generation: int) -> dict:
        return ledger_mod.new_entry(ref=r, run=ref.rsplit("/", 2)[0], step=STEP, task="1", attempt=0,
                                    recipient=payee, amount_usdc=Decimal("1.00"),
                                    description=f"pf-metaflow {r} {LABEL}", label=LABEL,
                                    idempotency_key="pfmf-" + hashlib.sha256(r.encode()).hexdigest()[:40])

    first = attempt(0)
    with pytest.raises(InsufficientFunds):  # the service refused: nothing was locked
        first.lock(build)
    first.fail("lock failed: InsufficientFunds", final=False)
    engine.claim(payer["agent_id"], "10")
    locked = attempt(1).lock(build)  # ... and the process is SIGKILLed: no hook runs
    assert locked["status"] == "locked"
    merged = ledger_mod.merge(records)
    assert [(e["escrow_id"], e["status"]) for e in merged] == [(locked["escrow_id"], "locked")], (
        f"the ledger (and so reconcile) does not see funded escrow {locked['escrow_id']}: {merged}; "
        f"records: {[(r['attempt'], r['seq'], r['status'], r['escrow_id']) for r in records]}")
    adopted = attempt(2).lock(build)
    assert adopted["escrow_id"] == locked["escrow_id"]
    assert [x["status"] for x in service.escrows(payer["agent_id"])] == ["funded"]


# --------------------------------------------------------------------------- slow tier: real Metaflow runs

STATEFUL_FLOW = Path(__file__).parent / "flows" / "stateful_flow.py"
SANDBOX_PAYER, SANDBOX_WORKER = "ag_sandbox_payer", "ag_sandbox_worker"
SANDBOX_PAYER_KEY = "pf_sandbox_payer_key"  # the built-in payer's documented sandbox key
ATTEMPT_ACTIONS = ("ok", "raise@body", "raise@after_body", "kill@pre", "kill@body", "kill@after_body",
                   "kill@after_release", "unpicklable", "gate_fails")
# Faults on the run's first create / first release (HTTP only): (answer, acts, kill_task).
HTTP_CREATE_FAULTS = ("none", "http_429", "http_503", "http_500", "timeout", "timeout_acted", "drop_acted",
                      "malformed_acted", "kill", "kill_acted")
HTTP_RELEASE_FAULTS = ("none", "http_429", "http_503", "http_500", "http_500_acted", "timeout",
                       "timeout_acted", "drop_acted", "malformed_acted", "kill", "kill_acted")
CHECK_RECONCILE_EXIT = True
SLOW_TIMEOUT = 1.0  # PF_ESCROW_TIMEOUT for the flows' clients: a "timeout" answers after it


@st.composite
def run_plans(draw, http: bool) -> dict:
    retries = draw(st.integers(0, 2), label="retries")
    plan = {str(a): draw(st.sampled_from(ATTEMPT_ACTIONS), label=f"attempt {a}") for a in range(retries + 1)}
    return {
        "retries": retries,
        "catch": draw(st.booleans(), label="catch"),
        "plan": {a: act for a, act in plan.items() if act != "ok"},
        "create": draw(st.sampled_from(HTTP_CREATE_FAULTS), label="create") if http else "none",
        "release": draw(st.sampled_from(HTTP_RELEASE_FAULTS), label="release") if http else "none",
    }


def _server_rule(op: str, name: str) -> Optional[Rule]:
    fault = Fault.parse(name)
    if fault is None:
        return None
    if fault.kind == "kill":  # the task is SIGKILLed while this request is in flight
        return Rule((PREFIX[op],), "drop" if not fault.acts else "as_is", acts=fault.acts, kill_task=True)
    if fault.kind == "timeout":
        return Rule((PREFIX[op],), "as_is" if fault.acts else "drop", acts=fault.acts, hold=SLOW_TIMEOUT + 0.5)
    return Rule((PREFIX[op],), fault.kind, acts=fault.acts)


def _flow_env(service: Service, root: Path, plan: dict) -> dict:
    env = {"PF_ESCROW_URL": service.url, "PF_ESCROW_TIMEOUT": str(SLOW_TIMEOUT),
           "PFMF_STATEFUL_PLAN": json.dumps(plan.get("plan", {})),
           "PFMF_PID_FILE": str(root / service.mode / "task.pid"), "PFMF_STATEFUL_GO": str(root / "go")}
    if service.server is not None:
        env["PF_API_KEY"] = SANDBOX_PAYER_KEY
    return env


def _options(plan: dict) -> list[str]:
    options = ["--with", f"retry:times={plan['retries']},minutes_between_retries=0"]
    if plan["catch"]:
        options += ["--with", "catch:var=work_error,print_exception=False"]
    return options


def _outcome(ws, pathspec: str, plan: dict) -> tuple[str, str]:
    """(the billable task's ref, what became of its step), from the Metaflow client."""
    task = ws.client_run(pathspec)["start"].task
    ref = "/".join(task.pathspec.split("/"))
    if not task.successful:
        return ref, "failed"
    if "work_error" in task and task["work_error"].data is not None:
        return ref, "caught"
    action = plan["plan"].get(str(task.current_attempt), "ok")
    return ref, "gate_refunded" if action == "gate_fails" else "succeeded"


def _check_run(service: Service, ws, run, plan: dict, before: dict, log: list[str]) -> subprocess.CompletedProcess:
    """One reconcile, then the money checks; returns what reconcile did."""
    agents = {"payer": SANDBOX_PAYER, "payee": SANDBOX_WORKER}
    reconcile = ws.cli("reconcile", run.pathspec, env=_flow_env(service, ws.path.parent, plan))
    log.append(f"--- reconcile (exit {reconcile.returncode}):\n{reconcile.stdout}{reconcile.stderr}")
    ledger = ws.cli_json("ledger", run.pathspec, env=_flow_env(service, ws.path.parent, plan))["entries"]
    log.append("--- ledger:\n" + "\n".join(
        f"  {e['ref']} {e.get('escrow_id')} {e['status']} amount={e['amount_usdc']} fee={e['fee_usdc']} "
        f"net={e['net_usdc']} by={e.get('settled_by')} reason={e.get('reason')}" for e in ledger))
    log.append("--- service:\n" + "\n".join(
        f"  {x['escrow_id']} {x['status']} {x['amount_usd']} {x['description']}"
        for x in service.escrows(SANDBOX_PAYER)))
    ref, outcome = _outcome(ws, run.pathspec, plan)
    log.append(f"--- {ref}: {outcome}")
    problems = settled_problems(ledger, service, agents, before, {ref: outcome})
    assert not problems, "\n".join([*log, "settlement broke its rules:", *problems])
    # reconcile's exit code: 0 when every escrow of the run was seen and is settled; 1 while
    # something is still held or unknown (a create the live-like server cannot tell about).
    expected = 1 if any(e["status"] in ("locked", "unknown") for e in ledger) else 0
    if CHECK_RECONCILE_EXIT:
        assert reconcile.returncode == expected, "\n".join(
            [*log, f"reconcile exited {reconcile.returncode}, expected {expected}"])
    problems = later_problems(ledger, service, agents, before)
    assert not problems, "\n".join([*log, "the service's timeouts broke the ledger:", *problems])
    return reconcile


SLOW = settings(max_examples=int(os.environ.get("PF_STATEFUL_RUNS", "4")), deadline=None, database=None,
                derandomize=os.environ.get("PF_STATEFUL_RANDOM") != "1",
                phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))


@pytest.mark.slow
@pytest.mark.parametrize("mode", SERVICES)
def test_settlement_through_metaflow_runs(mode: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A few runs of tests/flows/stateful_flow.py with drawn retries, @catch, faults per attempt
    and (over HTTP) on the first create and release; one reconcile; the same checks."""
    from hypothesis import given
    from mfrun import Workspace

    @SLOW
    @given(plan=run_plans(mode != "embedded"))
    def one_run(plan: dict) -> None:
        root = tmp_path_factory.mktemp(f"run-{mode}")
        service = Service(mode, root)
        try:
            before = service.money({"payer": SANDBOX_PAYER, "payee": SANDBOX_WORKER})
            (root / "ws").mkdir()
            ws = Workspace(root / "ws")
            if service.server is not None:
                service.server.injector.add(*(r for r in (_server_rule("create", plan["create"]),
                                                          _server_rule("release", plan["release"])) if r))
            run = ws.run_flow(STATEFUL_FLOW, *_options(plan), env=_flow_env(service, root, plan))
            log = [f"plan: {plan}", f"--- run (exit {run.returncode}):", run.output[-6000:]]
            if service.server is not None:
                log.append(f"--- requests: {service.server.injector.log}")
                service.server.injector.clear()
                service.server.listen()
            _check_run(service, ws, run, plan, before, log)
        finally:
            service.close()

    one_run()


@pytest.mark.slow
@pytest.mark.parametrize("mode", SERVICES)
def test_reconcile_while_the_task_runs_leaves_it_alone(mode: str, tmp_path: Path) -> None:
    """Issue 9, case 3: ``pf-metaflow reconcile FLOW/RUN`` while the paid step runs skips it;
    the step then pays its agent, once, and the books agree."""
    from mfrun import Workspace

    service = Service(mode, tmp_path)
    try:
        plan = {"retries": 0, "catch": False, "plan": {"0": "hang@body"}}
        before = service.money({"payer": SANDBOX_PAYER, "payee": SANDBOX_WORKER})
        (tmp_path / "ws").mkdir()
        ws = Workspace(tmp_path / "ws")
        env = {**ws.env, **_flow_env(service, tmp_path, plan)}
        run_id_file = tmp_path / "ws" / "run-id"
        cmd = [sys.executable, str(STATEFUL_FLOW), "--no-pylint", "run", "--run-id-file", str(run_id_file),
               *_options(plan)]
        with subprocess.Popen(cmd, cwd=ws.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as flow:
            output: list[str] = []
            reader = threading.Thread(target=lambda: output.extend(flow.stdout), daemon=True)
            reader.start()
            deadline = time.monotonic() + 120
            while not [x for x in service.escrows(SANDBOX_PAYER) if x["status"] == "funded"]:
                assert flow.poll() is None and time.monotonic() < deadline, "".join(output)
                time.sleep(0.2)
            pathspec = f"StatefulFlow/{run_id_file.read_text().strip()}"
            during = ws.cli("reconcile", pathspec, env=_flow_env(service, tmp_path, plan))
            held = service.escrows(SANDBOX_PAYER)
            (tmp_path / "go").write_text("go")
            flow.wait(timeout=300)
            reader.join(timeout=10)
        log = [f"--- reconcile while running (exit {during.returncode}):\n{during.stdout}{during.stderr}",
               f"--- run (exit {flow.returncode}):", "".join(output)[-6000:]]
        assert [x["status"] for x in held] == ["funded"], "\n".join(log)
        assert "may still be running" in during.stdout, "\n".join(log)
        assert flow.returncode == 0, "\n".join(log)
        run = type("Run", (), {"pathspec": pathspec})()
        _check_run(service, ws, run, plan, before, log)
        assert [x["status"] for x in service.escrows(SANDBOX_PAYER)] == ["released"], "\n".join(log)
    finally:
        service.close()


@pytest.mark.slow
def test_reconcile_exits_0_when_the_last_attempt_was_killed_after_an_earlier_one_finished(
        tmp_path: Path) -> None:
    """Found by the slow tier: reconcile exited 3 ("could not be seen") because reading the run
    took the pf_ledger artifact of the task's latest attempt, which was killed before persisting
    (DataException), although every escrow record was read and the escrow settled."""
    from mfrun import Workspace

    service = Service("embedded", tmp_path)
    try:
        plan = {"retries": 1, "catch": False, "plan": {"0": "raise@body", "1": "kill@after_body"},
                "create": "none", "release": "none"}
        before = service.money({"payer": SANDBOX_PAYER, "payee": SANDBOX_WORKER})
        (tmp_path / "ws").mkdir()
        ws = Workspace(tmp_path / "ws")
        run = ws.run_flow(STATEFUL_FLOW, *_options(plan), env=_flow_env(service, tmp_path, plan))
        assert run.returncode != 0, run.output
        reconcile = _check_run(service, ws, run, plan, before, [f"plan: {plan}", run.output[-4000:]])
        assert reconcile.returncode == 0, reconcile.stdout
    finally:
        service.close()
