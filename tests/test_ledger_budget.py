"""Ledger entries, merging and totals; budgets and shard allowances; the ledger card."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pf_metaflow import budget as budget_mod
from pf_metaflow import ledger as ledger_mod
from pf_metaflow.errors import BudgetError


def entry(ref: str, status: str = "released", seq: int = 2, amount: str = "1.000000", **over) -> dict:
    e = ledger_mod.new_entry(ref=ref, run="F/1", step=ref.split("/")[2], task=ref.split("/")[3],
                             attempt=int(ref.split("/")[4]), recipient="ag_w", amount_usdc=Decimal(amount),
                             description=f"pf-metaflow {ref}")
    e.update(status=status, seq=seq, **over)
    return e


# -- ledger ----------------------------------------------------------------------------------


def test_merge_keeps_the_most_advanced_state_of_each_escrow():
    locked = entry("F/1/a/1/0", status="locked", seq=1)
    released = entry("F/1/a/1/0", status="released", seq=2)
    other = entry("F/1/b/2/0")
    assert [e["status"] for e in ledger_mod.merge([locked, other], [released])] == ["released", "released"]
    assert ledger_mod.merge([released], [locked]) == ledger_mod.merge([locked], [released])


def test_merge_keeps_creates_that_never_happened_as_unpaid_work():
    refused = entry("F/1/a/1/0", status=ledger_mod.NOT_CREATED, seq=1, reason="no escrow created (rate limited)")
    assert [(e["status"], e["reason"]) for e in ledger_mod.merge([refused])] == [
        ("not_created", "no escrow created (rate limited)")]
    assert ledger_mod.unpaid(ledger_mod.merge([refused])) == [refused]


def test_a_void_record_of_an_older_run_reads_as_not_created():
    [merged] = ledger_mod.merge([entry("F/1/a/1/0", status="void", seq=1)])
    assert merged["status"] == "not_created"


def test_a_later_create_of_the_same_task_supersedes_its_not_created_record():
    refused = entry("F/1/a/1/0", status="not_created", seq=1)
    retried = [entry("F/1/a/1/0", status="unknown", seq=2), entry("F/1/a/1/0", status="locked", seq=3),
               entry("F/1/a/1/0", status="released", seq=4)]
    for upto in range(1, 4):
        [merged] = ledger_mod.merge([refused], retried[:upto])
        assert merged["status"] == retried[upto - 1]["status"]


def test_not_created_counts_as_work_not_paid_never_as_money_moved():
    entries = [entry("F/1/a/1/0", amount="2.000000", fee_usdc="0.020000", net_usdc="1.980000"),
               entry("F/1/b/2/0", status="not_created", amount="1.500000", shard="b[0]", reason="rate limited"),
               entry("F/1/b/3/0", status="not_created", amount="0.500000", shard="b[1]", reason="rate limited")]
    t = ledger_mod.totals(entries)
    assert (t["not_created"], t["not_created_count"]) == (Decimal("2.000000"), 2)
    assert (t["released"], t["locked"], t["refunded"], t["fees"], t["net_paid"]) == (
        Decimal("2"), 0, 0, Decimal("0.02"), Decimal("1.98"))
    doc = ledger_mod.to_json("F/1", entries)["totals"]
    assert doc["not_created"] == "2.000000" and doc["not_created_count"] == 2
    text = ledger_mod.format_table(entries)
    assert "not paid, no escrow created (2 tasks): 2.000000 USDC" in text
    assert "WARNING: 2 paid tasks went unpaid: b[0], b[1]: no escrow could be created" in text
    assert "why (b[0], b[1]): rate limited" in text
    assert "not_created" in text
    assert "WARNING" not in ledger_mod.format_table(entries[:1])


@given(st.permutations(range(6)))
def test_merge_is_independent_of_the_order_ledgers_arrive_in(order):
    states = [entry(f"F/1/s{i % 3}/{i % 3}/0", status="locked" if i < 3 else "refunded", seq=1 if i < 3 else 2)
              for i in range(6)]
    merged = ledger_mod.merge(*[[states[i]] for i in order])
    assert sorted((e["ref"], e["status"]) for e in merged) == [
        ("F/1/s0/0/0", "refunded"), ("F/1/s1/1/0", "refunded"), ("F/1/s2/2/0", "refunded")]


def test_totals_sum_each_outcome_and_the_fees():
    entries = [
        entry("F/1/a/1/0", amount="2.500000", fee_usdc="0.025000", net_usdc="2.475000"),
        entry("F/1/b/2/0", status="refunded", amount="1.000000"),
        entry("F/1/c/3/0", status="refund_pending", amount="3.000000", fee_usdc="0.030000"),
        entry("F/1/d/4/0", status="locked", amount="0.500000"),
    ]
    t = ledger_mod.to_json("F/1", entries)["totals"]
    assert t == {"locked": "0.500000", "released": "2.500000", "refunded": "1.000000",
                 "refund_pending": "3.000000", "unknown": "0.000000", "not_created": "0.000000",
                 "not_created_count": 0, "fees": "0.055000", "net_paid": "2.475000"}


def test_escrow_map_names_foreach_shards_and_keeps_the_last_attempt():
    entries = [entry("F/1/score/4/0", shard="score[1]", escrow_id="esc_a", status="refunded"),
               entry("F/1/score/4/1", shard="score[1]", escrow_id="esc_b"),
               entry("F/1/train/2/0", escrow_id="esc_c")]
    assert ledger_mod.escrow_map(entries) == {"score[1]": "esc_b", "train": "esc_c"}


def test_table_shows_every_entry_and_the_totals():
    text = ledger_mod.format_table([entry("F/1/train/2/0", escrow_id="esc_c", fee_usdc="0.010000")], title="T")
    assert "esc_c" in text and "train" in text and "released (paid): 1.000000 USDC" in text
    assert "fees: 0.010000 USDC" in text
    assert "(no escrows)" in ledger_mod.format_table([])


def test_ledger_card_has_a_table_of_entries_and_one_of_totals():
    from metaflow.cards import Table

    from pf_metaflow.card import ledger_card

    components = ledger_card([entry("F/1/train/2/0", escrow_id="esc_c")])
    tables = [c for c in components if isinstance(c, Table)]
    assert len(tables) == 2
    rendered = "".join(str(c.render()) for c in components)
    assert "esc_c" in rendered and "released (paid)" in rendered


def test_ledger_card_and_end_summary_name_unpaid_work_and_why():
    from pf_metaflow.card import end_summary, ledger_card

    entries = [entry("F/1/score/2/0", shard="score[0]", escrow_id="esc_a", fee_usdc="0.010000",
                     net_usdc="0.990000"),
               entry("F/1/score/3/0", shard="score[1]", status="not_created",
                     reason="no escrow created (rate limited): create escrow: still full; raise PF_ESCROW_MAX_WAIT")]
    rendered = "".join(str(c.render()) for c in ledger_card(entries))
    assert "WARNING: 1 paid task went unpaid: score[1]" in rendered and "not_created" in rendered
    assert "not paid, no escrow created (1 task)" in rendered and "raise PF_ESCROW_MAX_WAIT" in rendered
    lines = end_summary(entries, outcome="Batch").splitlines()
    assert lines[-1] == "RESULT: UNPAID: no escrow could be created for score[1]"
    assert lines[-2].startswith("WARNING: paid work went unpaid: 1 task (score[1]) did not run because no "
                                "escrow could be created for it (the escrow service's rate limit)")
    assert any(line.startswith("  UNPAID score[1]: no escrow was created, nothing was locked") and
               "raise PF_ESCROW_MAX_WAIT" in line for line in lines)
    assert ", not paid (no escrow created) 1.000000 USDC" in lines[-3]
    assert end_summary(entries[:1]).splitlines()[-1] == "RESULT: OK: all paid work succeeded and was paid"


def test_an_unpaid_stage_caught_by_catch_is_listed_unpaid_not_failed():
    from pf_metaflow.card import end_summary

    entries = [entry("F/1/ingest/2/0", status="not_created", reason="no escrow created (the service "
                     "refused the create: insufficient_balance): not enough")]
    lines = end_summary(entries, {"ingest": RuntimeError("could not lock"), "train": None}).splitlines()
    assert lines[-1] == "RESULT: UNPAID: no escrow could be created for ingest"
    assert not any("FAILED ingest" in line for line in lines)
    assert "(the escrow service's rate limit)" not in lines[-2]


def test_fail_if_unpaid_fails_the_step_only_when_work_went_unpaid():
    from pf_metaflow.card import PfUnpaidWork, fail_if_unpaid

    fail_if_unpaid([entry("F/1/a/1/0")])
    with pytest.raises(PfUnpaidWork, match=r"1 paid task went unpaid \(a\)"):
        fail_if_unpaid([entry("F/1/a/1/0"), entry("F/1/a/2/0", status="not_created")])


# -- budgets ---------------------------------------------------------------------------------


def test_plan_splits_the_total_exactly_by_weight():
    plan = budget_mod.plan_budget("12", {"ingest": 0.15, "train": 0.5, "evaluate": 0.2, "deploy": 0.15},
                                  steps=["start", "ingest", "train", "evaluate", "deploy", "end"])
    assert plan["steps"] == {"ingest": "1.800000", "train": "6.000000", "evaluate": "2.400000", "deploy": "1.800000"}
    assert sum(Decimal(v) for v in plan["steps"].values()) == Decimal("12")


def test_weights_may_sum_to_less_than_one_and_leave_the_rest_unspent():
    plan = budget_mod.plan_budget("10", '{"train": 0.5}', steps=["train"])
    assert plan["steps"] == {"train": "5.000000"}


@pytest.mark.parametrize("weights, message", [
    ('{"train": 0.6, "eval": 0.5}', "more than 1"),
    ('{"trian": 1}', "'trian', which is not a step of this flow"),
    ('{"train": -0.1}', ">= 0"),
    ('{"train": "lots"}', "is not a number"),
    ('["train"]', "must be a JSON object"),
    ('{train: 1}', "is not valid JSON"),
])
def test_bad_weights_are_refused_with_the_reason(weights, message):
    with pytest.raises(BudgetError, match=".*") as err:
        budget_mod.plan_budget("10", weights, steps=["train", "eval"])
    assert message in str(err.value)


@pytest.mark.parametrize("total, message", [("-1", "negative"), ("nan", "finite"), ("0.05", "minimum"),
                                            ("1.0000001", "decimal places")])
def test_bad_totals_are_refused(total, message):
    with pytest.raises(BudgetError) as err:
        budget_mod.plan_budget(total, {"train": 1}, steps=["train"])
    assert message in str(err.value)


def test_a_step_whose_share_is_below_the_escrow_minimum_is_refused():
    with pytest.raises(BudgetError, match="below the 0.100000 USDC escrow minimum"):
        budget_mod.plan_budget("1", {"train": 0.95, "deploy": 0.05}, steps=["train", "deploy"])


@given(total_micro=st.integers(min_value=100_000 * 20, max_value=10**12), shards=st.integers(1, 20))
def test_shard_allowances_add_up_exactly_to_the_step_budget(total_micro, shards):
    total = Decimal(total_micro).scaleb(-6)
    plan = budget_mod.allot_shards({"steps": {"score": str(total)}, "shards": {}}, "score", shards)
    parts = [Decimal(p) for p in plan["shards"]["score"]]
    assert sum(parts) == total and len(parts) == shards
    assert max(parts) - min(parts) <= Decimal("0.000001")


def test_budget_for_reads_the_shard_allowance_inside_a_foreach():
    plan = budget_mod.allot_shards({"steps": {"score": "1.000000"}, "shards": {}}, "score", 3)
    assert [budget_mod.budget_for(plan, "score", i) for i in range(3)] == [
        Decimal("0.333334"), Decimal("0.333333"), Decimal("0.333333")]
    with pytest.raises(BudgetError, match="was split over 3 shards"):
        budget_mod.budget_for(plan, "score", 3)


def test_a_foreach_step_whose_budget_was_not_split_is_refused():
    with pytest.raises(BudgetError, match="call allot_shards"):
        budget_mod.budget_for({"steps": {"score": "1.000000"}, "shards": {}}, "score", 0)


def test_terminal_table_orders_shards_by_index_and_marks_cut_reasons():
    from pf_metaflow import ledger as ledger_mod

    entries = []
    for i in (10, 2, 1):
        e = ledger_mod.new_entry(ref=f"F/1/score/{i}", run="F/1", step="score", task=str(i), attempt=0,
                                 recipient="ag_worker1", amount_usdc=Decimal("1"), description="score it",
                                 shard=f"score[{i}]")
        entries.append({**e, "status": "refunded", "reason": "the shard failed: " + "x" * 80})
    lines = ledger_mod.format_table(entries).splitlines()
    shards = [line.split()[0] for line in lines if line.startswith("score[")]
    assert shards == ["score[1]", "score[2]", "score[10]"]
    assert all(line.endswith("…") for line in lines if line.startswith("score["))
