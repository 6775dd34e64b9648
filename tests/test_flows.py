"""The shipped flows (``flows/``), run for real as a user runs them, with defaults and
with each failure injected.

Every run happens in its own directory with a fresh embedded sandbox, ``METAFLOW_USER``
set and no ``PF_*`` variables. What was paid is read from the run's ledger
(``pf-metaflow ledger --json``), from the sandbox balances (``pf-metaflow sandbox
balance --json``) and from the run's artifacts through the Metaflow client.
"""

from __future__ import annotations

import base64
import json
import re
import time
from decimal import Decimal
from pathlib import Path

import pytest
from mfrun import Workspace
from payments import MINTED, PAYER, assert_client_agrees, assert_paid_exactly, assert_summary_printed, ran


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


# -- training_bounty.py ------------------------------------------------------------------


def test_training_bounty_pays_the_agent_when_held_out_accuracy_meets_the_bar(ws):
    run = ran(ws, "training_bounty.py")
    ledger = assert_paid_exactly(ws, run, released={"train": "3.00"})
    client_run = assert_client_agrees(ws, run, ledger)
    assert client_run["train"].task.data.accuracy >= 0.85
    assert client_run["evaluate"].task.data.bounty_status == "released"
    assert_summary_printed(run, ledger)
    assert last_lines(run, 1) == ["RESULT: OK: all paid work succeeded and was paid"]


def test_training_bounty_refunds_when_accuracy_is_below_min_accuracy(ws):
    run = ran(ws, "training_bounty.py", "--min_accuracy", "0.99", "--step_budget", "2.5")
    ledger = assert_paid_exactly(ws, run, released={}, refunded={"train": "2.50"})
    [entry] = ledger["entries"]
    assert "accuracy >= min_accuracy' does not hold" in entry["reason"] and "min_accuracy=0.99" in entry["reason"]
    assert ws.client_run(run.pathspec)["evaluate"].task.data.bounty_status == "refunded"
    assert_summary_printed(run, ledger)
    assert last_lines(run, 2)[-1] == "RESULT: FAILED: paid work did not succeed in train"
    assert re.search(r"accuracy=0\.\d{4}\b(?!\d)", run.stdout.split("NOT PAID train")[-1])  # readable digits


def test_training_bounty_refunds_when_training_fails_and_the_run_goes_on(ws):
    run = ran(ws, "training_bounty.py", "--fail_at", "train")
    ledger = assert_paid_exactly(ws, run, released={}, refunded={"train": "3.00"})
    assert "InjectedFailure" in ledger["entries"][0]["reason"]
    client_run = assert_client_agrees(ws, run, ledger)
    assert client_run["train"].task.data.train_error is not None
    assert "accuracy" not in client_run["train"].task


# -- data_ingest.py ----------------------------------------------------------------------


def test_data_ingest_pays_for_a_clean_delivery(ws):
    run = ran(ws, "data_ingest.py")
    ledger = assert_paid_exactly(ws, run, released={"ingest": "1.50"})
    client_run = assert_client_agrees(ws, run, ledger)
    ingest = client_run["ingest"].task.data
    assert len(ingest.rows) == 48 and ingest.null_rate <= 0.05
    assert_summary_printed(run, ledger)


@pytest.mark.parametrize("delivery, reason", [
    ("data/deliveries_dirty.csv", "release gate 'null_rate <= max_null_rate' does not hold"),
    pytest.param("data/deliveries_bad_schema.csv",
                 "schema error in data/deliveries_bad_schema.csv line 14: column amount", marks=pytest.mark.slow),
    pytest.param("no/such/delivery.csv", "missing file: no CSV at no/such/delivery.csv", marks=pytest.mark.slow),
], ids=["null-rate", "schema", "missing-file"])
def test_data_ingest_refunds_a_bad_delivery_with_the_validation_reason(ws, delivery, reason):
    run = ran(ws, "data_ingest.py", "--data_path", delivery)
    ledger = assert_paid_exactly(ws, run, released={}, refunded={"ingest": "1.50"})
    assert reason in ledger["entries"][0]["reason"]
    assert "Delivery rejected, escrow refunded" in run.output
    # The last lines end the run with the reason and RESULT: FAILED (a failing gate is work done
    # but not paid; an unreadable delivery is a failed step).
    tail = last_lines(run, 3)
    assert tail[-1] == "RESULT: FAILED: paid work did not succeed in ingest"
    lead = "NOT PAID ingest: refunded: " if "dirty" in delivery else "FAILED ingest: DeliveryRejected: "
    assert f"{lead}{reason}" in tail[0]


# -- batch_shards.py ---------------------------------------------------------------------


def test_batch_of_20_shards_with_2_failures_pays_18_and_refunds_exactly_the_failed_2(ws):
    # A budget that does not divide evenly by 20: the allowances must still add up exactly.
    run = ran(ws, "batch_shards.py", "--num_shards", "20", "--fail_shards", "3,7",
              "--total_budget_usdc", "7.000001")
    client_run = ws.client_run(run.pathspec)
    budget = client_run["start"].task.data.pf_budget
    allowances = [Decimal(a) for a in budget["shards"]["score"]]
    assert len(allowances) == 20
    assert sum(allowances) == Decimal(budget["steps"]["score"]) == Decimal("7.000001")
    assert max(allowances) - min(allowances) == Decimal("0.000001")

    refunded = {f"score[{i}]": allowances[i] for i in (3, 7)}
    released = {f"score[{i}]": allowances[i] for i in range(20) if i not in (3, 7)}
    ledger = assert_paid_exactly(ws, run, released=released, refunded=refunded)
    assert len(released) == 18
    assert_client_agrees(ws, run, ledger)
    join = client_run["join"].task.data
    assert join.refunded_shards == [3, 7] and join.paid_shards == [i for i in range(20) if i not in (3, 7)]
    assert join.rows_scored == 18 * 250
    assert_summary_printed(run, ledger)
    # The batch rows come in shard order (score[2] before score[10]), not as strings sort.
    table = run.stdout.split("Batch payments")[-1].split("released (paid):")[0]
    assert [int(i) for i in re.findall(r"score\[(\d+)\]", table)] == list(range(20))


@pytest.mark.slow
def test_batch_shards_with_defaults_pays_every_shard(ws):
    run = ran(ws, "batch_shards.py")
    ledger = assert_paid_exactly(ws, run, released={f"score[{i}]": "0.625" for i in range(8)})
    assert ws.client_run(run.pathspec)["join"].task.data.refunded_shards == []
    assert_summary_printed(run, ledger)


# -- ml_pipeline_with_payments.py --------------------------------------------------------

STAGES = {"ingest": "1.80", "train": "6.00", "evaluate": "2.40", "deploy": "1.80"}


def card_json(client_run) -> dict:
    from metaflow.cards import get_cards

    html = get_cards(client_run["end"].task)[0].get()
    payload = re.search(r'__MF_DATA__\[[^\]]*\] = "([^"]*)"', html).group(1)
    return json.loads(base64.b64decode(payload))


def test_ml_pipeline_pays_every_stage_from_its_budget_and_renders_the_ledger_card(ws):
    run = ran(ws, "ml_pipeline_with_payments.py")
    ledger = assert_paid_exactly(ws, run, released=STAGES)
    client_run = assert_client_agrees(ws, run, ledger)
    assert client_run["start"].task.data.pf_budget["steps"] == {k: f"{Decimal(v):.6f}" for k, v in STAGES.items()}
    assert client_run.data.deployment["sha256"]
    assert_summary_printed(run, ledger)

    card = json.dumps(card_json(client_run))
    assert "Purple Flea payments" in card
    for entry in ledger["entries"]:
        assert entry["escrow_id"] in card
    assert '["released (paid)", "12.000000 USDC"]' in card


def test_ml_pipeline_skips_deploy_unpaid_when_the_accuracy_gate_fails(ws):
    run = ran(ws, "ml_pipeline_with_payments.py", "--min_accuracy", "0.99")
    released = {k: v for k, v in STAGES.items() if k != "deploy"}
    ledger = assert_paid_exactly(ws, run, released=released)
    client_run = assert_client_agrees(ws, run, ledger)
    assert [s.id for s in client_run] == ["end", "accuracy_gate", "evaluate", "check_model", "train",
                                          "check_data", "ingest", "start"]
    assert "deploy was skipped and not paid" in client_run.data.halted
    assert_summary_printed(run, ledger)


@pytest.mark.parametrize("stage, paid, skipped", [
    pytest.param("train", ["ingest"], ["evaluate", "deploy"], marks=pytest.mark.slow),
    # Slow: the default tier fails the pipeline at evaluate (test_a_run_whose_paid_work_failed_says_so...).
    pytest.param("deploy", ["ingest", "train", "evaluate"], [], marks=pytest.mark.slow),
    pytest.param("ingest", [], ["train", "evaluate", "deploy"], marks=pytest.mark.slow),
    pytest.param("evaluate", ["ingest", "train"], ["deploy"], marks=pytest.mark.slow),
])
def test_ml_pipeline_refunds_a_failed_stage_and_bills_nothing_after_it(ws, stage, paid, skipped):
    run = ran(ws, "ml_pipeline_with_payments.py", "--fail_at", stage)
    ledger = assert_paid_exactly(ws, run, released={k: STAGES[k] for k in paid}, refunded={stage: STAGES[stage]})
    assert f"failure injected in step '{stage}'" in ledger["entries"][-1]["reason"]
    client_run = assert_client_agrees(ws, run, ledger)
    assert not {s.id for s in client_run} & set(skipped)
    assert_summary_printed(run, ledger)


@pytest.mark.slow
def test_ml_pipeline_with_a_budget_that_names_no_real_step_fails_before_any_escrow(ws):
    run = ws.run_flow("ml_pipeline_with_payments.py", "--step_weights", '{"ingest": 0.5, "trian": 0.5}')
    assert run.returncode != 0 and "Traceback" not in run.output
    assert "'trian', which is not a step of this flow" in run.output
    assert not ws.db.exists() or ws.balances()["agents"][PAYER]["usdc"] == MINTED


# -- the live service: agent_wallet must be given ----------------------------------------

LIVE = {"PF_ESCROW_URL": "https://escrow.example.invalid", "PF_API_KEY": "pf_live_placeholder000"}


@pytest.mark.parametrize("flow", ["training_bounty.py", *(pytest.param(f, marks=pytest.mark.slow) for f in (
    "data_ingest.py", "batch_shards.py", "ml_pipeline_with_payments.py"))])
def test_on_the_live_service_a_run_without_agent_wallet_stops_before_it_starts(ws, flow):
    started = time.monotonic()
    run = ws.run_flow(flow, env=LIVE, timeout=60)
    assert run.returncode != 0
    assert time.monotonic() - started < 30
    assert "--agent_wallet is required: PF_ESCROW_URL points at the live Purple Flea service" in run.output
    assert run.run_id is None and not list(ws.path.glob(".metaflow/*/[0-9]*")), "no run was started"
    assert "pf_live_placeholder000" not in run.output

    helped = ws.run_flow(flow, "--help", env=LIVE, timeout=60)
    assert helped.returncode == 0 and "--agent_wallet TEXT" in helped.stdout, "--help still works"


# -- budgets through Metaflow's Runner API -----------------------------------------------


RUNNER_SCRIPT = """
import json, sys
from decimal import Decimal
from metaflow import Runner

budget = {"int": 12, "str": "12.00", "Decimal": Decimal("12"), "float": 12.0}[sys.argv[2]]
with Runner(sys.argv[1], show_output=False).run(total_budget_usdc=budget) as running:
    print(json.dumps({"status": running.status, "pathspec": running.run.pathspec}))
"""


@pytest.mark.parametrize("budget", ["Decimal", *(pytest.param(b, marks=pytest.mark.slow)
                                                  for b in ("int", "str", "float"))])
def test_runner_api_takes_the_budget_as_a_number_and_the_ledger_totals_are_exactly_12(ws, budget):
    # In a subprocess run from the workspace, as a user's script runs: Metaflow finds
    # pf-metaflow's extension (which teaches the Runner the USDC type) through the install.
    import subprocess
    import sys

    script = ws.path / "run_pipeline.py"
    script.write_text(RUNNER_SCRIPT)
    flow = str(Path(__file__).resolve().parent.parent / "flows" / "ml_pipeline_with_payments.py")
    proc = subprocess.run([sys.executable, str(script), flow, budget], cwd=ws.path, env=ws.env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "successful"
    ledger = ws.ledger(result["pathspec"])
    assert ledger["totals"]["released"] == "12.000000"
    assert sum(Decimal(e["amount_usdc"]) for e in ledger["entries"]) == Decimal("12")
    assert ws.client_run(result["pathspec"])["start"].task.data.pf_budget["total_usdc"] == "12.000000"


# Slow: test_batch_of_20_shards_with_2_failures... splits the same 7.000001 exactly in the default tier.
@pytest.mark.parametrize("budget", [pytest.param(b, marks=pytest.mark.slow) for b in ("7.000001", "12.5")])
def test_a_budget_given_on_the_command_line_stays_exact(ws, budget):
    run = ran(ws, "batch_shards.py", "--num_shards", "3", "--total_budget_usdc", budget)
    ledger = ws.ledger(run.pathspec)
    assert sum(Decimal(e["amount_usdc"]) for e in ledger["entries"]) == Decimal(budget)


# -- end summaries: the last lines say how the paid work ended ---------------------------


def last_lines(run, n: int = 4) -> list[str]:
    body = [re.sub(r"^\S+ \S+ \[[^\]]+\] ", "", line) for line in run.stdout.splitlines()
            if "/end/" in line and "Task finished" not in line]
    return body[-n:]


def test_a_run_whose_paid_work_failed_says_so_in_its_last_lines(ws):
    run = ran(ws, "ml_pipeline_with_payments.py", "--fail_at", "evaluate")
    tail = last_lines(run)
    assert tail[-1] == "RESULT: FAILED: paid work did not succeed in evaluate"
    assert tail[-2] == ("Paid 7.800000 USDC (7.722000 to agents after 0.078000 fees), refunded 2.400000 USDC, "
                        "left pending 0.000000 USDC")
    assert ("FAILED evaluate: InjectedFailure: failure injected in step 'evaluate' (--fail_at evaluate) "
            "(its escrow was refunded)") in tail[-3]
    assert "Pipeline stopped early: evaluate failed; deploy was not run" in tail[-4]


