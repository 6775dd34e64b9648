"""Preflight: each setup mistake stops a real run in ``start``, before any paid step, with one
line naming the problem and the fix (no traceback), and the sandbox shows no money moved."""

from __future__ import annotations

import re
import socket
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from mfrun import FlowRun, Workspace
from payments import MINTED, PAYER, WORKER

from pf_metaflow.sandbox.engine import PAYER_KEY, SandboxEngine

HEADLINE = "pf-metaflow preflight failed (no escrow was created, no money moved):"
LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \[[^\]]+\] ")
ML = "ml_pipeline_with_payments.py"


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def problem_line(run: FlowRun) -> str:
    """The one line the user reads: the one after the preflight headline."""
    lines = [LOG_PREFIX.sub("", line) for line in run.output.splitlines()]
    assert HEADLINE in lines, run.output
    return lines[lines.index(HEADLINE) + 1]


def assert_stopped_in_start(ws: Workspace, run: FlowRun, *fragments: str, db: Path | None = None) -> str:
    assert run.returncode != 0, run.output
    assert "Traceback" not in run.output, run.output
    assert "Step start (task-id 1) failed." in run.output
    assert "Task is starting" not in run.output.split("start/1")[-1], "no step after start ran"
    line = problem_line(run)
    for fragment in fragments:
        assert fragment in line, line
    assert_no_money_moved(db or ws.db)
    return line


def assert_no_money_moved(db: Path) -> None:
    if not db.exists():
        return
    balances = SandboxEngine(db).balances()
    assert balances["agents"][PAYER] == {"usdc": MINTED, "locked": Decimal(0)}
    assert balances["agents"][WORKER] == {"usdc": Decimal(0), "locked": Decimal(0)}
    assert balances["house_fees"] == 0
    assert SandboxEngine(db).list_escrows() == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the payee ----------------------------------------------------------------------------


def test_paying_the_payer_itself_stops_in_start(ws):
    run = ws.run_flow(ML, "--agent_wallet", PAYER)
    assert_stopped_in_start(ws, run, "--agent_wallet ag_sandbox_payer is the payer itself",
                            "pay another agent")


@pytest.mark.slow
def test_an_agent_unknown_to_the_sandbox_stops_in_start(ws):
    run = ws.run_flow(ML, "--agent_wallet", "ag_nobody")
    assert_stopped_in_start(ws, run, "ag_nobody is not an agent of the sandbox at", "pf-metaflow sandbox register")


@pytest.mark.slow
def test_a_wallet_address_instead_of_an_agent_id_stops_in_start(ws):
    run = ws.run_flow("training_bounty.py", "--agent_wallet", "0xdeadbeef")
    assert_stopped_in_start(ws, run, "looks like an on-chain wallet address", "agent ids (ag_…)")


# -- the escrow service -------------------------------------------------------------------


def test_a_remote_url_without_a_key_stops_in_start(ws):
    run = ws.run_flow("data_ingest.py", "--agent_wallet", "ag_someone",
                      env={"PF_ESCROW_URL": "https://escrow.example.invalid"})
    assert_stopped_in_start(ws, run, "no API key for the escrow service at https://escrow.example.invalid",
                            "set PF_API_KEY")


@pytest.mark.slow
def test_a_key_over_plain_http_to_a_remote_host_stops_in_start(ws):
    run = ws.run_flow("training_bounty.py", "--agent_wallet", "ag_someone",
                      env={"PF_ESCROW_URL": "http://10.9.8.7:8765", "PF_API_KEY": "pf_live_placeholder000"})
    line = assert_stopped_in_start(ws, run, "refusing to send the API key over plain http to 10.9.8.7",
                                   "use https://")
    assert "pf_live_placeholder000" not in run.output and line


def test_an_unreachable_service_stops_in_start(ws):
    url = f"http://127.0.0.1:{free_port()}"
    run = ws.run_flow("training_bounty.py", env={"PF_ESCROW_URL": url, "PF_API_KEY": PAYER_KEY,
                                                 "PF_ESCROW_MAX_WAIT": "0.5"})
    assert_stopped_in_start(ws, run, f"the escrow service (PF_ESCROW_URL='{url}') did not answer",
                            "pf-metaflow sandbox serve")


def test_a_local_sandbox_server_is_not_the_live_service(ws, start_sandbox_server):
    server = start_sandbox_server(ws.path / "server.db")
    env = {"PF_ESCROW_URL": server.url, "PF_API_KEY": PAYER_KEY}
    run = ws.run_flow("training_bounty.py", env=env)
    assert run.returncode == 0, run.output
    assert "--agent_wallet is required" not in run.output
    assert SandboxEngine(server.db).balances()["agents"][WORKER]["usdc"] == Decimal("2.97")

    selfpay = ws.run_flow("training_bounty.py", "--agent_wallet", PAYER, env=env)
    assert selfpay.returncode != 0 and "is the payer itself" in problem_line(selfpay)
    stranger = ws.run_flow("training_bounty.py", "--agent_wallet", "ag_nobody", env=env)
    assert f"ag_nobody is not an agent of the sandbox at {server.url}" in problem_line(stranger)
    assert SandboxEngine(server.db).balances()["agents"][WORKER]["usdc"] == Decimal("2.97"), "nothing more moved"


def test_the_live_service_message_says_which_url_was_seen(ws):
    run = ws.run_flow("training_bounty.py", env={"PF_ESCROW_URL": "https://escrow.example.invalid/",
                                                 "PF_API_KEY": "pf_live_placeholder000"}, timeout=60)
    assert run.returncode != 0 and run.run_id is None
    assert "PF_ESCROW_URL='https://escrow.example.invalid' is neither sandbox: nor a loopback" in run.output


# -- budgets, weights and amounts ---------------------------------------------------------


def test_weights_that_leave_out_a_paid_step_stop_in_start(ws):
    run = ws.run_flow(ML, "--step_weights", '{"ingest": 0.2, "train": 0.6, "evaluate": 0.2}')
    assert_stopped_in_start(ws, run, "paid step 'deploy' has no share of the budget",
                            "give 'deploy' a weight in --step_weights")


@pytest.mark.slow
def test_a_zero_weight_for_a_paid_step_stops_in_start(ws):
    run = ws.run_flow(ML, "--step_weights", '{"ingest": 0.2, "train": 0.6, "evaluate": 0.2, "deploy": 0}')
    assert_stopped_in_start(ws, run, "paid step 'deploy' has no share of the budget (step_weights gives it 0")


def test_a_share_below_the_escrow_minimum_stops_in_start_without_a_traceback(ws):
    run = ws.run_flow(ML, "--total_budget_usdc", "0.5")
    assert_stopped_in_start(ws, run, "below the 0.100000 USDC escrow minimum", "raise total_budget_usdc")


def test_a_budget_that_is_not_a_number_is_refused_by_the_command_line(ws):
    run = ws.run_flow(ML, "--total_budget_usdc", "12,5")
    assert run.returncode == 2 and run.run_id is None
    assert "Invalid value for '--total_budget_usdc': --total_budget_usdc is not a number" in run.output
    assert "Traceback" not in run.output and not ws.db.exists()


def test_a_bad_fail_at_is_a_preflight_line_not_a_traceback(ws):
    run = ws.run_flow(ML, "--fail_at", "trian")
    assert_stopped_in_start(ws, run, "--fail_at names trian")


# -- timeouts -----------------------------------------------------------------------------

TIMEOUT_FLOW = textwrap.dedent('''
    from metaflow import FlowSpec, Parameter, step, timeout
    from pf_metaflow import pf_escrow_step, sandbox_or_required_agent
    from pf_metaflow.preflight import preflight

    class LongTimeoutFlow(FlowSpec):
        agent_wallet = Parameter("agent_wallet", default=sandbox_or_required_agent, show_default=False)

        @step
        def start(self):
            preflight(self)
            self.next(self.work)

        @timeout(hours=30)
        @pf_escrow_step(amount_usdc="1.00", timeout_hours=24)
        @step
        def work(self):
            self.next(self.end)

        @step
        def end(self):
            pass

    if __name__ == "__main__":
        LongTimeoutFlow()
''')


def test_a_step_timeout_longer_than_its_escrow_stops_in_start(ws):
    flow = ws.path / "long_timeout.py"
    flow.write_text(TIMEOUT_FLOW)
    run = ws.run_flow(flow)
    assert_stopped_in_start(ws, run, "step 'work': its @timeout (30 h) outlasts its escrow (timeout_hours=24)",
                            "raise timeout_hours")
