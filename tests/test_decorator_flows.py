"""pf_escrow_step through real Metaflow runs against the embedded sandbox.

Each test runs flows as a user would (``python flow.py run ...`` in a fresh
directory) and reads the outcome three ways: the sandbox balances, the run's
ledger (``pf-metaflow ledger --json``) and the Metaflow client.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from mfrun import DECORATED_START_FLOW, Workspace, write_flow

TESTFLOWS = Path(__file__).parent / "flows"
MINTED = Decimal("1000000")
PAYER, WORKER = "ag_sandbox_payer", "ag_sandbox_worker"


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def run_ok(ws: Workspace, flow: str, *args: str, env: dict | None = None):
    result = ws.run_flow(TESTFLOWS / flow, *args, env=env)
    assert result.returncode == 0, result.output
    return result


def statuses(ledger: dict) -> list[tuple[str, int, str]]:
    return sorted((e["shard"] or e["step"], e["attempt"], e["status"]) for e in ledger["entries"])


def payer_spent(ws: Workspace) -> Decimal:
    b = ws.balances()
    return MINTED - b["agents"][PAYER]["usdc"] - b["agents"][PAYER]["locked"]


def assert_conserved(ws: Workspace) -> None:
    ws.engine().check_invariant()


# -- settlement --------------------------------------------------------------------------


def test_successful_step_releases_exactly_once(ws):
    run = run_ok(ws, "pay_flow.py")
    ledger = ws.ledger(run.pathspec)
    [entry] = ledger["entries"]
    assert (entry["step"], entry["status"]) == ("work", "released")
    assert (entry["amount_usdc"], entry["fee_usdc"], entry["net_usdc"]) == ("2.500000", "0.025000", "2.475000")
    assert ws.engine().get(entry["escrow_id"])["status"] == "released"
    assert len(ws.engine().list_escrows()) == 1
    b = ws.balances()
    assert b["agents"][PAYER]["usdc"] == MINTED - Decimal("2.5")
    assert b["agents"][WORKER]["usdc"] == Decimal("2.475")
    assert b["house_fees"] == Decimal("0.025")
    assert ledger["totals"]["released"] == "2.500000" and ledger["totals"]["net_paid"] == "2.475000"
    assert_conserved(ws)


def test_ledger_and_escrow_ids_are_run_artifacts_readable_with_the_metaflow_client(ws):
    run = run_ok(ws, "pay_flow.py")
    data = ws.client_run(run.pathspec).data
    [entry] = data.pf_ledger
    assert data.pf_escrows == {"work": entry["escrow_id"]}
    assert entry["status"] == "released" and entry["recipient"] == WORKER
    assert entry["description"].startswith(f"pf-metaflow {run.pathspec}/work/")


def test_failing_step_under_catch_refunds_once_and_the_run_continues(ws):
    run = run_ok(ws, "pay_flow.py", "--mode", "fail")
    [entry] = ws.ledger(run.pathspec)["entries"]
    assert entry["status"] == "refunded"
    assert "ValueError: the work went wrong" in entry["reason"]
    assert "the work went wrong" in ws.client_run(run.pathspec).data.caught
    assert payer_spent(ws) == 0 and ws.balances()["agents"][WORKER]["usdc"] == 0
    assert ws.engine().get(entry["escrow_id"])["status"] == "refunded"
    assert_conserved(ws)


def test_release_gate_that_does_not_hold_refunds_with_its_reason(ws):
    run = run_ok(ws, "pay_flow.py", "--score", "0.5")
    [entry] = ws.ledger(run.pathspec)["entries"]
    assert entry["status"] == "refunded"
    assert "accuracy >= min_score" in entry["reason"] and "does not hold" in entry["reason"]
    assert "accuracy=0.5" in entry["reason"]
    assert payer_spent(ws) == 0


def test_timeout_counts_as_failure_and_refunds(ws):
    run = run_ok(ws, "pay_flow.py", "--mode", "timeout")
    [entry] = ws.ledger(run.pathspec)["entries"]
    assert entry["status"] == "refunded" and "TimeoutException" in entry["reason"]
    assert payer_spent(ws) == 0
    assert_conserved(ws)


def test_retries_share_one_escrow_released_once_by_the_attempt_that_succeeds(ws):
    run = run_ok(ws, "retry_flow.py")
    ledger = ws.ledger(run.pathspec)
    [entry] = ledger["entries"]
    assert (entry["step"], entry["attempt"], entry["settled_by"], entry["status"]) == ("work", 0, 2, "released")
    [escrow] = ws.engine().list_escrows()
    assert escrow["escrow_id"] == entry["escrow_id"] and escrow["status"] == "released"
    assert payer_spent(ws) == Decimal("1.25")
    assert ws.balances()["agents"][WORKER]["usdc"] == Decimal("1.25") - Decimal("0.0125")
    assert "attempt 1 pays from escrow" in run.output and "attempt 2 pays from escrow" in run.output
    assert ws.client_run(run.pathspec).data.pf_escrows == {"work": entry["escrow_id"]}
    assert_conserved(ws)


def test_attempts_killed_after_the_escrow_is_created_hand_it_to_the_next_attempt(ws):
    run = run_ok(ws, "retry_flow.py", "--kill", "true")
    [entry] = ws.ledger(run.pathspec)["entries"]
    assert (entry["attempt"], entry["settled_by"], entry["status"]) == (0, 2, "released")
    assert len(ws.engine().list_escrows()) == 1
    assert payer_spent(ws) == Decimal("1.25")
    assert ws.balances()["agents"][PAYER]["locked"] == 0
    assert_conserved(ws)


def test_task_killed_under_catch_is_settled_by_the_fallback_attempt(ws):
    run = run_ok(ws, "pay_flow.py", "--mode", "kill")
    [entry] = ws.ledger(run.pathspec)["entries"]
    assert entry["status"] == "refunded" and "ended before settling" in entry["reason"]
    assert entry["settled_by"] == 1
    assert payer_spent(ws) == 0 and ws.balances()["agents"][PAYER]["locked"] == 0
    assert_conserved(ws)


def test_killed_task_is_settled_by_reconcile_and_a_second_reconcile_changes_nothing(ws):
    run = ws.run_flow(TESTFLOWS / "kill_flow.py")
    assert run.returncode != 0
    [entry] = ws.ledger(run.pathspec)["entries"]
    assert entry["status"] == "locked"
    assert ws.balances()["agents"][PAYER]["locked"] == Decimal("2.5")

    first = ws.cli("reconcile", run.pathspec)
    assert first.returncode == 0, first.stderr
    assert f"{entry['escrow_id']}" in first.stdout and "locked -> refunded" in first.stdout
    [after] = ws.ledger(run.pathspec)["entries"]
    assert after["status"] == "refunded"
    assert payer_spent(ws) == 0 and ws.balances()["agents"][PAYER]["locked"] == 0

    second = ws.cli("reconcile", run.pathspec)
    assert second.returncode == 0 and "nothing to do" in second.stdout
    assert payer_spent(ws) == 0
    assert_conserved(ws)


def test_reconcile_dry_run_moves_no_money(ws):
    run = ws.run_flow(TESTFLOWS / "kill_flow.py")
    dry = ws.cli("reconcile", run.pathspec, "--dry-run")
    assert dry.returncode == 1 and "would settle" in dry.stdout  # 1: something to settle
    assert ws.balances()["agents"][PAYER]["locked"] == Decimal("2.5")
    assert ws.ledger(run.pathspec)["entries"][0]["status"] == "locked"


# -- joins, --with, resume ---------------------------------------------------------------


def test_with_on_a_flow_that_never_imports_pf_metaflow_ledgers_every_task(ws):
    run = run_ok(ws, "plain_fanout.py", "--with", "pf_escrow_step:agent_wallet=ag_sandbox_worker,amount_usdc=0.5")
    expected = {"start", "work[0]", "work[1]", "work[2]", "work[3]", "join", "end"}
    data = ws.client_run(run.pathspec).data
    assert {e["shard"] or e["step"] for e in data.pf_ledger} == expected
    assert set(data.pf_escrows) == expected
    cli_ledger = ws.ledger(run.pathspec)
    assert {e["shard"] or e["step"] for e in cli_ledger["entries"]} == expected
    assert {e["status"] for e in cli_ledger["entries"]} == {"released"}
    assert cli_ledger["totals"]["released"] == "3.500000"
    assert payer_spent(ws) == Decimal("3.5")
    assert_conserved(ws)


def test_with_and_a_failed_branch_refunds_only_that_branch(ws):
    run = ws.run_flow(TESTFLOWS / "plain_fanout.py", "--fail_item", "3",
                      "--with", "pf_escrow_step:agent_wallet=ag_sandbox_worker,amount_usdc=0.5,steps=work")
    assert run.returncode != 0  # no @catch: the run fails, but its money is settled
    by_shard = {e["shard"]: e["status"] for e in ws.ledger(run.pathspec)["entries"]}
    assert by_shard["work[2]"] == "refunded"
    assert sorted(by_shard) == ["work[0]", "work[1]", "work[2]", "work[3]"]
    assert ws.balances()["agents"][PAYER]["locked"] == 0
    assert_conserved(ws)


def test_resume_pays_nothing_twice(ws):
    (ws.path / "broken").write_text("x")
    first = ws.run_flow(TESTFLOWS / "resume_flow.py")
    assert first.returncode != 0
    assert statuses(ws.ledger(first.pathspec)) == [("start", 0, "released"), ("work", 0, "refunded")]
    (ws.path / "broken").unlink()
    resumed = ws.run_flow(TESTFLOWS / "resume_flow.py", command="resume")
    assert resumed.returncode == 0, resumed.output
    assert payer_spent(ws) == Decimal("0.75") + Decimal("1.50")
    escrows = ws.engine().list_escrows()
    assert sorted(e["status"] for e in escrows) == ["refunded", "released", "released"]
    ledger = ws.client_run(resumed.pathspec).data.pf_ledger
    assert [(e["step"], e["status"]) for e in ledger] == [("start", "released"), ("work", "released")]
    assert ledger[0]["run"] == first.pathspec  # carried over by resume, not paid again
    assert_conserved(ws)


# -- budgets -------------------------------------------------------------------------------


def test_budget_splits_exactly_over_steps_and_shards(ws):
    run = run_ok(ws, "budget_flow.py", "--total_budget_usdc", "3.10", "--num_shards", "3")
    ledger = ws.ledger(run.pathspec)
    amounts = {e["shard"] or e["step"]: Decimal(e["amount_usdc"]) for e in ledger["entries"]}
    assert amounts == {"prep": Decimal("1.55"), "shard[0]": Decimal("0.516667"),
                       "shard[1]": Decimal("0.516667"), "shard[2]": Decimal("0.516666")}
    assert sum(amounts.values()) == Decimal("3.10")
    assert payer_spent(ws) == Decimal("3.10")
    # The flow's join never mentions pf-metaflow, yet `end` holds every shard's entry.
    run_obj = ws.client_run(run.pathspec)
    assert {e["shard"] or e["step"] for e in run_obj.data.pf_ledger} == set(amounts)
    import pf_metaflow

    assert pf_metaflow.ledger_of(run.pathspec) == ledger["entries"]


# One row per tier is enough to show a real run stops before any escrow; the other rows (each
# message is also checked without a flow run in tests/test_bad_input.py) run under -m slow.
@pytest.mark.parametrize("args, message", [
    (["--step_weights", '{"prep": 0.7, "shard": 0.5}'], "more than 1"),
    *(pytest.param(*row, marks=pytest.mark.slow) for row in [
        (["--step_weights", '{"prep": 0.5, "shrad": 0.5}'], "'shrad', which is not a step"),
        (["--step_weights", '{"prep": -0.5, "shard": 0.5}'], "must be a finite number >= 0"),
        (["--total_budget_usdc", "1.00", "--num_shards", "20"], "below the 0.100000 USDC minimum"),
        (["--total_budget_usdc", "nan"], "finite"),
    ]),
])
def test_budget_errors_are_raised_before_any_escrow_is_created(ws, args, message):
    run = ws.run_flow(TESTFLOWS / "budget_flow.py", *args)
    assert run.returncode != 0
    assert message in run.output
    assert ws.engine().list_escrows() == []


# -- graph-time checks -----------------------------------------------------------------------

# Two rows in the default tier (an amount, a release gate); the rest run under -m slow.
@pytest.mark.parametrize("args, message", [
    ('agent_wallet="ag_sandbox_worker", amount_usdc=0.05', "below the Purple Flea escrow minimum"),
    ('agent_wallet="ag_sandbox_worker", amount_usdc=1, release_if="accuracy >>= 3"',
     "release_if 'accuracy >>= 3': the right side must be"),
    *(pytest.param(*row, marks=pytest.mark.slow) for row in [
        ('agent_wallet="ag_sandbox_worker", amount_usdc="2.1234567"', "more than 6 decimal places"),
        ('agent_wallet="ag_sandbox_worker", amount_usdc=-1', "must not be negative"),
        ('agent_wallet="0xABC123", amount_usdc=1', "looks like an on-chain wallet address"),
        ('agent_wallet="bob smith", amount_usdc=1', "is not a Purple Flea agent id"),
        ('agent_wallet="ag_sandbox_worker", budget_key="trian"', "budget_key 'trian' is not a step"),
        ('agent_wallet="ag_sandbox_worker", amount_usdc=1, timeout_hours=0', "timeout_hours must be"),
    ]),
])
def test_wrong_use_is_caught_when_the_flow_is_checked(ws, args, message):
    flow = write_flow(ws.path, "bad_flow.py", DECORATED_START_FLOW.format(args=args))
    run = ws.run_flow(flow)
    assert run.returncode != 0
    assert "Invalid @pf_escrow_step" in run.output and message in run.output
    assert "Task is starting" not in run.output
    assert not ws.db.exists() or ws.engine().list_escrows() == []


def test_escrow_settings_from_secrets_apply_whatever_the_decorator_order(ws):
    secret_db = ws.path / "from-secret.db"
    run = run_ok(ws, "secrets_flow.py", env={"SECRET_DB": str(secret_db)})
    from pf_metaflow.sandbox.engine import SandboxEngine

    [escrow] = SandboxEngine(secret_db).list_escrows()
    assert escrow["status"] == "released"
    assert ws.ledger(run.pathspec)["entries"][0]["escrow_id"] == escrow["escrow_id"]
    assert not ws.db.exists() or ws.engine().list_escrows() == []
