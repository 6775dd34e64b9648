"""Issue 9's measured cases, each as a real Metaflow run, money read from the sandbox.

Every flow here (``tests/flows/case_*.py``) runs as ``python flow.py run`` in its own
workspace. What was paid is read from the sandbox escrow itself (its balances, its
escrows, the server's ``GET /escrow/{id}``), not from the test's own arithmetic:

1. paid twice: a body that succeeds, then its artifacts fail to persist, under @retry;
2. retries on a live-like server (``--no-refund --no-idempotency``), with and without a budget;
3. reconcile while a paid task runs; an escrow refunded under a running task;
4. (orchestrator task ids: tests/test_runs.py);
5. ledger fees equal the service's (timeout refunds, server-rounded commissions, referral
   of a release whose answer was lost);
7. budgets cannot be bypassed (shared budget_key, explicit amounts, unsplit foreach);
11. a sandbox payee never reaches a service that is not a sandbox.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from mfrun import FlowRun, Workspace, _flow_name

from pf_metaflow import ledger as ledger_mod
from pf_metaflow import settle
from pf_metaflow.client import EscrowClient
from pf_metaflow.sandbox.engine import SandboxEngine

TESTFLOWS = Path(__file__).parent / "flows"
PAYER, WORKER = "ag_sandbox_payer", "ag_sandbox_worker"
PAYER_KEY = "pf_sandbox_payer_key"  # the built-in payer's documented sandbox key
MINTED = Decimal("1000000")
LIVE_LIKE = ("--no-refund", "--no-idempotency")


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    path = tmp_path / "ws"
    path.mkdir()
    return Workspace(path)


def run(ws: Workspace, flow: str, *args: str, env: dict | None = None) -> FlowRun:
    return ws.run_flow(TESTFLOWS / flow, *args, env=env, timeout=180)


def http_env(server) -> dict:
    return {"PF_ESCROW_URL": server.url, "PF_API_KEY": PAYER_KEY}


def escrows(ws: Workspace) -> list[dict]:
    """Every escrow the sandbox holds (the sandbox can list them; live cannot)."""
    return SandboxEngine(ws.db).list_escrows()


def agent(ws: Workspace, agent_id: str) -> dict:
    return ws.balances()["agents"].get(agent_id, {"usdc": Decimal(0), "locked": Decimal(0)})


def server_escrow(server, escrow_id: str) -> dict:
    """``GET /escrow/{id}`` on the server, amounts as Decimal (as the server wrote them)."""
    answer = requests.get(f"{server.url}/escrow/{escrow_id}",
                          headers={"Authorization": f"Bearer {PAYER_KEY}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return json.loads(answer.text, parse_float=Decimal)


def task_data(ws: Workspace, pathspec: str, step: str):
    [task] = list(ws.client_run(pathspec)[step])
    return task


class Background:
    """A flow run started with Popen (its own process group), to act on while it runs."""

    def __init__(self, ws: Workspace, flow: str, *args: str, env: dict | None = None) -> None:
        self.ws = ws
        self.run_id_file = ws.path / f".run-id-bg-{time.monotonic_ns()}"
        self.log = open(ws.path / "background.log", "w+")
        cmd = [sys.executable, str(TESTFLOWS / flow), "--no-pylint", "run",
               "--run-id-file", str(self.run_id_file), *args]
        self.proc = subprocess.Popen(cmd, cwd=ws.path, env={**ws.env, **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def wait_for(self, path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended before {path.name} appeared:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{path.name} did not appear in {timeout} s:\n{self.output()}")
            time.sleep(0.05)

    @property
    def pathspec(self) -> str:
        return f"{_flow_name(self.output())}/{self.run_id_file.read_text().strip()}"

    def output(self) -> str:
        self.log.flush()
        return (self.ws.path / "background.log").read_text()

    def finish(self, timeout: float = 120) -> FlowRun:
        self.proc.wait(timeout=timeout)
        out = self.output()
        return FlowRun(self.proc.returncode, out, "", self.run_id_file.read_text().strip(), _flow_name(out))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started, nothing else
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def background():
    started: list[Background] = []

    def start(*args, **kwargs) -> Background:
        bg = Background(*args, **kwargs)
        started.append(bg)
        return bg

    yield start
    for bg in started:
        bg.stop()


# --------------------------------------------------------------------------- 1. paid twice


def test_case1_a_task_paid_before_its_artifacts_failed_to_persist_is_not_paid_again(ws):
    """Attempt 0 releases, then Metaflow cannot pickle its lock artifact; attempt 1 runs
    the body again, unpaid."""
    result = run(ws, "case_paid_twice.py")
    assert result.returncode == 0, result.output
    assert "Cannot pickle" in result.output  # attempt 0 really failed after paying
    assert "body of attempt 1 ran" in result.output
    assert "attempt 1 runs unpaid" in result.output

    [escrow] = escrows(ws)
    assert escrow["status"] == "released" and escrow["amount_usd"] == Decimal("1.00")
    assert agent(ws, WORKER)["usdc"] == Decimal("0.99")  # 1.00 less the 1%, once
    assert agent(ws, PAYER) == {"usdc": MINTED - Decimal("1.00"), "locked": Decimal(0)}
    assert ws.balances()["house_fees"] == Decimal("0.01")

    [entry] = ws.ledger(result.pathspec)["entries"]
    assert entry["escrow_id"] == escrow["escrow_id"]
    assert (entry["status"], entry["attempt"], entry["settled_by"]) == ("released", 0, 0)
    assert entry["ref"] == f"{result.pathspec}/work/{entry['task']}"
    assert Decimal(entry["net_usdc"]) == agent(ws, WORKER)["usdc"]
    [artifact] = ws.client_run(result.pathspec).data.pf_ledger
    assert (artifact["escrow_id"], artifact["status"]) == (escrow["escrow_id"], "released")
    ws.engine().check_invariant()


@pytest.mark.slow
def test_case1_the_attempt_that_runs_unpaid_does_not_log_a_payment(ws):
    """Attempt 1 pays nothing: its log must not say "released: ... paid to" a second time."""
    result = run(ws, "case_paid_twice.py")
    assert result.returncode == 0, result.output
    paid_lines = [line for line in result.output.splitlines()
                  if "released: 1.000000 USDC paid to" in line]
    assert len(paid_lines) == 1, "\n".join(paid_lines)


def test_case1_every_attempt_failing_to_persist_still_pays_exactly_once(ws):
    result = run(ws, "case_paid_twice.py", "--every_attempt", "true")
    assert result.returncode != 0, result.output  # the task finally failed
    assert result.output.count("Cannot pickle dump artifact") >= 2
    assert "attempt 1 runs unpaid" in result.output

    [escrow] = escrows(ws)
    assert escrow["status"] == "released"
    assert agent(ws, WORKER)["usdc"] == Decimal("0.99")
    assert agent(ws, PAYER) == {"usdc": MINTED - Decimal("1.00"), "locked": Decimal(0)}
    [entry] = ws.ledger(result.pathspec)["entries"]
    assert (entry["status"], entry["attempt"], entry["settled_by"]) == ("released", 0, 0)
    ws.engine().check_invariant()


# --------------------------------------------------------------------------- 2. live-like retries


def _assert_one_escrow_released_by_the_last_attempt(ws, server, result, amount: Decimal) -> None:
    assert result.returncode == 0, result.output
    assert "flaky attempt 0" in result.output and "flaky attempt 1" in result.output
    assert "BudgetError" not in result.output
    assert "attempt 1 pays from escrow" in result.output and "attempt 2 pays from escrow" in result.output

    [escrow] = escrows(ws)  # one escrow for the task, not one per attempt
    assert escrow["status"] == "released" and escrow["amount_usd"] == amount
    on_server = server_escrow(server, escrow["escrow_id"])
    assert on_server["status"] == "released"

    ledger = ws.ledger(result.pathspec)
    [entry] = ledger["entries"]
    assert entry["escrow_id"] == escrow["escrow_id"]
    assert (entry["status"], entry["attempt"], entry["settled_by"]) == ("released", 0, 2)
    assert Decimal(ledger["totals"]["refund_pending"]) == 0 and Decimal(ledger["totals"]["locked"]) == 0
    assert Decimal(entry["fee_usdc"]) == on_server["commission_usd"]

    assert agent(ws, PAYER) == {"usdc": MINTED - amount, "locked": Decimal(0)}
    assert agent(ws, WORKER)["usdc"] == on_server["net_to_counterparty"] == Decimal(entry["net_usdc"])
    ws.engine().check_invariant()


def test_case2_retries_on_a_live_like_server_share_one_escrow(ws, start_sandbox_server):
    server = start_sandbox_server(ws.db, *LIVE_LIKE)
    result = run(ws, "case_live_retry.py", env=http_env(server))
    _assert_one_escrow_released_by_the_last_attempt(ws, server, result, Decimal("1.25"))


@pytest.mark.slow
def test_case2_budgeted_retries_on_a_live_like_server_start_and_share_one_escrow(ws, start_sandbox_server):
    server = start_sandbox_server(ws.db, *LIVE_LIKE)
    result = run(ws, "case_live_retry_budget.py", env=http_env(server))
    _assert_one_escrow_released_by_the_last_attempt(ws, server, result, Decimal("2.00"))


# --------------------------------------------------------------------------- 3. running tasks


def _started_with_escrow(ws, bg, gate: Path) -> dict:
    bg.wait_for(Path(str(gate) + ".started"))
    [escrow] = escrows(ws)
    assert escrow["status"] == "funded"
    return escrow


def test_case3_reconcile_leaves_a_running_task_alone_and_it_is_paid(ws, background):
    gate = ws.path / "gate"
    bg = background(ws, "case_running_task.py", "--gate", str(gate), env={"PF_LEASE_SECONDS": "10"})
    escrow = _started_with_escrow(ws, bg, gate)

    rec = ws.cli("reconcile", bg.pathspec)
    said = rec.stdout + rec.stderr
    assert [e["status"] for e in escrows(ws)] == ["funded"], f"reconcile touched a running task:\n{said}"
    assert agent(ws, PAYER)["locked"] == Decimal("1.00")
    assert rec.returncode != 0, said
    assert "may still be running" in said and escrow["escrow_id"] in said, said

    gate.touch()
    result = bg.finish()
    assert result.returncode == 0, result.output
    [after] = escrows(ws)
    assert (after["escrow_id"], after["status"]) == (escrow["escrow_id"], "released")
    assert agent(ws, WORKER)["usdc"] == Decimal("0.99")
    assert agent(ws, PAYER) == {"usdc": MINTED - Decimal("1.00"), "locked": Decimal(0)}
    [entry] = ws.ledger(result.pathspec)["entries"]
    assert (entry["status"], entry["settled_by"]) == ("released", 0)
    ws.engine().check_invariant()


def _assert_refunded_and_unpaid(ws, result, escrow) -> dict:
    [after] = escrows(ws)
    assert (after["escrow_id"], after["status"]) == (escrow["escrow_id"], "refunded")
    assert agent(ws, WORKER)["usdc"] == 0
    assert agent(ws, PAYER) == {"usdc": MINTED, "locked": Decimal(0)}
    [entry] = ws.ledger(result.pathspec)["entries"]
    assert entry["status"] == "refunded" and Decimal(entry["net_usdc"]) == 0
    ws.engine().check_invariant()
    return entry


def test_case3_escrow_refunded_under_a_running_task_fails_its_step(ws, background):
    gate = ws.path / "gate"
    bg = background(ws, "case_running_task.py", "--gate", str(gate))
    escrow = _started_with_escrow(ws, bg, gate)
    ws.engine().refund(PAYER, escrow["escrow_id"])  # as an operator (or a forced reconcile) would

    gate.touch()
    result = bg.finish()
    assert result.returncode != 0, f"the step succeeded with its agent unpaid:\n{result.output}"
    assert "PfEscrowReleaseError" in result.output or "could not pay the agent" in result.output
    assert "refunded" in result.output
    _assert_refunded_and_unpaid(ws, result, escrow)


@pytest.mark.slow
def test_case3_escrow_refunded_under_a_running_task_is_recorded_by_catch(ws, background):
    gate = ws.path / "gate"
    bg = background(ws, "case_running_task.py", "--gate", str(gate), "--with", "catch:var=work_error")
    escrow = _started_with_escrow(ws, bg, gate)
    ws.engine().refund(PAYER, escrow["escrow_id"])

    gate.touch()
    result = bg.finish()
    assert result.returncode == 0, result.output  # @catch lets the run go on, and records why
    work = task_data(ws, result.pathspec, "work")
    caught = work["work_error"].data
    assert caught is not None, "the step succeeded silently with its agent unpaid"
    assert "refunded" in str(caught) and escrow["escrow_id"] in str(caught)
    assert "PfEscrowReleaseError" in repr(caught) or "could not pay" in str(caught), repr(caught)
    [artifact] = work["pf_ledger"].data
    assert artifact["status"] == "refunded"
    _assert_refunded_and_unpaid(ws, result, escrow)


@pytest.mark.slow
def test_case3_forced_reconcile_refunds_a_running_task_whose_release_then_fails(ws, background):
    gate = ws.path / "gate"
    bg = background(ws, "case_running_task.py", "--gate", str(gate), env={"PF_LEASE_SECONDS": "10"})
    escrow = _started_with_escrow(ws, bg, gate)

    rec = ws.cli("reconcile", bg.pathspec, "--force")
    assert rec.returncode in (0, 1), rec.stdout + rec.stderr  # 2: --force unknown
    assert [e["status"] for e in escrows(ws)] == ["refunded"], rec.stdout + rec.stderr

    gate.touch()
    result = bg.finish()
    assert result.returncode != 0, f"the step succeeded with its agent unpaid:\n{result.output}"
    assert "refunded" in result.output
    entry = _assert_refunded_and_unpaid(ws, result, escrow)
    assert entry["settled_by"] == "reconcile"


# --------------------------------------------------------------------------- 5. fees


def test_case5_live_timeout_refund_records_the_servers_commission_as_a_fee(ws, start_sandbox_server):
    """(a) a timeout refund keeps the 1%; (b) 0.3001's commission is the server's figure."""
    server = start_sandbox_server(ws.db, *LIVE_LIKE)
    result = run(ws, "case_fees.py", env=http_env(server))
    assert result.returncode == 0, result.output

    ledger = ws.ledger(result.pathspec)
    entries = {e["step"]: e for e in ledger["entries"]}
    assert set(entries) == {"whole", "odd"}
    assert len(escrows(ws)) == 2
    for step, amount in (("whole", Decimal("1.00")), ("odd", Decimal("0.3001"))):
        e = entries[step]
        on_server = server_escrow(server, e["escrow_id"])
        assert on_server["status"] == "funded" and on_server["amount_usd"] == amount
        assert e["status"] == "refund_pending", e
        assert Decimal(e["fee_usdc"]) == on_server["commission_usd"] > 0, (step, e, on_server)
        assert e["expected_at"] == on_server["auto_release_at"]
        assert Decimal(e["net_usdc"]) == 0
    assert Decimal(ledger["totals"]["refund_pending"]) == Decimal("1.3001")
    assert agent(ws, PAYER)["locked"] == Decimal("1.3001")

    # 25 hours on, the service's sweep gives each back less its commission: the ledger's
    # fees are exactly what the payer lost and the house kept.
    SandboxEngine(ws.db, clock=lambda: time.time() + 25 * 3600).expire_due()
    fees = Decimal(ledger["totals"]["fees"])
    assert agent(ws, PAYER) == {"usdc": MINTED - fees, "locked": Decimal(0)}
    assert ws.balances()["house_fees"] == fees
    assert agent(ws, WORKER)["usdc"] == 0
    ws.engine().check_invariant()


LIVE = "https://escrow.purpleflea.com"
KEY = "pf_live_placeholder0000"


@pytest.fixture
def live(requests_mock):
    """The live service as requests-mock plays it: no x-pf-sandbox (no refund, no idempotency)."""
    requests_mock.get(f"{LIVE}/openapi.json", json={"openapi": "3.0.0", "paths": {"/escrow/create": {}}})
    return requests_mock


def _entry(amount: str = "2.50", **over) -> dict:
    base = ledger_mod.new_entry(
        ref="F/1/train/2", run="F/1", step="train", task="2", attempt=0, recipient="ag_worker1",
        amount_usdc=Decimal(amount), description="pf-metaflow F/1/train/2 train",
        idempotency_key="pfmf-abc", timeout_hours=24, referral_code="REF12345",
    )
    base.update(escrow_id="esc_1", status="locked", creator_id="ag_me", **over)
    return base


def _escrow_json(status: str, amount, commission, net, **over) -> dict:
    doc = {
        "escrow_id": "esc_1", "status": status, "amount_usd": amount, "commission_usd": commission,
        "net_to_counterparty": net, "description": "pf-metaflow F/1/train/2 train",
        "creator_id": "ag_me", "counterparty_id": "ag_worker1", "timeout_hours": 24,
        "created_at": "2026-11-21T10:00:00Z", "auto_release_at": "2026-11-22T10:00:00Z",
        "completed_at": None, "released_at": None, "disputed_at": None, "_info": {},
    }
    doc.update(over)
    return doc


def test_case5b_refund_pending_fee_is_the_servers_commission_not_recomputed(live):
    # Live computes 0.3001 * 0.01 in floating point and rounds: 0.003000, where exact
    # decimal arithmetic says 0.003001. What the server says is what it keeps.
    live.get(f"{LIVE}/escrow/esc_1", json=_escrow_json("funded", 0.3001, 0.003, 0.2971))
    out = settle.refund(EscrowClient(LIVE, KEY), _entry("0.3001"), "step failed: boom")
    assert out["status"] == "refund_pending"
    assert out["fee_usdc"] == "0.003000", out
    assert out["expected_at"] == "2026-11-22T10:00:00Z"


def test_case5c_release_whose_answer_was_lost_reports_referral_unknown_not_zero(live):
    live.post(f"{LIVE}/escrow/release/esc_1", exc=requests.exceptions.ReadTimeout("read timed out"))
    live.get(f"{LIVE}/escrow/esc_1", json=_escrow_json("released", 2.5, 0.025, 2.475,
                                                       released_at="2026-11-21T11:00:00Z"))
    out = settle.release(EscrowClient(LIVE, KEY, max_wait=0), _entry(), by=0)
    assert (out["status"], out["fee_usdc"], out["net_usdc"]) == ("released", "0.025000", "2.475000")
    # The live GET carries no referral figure: unknown, never a made-up 0.
    assert out["referral_usdc"] is None, out


def test_case5c_release_refused_409_after_an_earlier_success_reports_referral_unknown(live):
    live.post(f"{LIVE}/escrow/release/esc_1", status_code=409,
              json={"error": "invalid_status", "message": "Escrow is released"})
    live.get(f"{LIVE}/escrow/esc_1", json=_escrow_json("released", 2.5, 0.025, 2.475,
                                                       released_at="2026-11-21T11:00:00Z"))
    client = EscrowClient(LIVE, KEY, max_wait=0)
    assert client.release("esc_1").referral_commission_usd is None
    out = settle.release(client, _entry(), by=0)
    assert out["status"] == "released" and out["referral_usdc"] is None, out


def test_case5c_a_release_answer_keeps_the_referral_the_server_reported(live):
    live.post(f"{LIVE}/escrow/release/esc_1", json={
        "escrow_id": "esc_1", "status": "released", "amount_released": 2.475, "commission": 0.025,
        "referral_commission": 0.00375, "counterparty_id": "ag_worker1", "_info": {}})
    out = settle.release(EscrowClient(LIVE, KEY), _entry(), by=0)
    assert (out["status"], out["referral_usdc"], out["settled_by"]) == ("released", "0.003750", 0)


# --------------------------------------------------------------------------- 7. budgets


def test_item7_two_steps_drawing_on_one_budget_key_are_refused_when_the_flow_is_checked(ws):
    result = run(ws, "case_budget_shared_key.py")
    assert result.returncode != 0, result.output
    assert "budget_key" in result.output or "both draw on the budget" in result.output, result.output
    assert "'first'" in result.output and "'second'" in result.output
    assert "Workflow starting" not in result.output
    assert escrows(ws) == []


def test_item7_explicit_amounts_cannot_pay_on_top_of_a_runs_budget(ws):
    result = run(ws, "case_budget_bypass.py")
    assert result.returncode == 0, result.output

    # Only the planned step was paid, from its share of the 2.00 budget.
    [escrow] = escrows(ws)
    assert escrow["status"] == "released" and escrow["amount_usd"] == Decimal("1.00")
    assert agent(ws, PAYER) == {"usdc": MINTED - Decimal("1.00"), "locked": Decimal(0)}
    [entry] = ws.ledger(result.pathspec)["entries"]
    assert entry["step"] == "planned"

    # An unplanned step with an explicit amount: refused before any escrow, body never ran.
    extra = task_data(ws, result.pathspec, "extra")
    assert "extra_ran" not in extra
    assert "has no share of the run's budget" in str(extra["extra_error"].data)

    # Foreach shards with an explicit amount, their step's budget never split per shard.
    end = ws.client_run(result.pathspec).data
    assert end.shards_ran == [False, False]
    assert all("not split per shard" in e for e in end.shard_errors), end.shard_errors
    ws.engine().check_invariant()


# --------------------------------------------------------------------------- 11. sandbox payees


class _NotASandbox(BaseHTTPRequestHandler):
    """An escrow service that is not a sandbox: /openapi.json without x-pf-sandbox."""

    seen: Counter

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self.seen[f"GET {self.path}"] += 1
        if self.path == "/openapi.json":
            self._answer(200, {"openapi": "3.0.0", "info": {"title": "agent-escrow", "version": "1.0.0"},
                               "paths": {"/escrow/create": {"post": {}}}, "_info": {}})
        elif self.path == "/health":
            self._answer(200, {"status": "ok", "_info": {}})
        else:
            self._answer(404, {"error": "not_found", "_info": {}})

    def do_POST(self):  # noqa: N802
        self.seen[f"POST {self.path}"] += 1
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._answer(500, {"error": "internal_error", "message": "this test server never creates"})

    def log_message(self, *args):
        pass


def test_item11_a_sandbox_payee_is_refused_by_a_service_that_is_not_a_sandbox(ws):
    handler = type("Handler", (_NotASandbox,), {"seen": Counter()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = run(ws, "case_sandbox_payee.py", env={"PF_ESCROW_URL": url, "PF_API_KEY": "pf_live_notasandbox1"})
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode != 0, result.output
    assert "ag_sandbox_worker" in result.output and "not a sandbox" in result.output, result.output
    posts = {k: n for k, n in handler.seen.items() if k.startswith("POST")}
    assert posts == {}, f"the service was asked to act: {posts}"
    assert handler.seen["GET /openapi.json"] >= 1  # it was asked what it is, and said: not a sandbox
    assert "pf_live_notasandbox1" not in result.output
