"""The sandbox escrow engine: live rules, sandbox extensions, conservation of money."""

from __future__ import annotations

import os
import sqlite3
from decimal import Decimal

import pytest

from pf_metaflow.errors import (
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAgentId,
    InvalidAmount,
    InvalidDescription,
    InvalidRequest,
    InvalidStatus,
    NotFound,
    PermissionDenied,
    ServiceUnavailable,
)
from pf_metaflow.ids import AGENT_ID_RE, check_api_key
from pf_metaflow.sandbox import engine as engine_module
from pf_metaflow.sandbox.engine import PAYER_KEY, WORKER_KEY, SandboxEngine

D = Decimal
PAYER = "ag_sandbox_payer"
WORKER = "ag_sandbox_worker"
START = D("1000000.000000")


@pytest.fixture(autouse=True)
def _invariant_after_each_test(request):
    engines = [request.getfixturevalue(name) for name in ("engine", "clocked_engine")
               if name in request.fixturenames]
    yield
    for engine in engines:
        engine.check_invariant()


def create(engine, amount="1.00", creator=PAYER, counterparty=WORKER, **kwargs):
    record, replayed = engine.create(
        creator, amount_usd=D(amount), description=kwargs.pop("description", "label data"),
        counterparty_agent_id=counterparty, **kwargs,
    )
    assert replayed is False
    return record


def usdc(engine, agent):
    return engine.balance(agent)["usdc"]


def funded_agent(engine, name="alice", amount="10"):
    agent = engine.register(name)
    engine.claim(agent["agent_id"], D(amount))
    return agent


# -- a new sandbox -----------------------------------------------------------------


def test_new_sandbox_has_a_funded_payer_and_an_empty_worker(engine):
    assert engine.balance(PAYER) == {"agent_id": PAYER, "usdc": START, "locked": D(0)}
    assert engine.balance(WORKER) == {"agent_id": WORKER, "usdc": D(0), "locked": D(0)}
    totals = engine.balances()
    assert totals["minted"] == START
    assert totals["house_fees"] == D(0)


def test_builtin_agents_have_fixed_documented_keys(engine):
    assert engine.agent_for_key(PAYER_KEY) == PAYER
    assert engine.agent_for_key(WORKER_KEY) == WORKER
    assert engine.agent_for_key("pf_sandbox_nobody") is None
    assert engine.agent_for_key("") is None


def test_second_engine_on_the_same_file_sees_the_same_money(engine):
    escrow = create(engine, "5")
    other = SandboxEngine(engine.path)
    assert other.get(escrow["escrow_id"])["status"] == "funded"
    assert other.balance(PAYER)["locked"] == D("5")
    other.check_invariant()


def test_default_path_is_pf_sandbox_db_env_or_under_cwd(monkeypatch, tmp_path):
    monkeypatch.setenv("PF_SANDBOX_DB", str(tmp_path / "x.db"))
    assert SandboxEngine.default_path() == tmp_path / "x.db"
    monkeypatch.delenv("PF_SANDBOX_DB")
    assert SandboxEngine.default_path() == tmp_path / ".pf_sandbox" / "escrow.db"


def test_database_directory_is_created_on_first_use(tmp_path):
    engine = SandboxEngine(tmp_path / "deep" / "er" / "escrow.db")
    engine.check_invariant()
    assert (tmp_path / "deep" / "er" / "escrow.db").exists()


def test_database_is_in_wal_mode(engine):
    engine.check_invariant()
    with sqlite3.connect(engine.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- create --------------------------------------------------------------------------


def test_create_locks_the_amount_and_answers_a_funded_escrow(engine):
    record = create(engine, "2.50", description="  train model  ")
    assert record["status"] == "funded"
    assert record["escrow_id"].startswith("esc_")
    assert record["amount_usd"] == D("2.500000")
    assert record["commission_usd"] == D("0.025000")
    assert record["net_to_counterparty"] == D("2.475000")
    assert record["description"] == "train model"
    assert (record["creator_id"], record["counterparty_id"]) == (PAYER, WORKER)
    assert record["timeout_hours"] == 24
    assert record["created_at"].endswith("Z")
    assert engine.balance(PAYER) == {"agent_id": PAYER, "usdc": START - D("2.5"),
                                     "locked": D("2.5")}
    assert engine.get(record["escrow_id"]) == record


def test_create_sets_auto_release_timeout_hours_after_creation(clocked_engine):
    record = create(clocked_engine, timeout_hours=3)
    assert record["created_at"] == "2026-01-01T00:00:00.000Z"
    assert record["auto_release_at"] == "2026-01-01T03:00:00.000Z"


@pytest.mark.parametrize(("given", "kept"), [(None, 24), (1, 1), (720, 720), (0, 1), (-5, 1),
                                             (721, 720), (10**6, 720), (2.9, 2), ("48", 48)])
def test_timeout_hours_is_floored_and_clamped_to_1_to_720_like_live(engine, given, kept):
    assert create(engine, timeout_hours=given)["timeout_hours"] == kept


@pytest.mark.parametrize("given", ["soon", True, float("nan"), [24]])
def test_timeout_hours_that_is_not_a_number_is_refused(engine, given):
    with pytest.raises(InvalidRequest) as caught:
        create(engine, timeout_hours=given)
    assert caught.value.code == "invalid_timeout"


@pytest.mark.parametrize("amount", ["0.09", "0", "-1", "1.0000001", "NaN", "Infinity", None,
                                    True, "ten"])
def test_create_refuses_a_bad_amount_with_invalid_amount(engine, amount):
    with pytest.raises(InvalidAmount) as caught:
        engine.create(PAYER, amount_usd=amount, description="label data",
                      counterparty_agent_id=WORKER)
    assert caught.value.code == "invalid_amount"
    assert caught.value.status == 400
    assert usdc(engine, PAYER) == START


@pytest.mark.parametrize("description", ["", "ab", "   ab  ", None, 42, "x" * 501])
def test_create_refuses_a_bad_description(engine, description):
    with pytest.raises(InvalidDescription) as caught:
        create(engine, description=description)
    assert caught.value.code == "invalid_description"


@pytest.mark.parametrize("counterparty", ["", "0xABC123", "bob", "ag_", "ag_bad id", None])
def test_create_refuses_a_counterparty_that_is_not_an_agent_id(engine, counterparty):
    with pytest.raises(InvalidAgentId) as caught:
        create(engine, counterparty=counterparty)
    assert caught.value.code == "invalid_counterparty"


def test_create_refuses_an_escrow_with_yourself(engine):
    with pytest.raises(InvalidAgentId) as caught:
        create(engine, counterparty=PAYER)
    assert caught.value.code == "self_escrow"


def test_create_refuses_an_unknown_counterparty_with_404(engine):
    with pytest.raises(NotFound) as caught:
        create(engine, counterparty="ag_nobody_here")
    assert caught.value.code == "counterparty_not_found"
    assert caught.value.status == 404


def test_create_checks_amount_before_description_before_counterparty(engine):
    with pytest.raises(InvalidAmount):
        engine.create(PAYER, amount_usd="0", description="", counterparty_agent_id="x")
    with pytest.raises(InvalidDescription):
        engine.create(PAYER, amount_usd="1", description="", counterparty_agent_id="x")


def test_insufficient_balance_is_402_with_the_balance_and_moves_no_money(engine):
    alice = funded_agent(engine, amount="1.25")
    before = engine.balances()
    with pytest.raises(InsufficientFunds) as caught:
        create(engine, "1.250001", creator=alice["agent_id"])
    assert caught.value.status == 402
    assert caught.value.code == "insufficient_balance"
    assert caught.value.details == {"balance": "1.250000"}
    assert engine.balances() == before
    assert engine.list_escrows(alice["agent_id"]) == []


def test_create_can_spend_the_whole_balance(engine):
    alice = funded_agent(engine, amount="1.25")
    create(engine, "1.25", creator=alice["agent_id"])
    assert engine.balance(alice["agent_id"]) == {"agent_id": alice["agent_id"], "usdc": D(0),
                                                 "locked": D("1.25")}


# -- release -----------------------------------------------------------------------


def test_release_pays_the_counterparty_amount_minus_one_percent(engine):
    escrow = create(engine, "10")
    result = engine.release(PAYER, escrow["escrow_id"])
    assert result == {"escrow_id": escrow["escrow_id"], "status": "released",
                      "amount_released": D("9.900000"), "commission": D("0.100000"),
                      "referral_commission": D("0.000000"), "counterparty_id": WORKER}
    assert usdc(engine, WORKER) == D("9.9")
    assert engine.balance(PAYER) == {"agent_id": PAYER, "usdc": START - D("10"), "locked": D(0)}
    assert engine.balances()["house_fees"] == D("0.1")
    record = engine.get(escrow["escrow_id"])
    assert record["status"] == "released"
    assert record["released_at"] is not None


def test_release_rounds_the_fee_half_up_to_a_micro_usdc(engine):
    escrow = create(engine, "0.150050")
    result = engine.release(PAYER, escrow["escrow_id"])
    assert result["commission"] == D("0.001501")
    assert usdc(engine, WORKER) == D("0.148549")


def test_release_with_a_referral_code_pays_the_referrer_fifteen_percent_of_the_fee(engine):
    referrer = engine.register("referrer")
    escrow = create(engine, "100", referral_code=referrer["referral_code"])
    result = engine.release(PAYER, escrow["escrow_id"])
    assert result["commission"] == D("1")
    assert result["referral_commission"] == D("0.15")
    assert usdc(engine, referrer["agent_id"]) == D("0.15")
    assert usdc(engine, WORKER) == D("99")
    assert engine.balances()["house_fees"] == D("0.85")


def test_an_unknown_referral_code_earns_nobody_anything(engine):
    escrow = create(engine, "100", referral_code="ref_nobody")
    assert engine.release(PAYER, escrow["escrow_id"])["referral_commission"] == D(0)
    assert engine.balances()["house_fees"] == D("1")


def test_your_own_referral_code_earns_you_nothing(engine):
    own = engine.referral_code(PAYER)
    escrow = create(engine, "100", referral_code=own)
    assert engine.release(PAYER, escrow["escrow_id"])["referral_commission"] == D(0)
    assert engine.balances()["house_fees"] == D("1")


def test_only_the_creator_may_release(engine):
    escrow = create(engine, "3")
    stranger = engine.register("stranger")["agent_id"]
    for caller in (WORKER, stranger):
        with pytest.raises(PermissionDenied) as caught:
            engine.release(caller, escrow["escrow_id"])
        assert caught.value.code == "forbidden"
        assert caught.value.status == 403
    assert engine.get(escrow["escrow_id"])["status"] == "funded"
    assert usdc(engine, WORKER) == D(0)


def test_a_second_release_is_invalid_status_and_pays_once(engine):
    escrow = create(engine, "3")
    engine.release(PAYER, escrow["escrow_id"])
    with pytest.raises(InvalidStatus) as caught:
        engine.release(PAYER, escrow["escrow_id"])
    assert caught.value.status == 409
    assert caught.value.details == {"status": "released"}
    assert "released" in caught.value.message
    assert usdc(engine, WORKER) == D("2.97")


@pytest.mark.parametrize("operation", ["release", "refund", "complete", "dispute"])
def test_an_unknown_escrow_is_not_found(engine, operation):
    with pytest.raises(NotFound) as caught:
        getattr(engine, operation)(PAYER, "esc_doesnotexist")
    assert caught.value.code == "not_found"


def test_get_of_an_unknown_escrow_is_not_found(engine):
    with pytest.raises(NotFound):
        engine.get("esc_doesnotexist")


# -- refund (sandbox extension) ----------------------------------------------------------


def test_refund_gives_the_creator_everything_back_without_a_fee(engine):
    escrow = create(engine, "7.77")
    result = engine.refund(PAYER, escrow["escrow_id"])
    assert result == {"escrow_id": escrow["escrow_id"], "status": "refunded",
                      "amount_refunded": D("7.77"), "creator_id": PAYER}
    assert engine.balance(PAYER) == {"agent_id": PAYER, "usdc": START, "locked": D(0)}
    assert engine.balances()["house_fees"] == D(0)
    record = engine.get(escrow["escrow_id"])
    assert record["status"] == "refunded"
    assert record["refunded_at"] is not None


def test_only_the_creator_may_refund(engine):
    escrow = create(engine, "1")
    with pytest.raises(PermissionDenied):
        engine.refund(WORKER, escrow["escrow_id"])
    assert engine.get(escrow["escrow_id"])["status"] == "funded"


def test_refund_after_release_is_invalid_status(engine):
    escrow = create(engine, "1")
    engine.release(PAYER, escrow["escrow_id"])
    with pytest.raises(InvalidStatus):
        engine.refund(PAYER, escrow["escrow_id"])
    assert usdc(engine, WORKER) == D("0.99")


def test_release_after_refund_is_invalid_status(engine):
    escrow = create(engine, "1")
    engine.refund(PAYER, escrow["escrow_id"])
    with pytest.raises(InvalidStatus):
        engine.release(PAYER, escrow["escrow_id"])
    assert usdc(engine, WORKER) == D(0)


# -- complete and dispute ------------------------------------------------------------


def test_counterparty_completes_then_creator_releases(engine):
    escrow = create(engine, "4")
    done = engine.complete(WORKER, escrow["escrow_id"])
    assert done["status"] == "completed"
    assert engine.get(escrow["escrow_id"])["completed_at"] is not None
    engine.release(PAYER, escrow["escrow_id"])
    assert usdc(engine, WORKER) == D("3.96")


def test_a_completed_escrow_can_be_refunded(engine):
    escrow = create(engine, "4")
    engine.complete(WORKER, escrow["escrow_id"])
    engine.refund(PAYER, escrow["escrow_id"])
    assert usdc(engine, PAYER) == START


def test_only_the_counterparty_may_complete(engine):
    escrow = create(engine, "4")
    with pytest.raises(PermissionDenied):
        engine.complete(PAYER, escrow["escrow_id"])


def test_completing_twice_is_invalid_status(engine):
    escrow = create(engine, "4")
    engine.complete(WORKER, escrow["escrow_id"])
    with pytest.raises(InvalidStatus):
        engine.complete(WORKER, escrow["escrow_id"])


def test_a_disputed_escrow_keeps_its_funds_locked_and_cannot_be_settled(engine):
    escrow = create(engine, "5")
    result = engine.dispute(WORKER, escrow["escrow_id"], "work not paid")
    assert result == {"escrow_id": escrow["escrow_id"], "status": "disputed",
                      "reason": "work not paid"}
    for operation in (engine.release, engine.refund):
        with pytest.raises(InvalidStatus):
            operation(PAYER, escrow["escrow_id"])
    assert engine.balance(PAYER)["locked"] == D("5")
    assert usdc(engine, WORKER) == D(0)
    assert engine.get(escrow["escrow_id"])["disputed_at"] is not None


def test_dispute_without_a_reason_records_a_default(engine):
    escrow = create(engine, "5")
    assert engine.dispute(PAYER, escrow["escrow_id"])["reason"] == "No reason provided"


def test_only_participants_may_dispute(engine):
    escrow = create(engine, "5")
    stranger = engine.register("stranger")["agent_id"]
    with pytest.raises(PermissionDenied):
        engine.dispute(stranger, escrow["escrow_id"])


# -- idempotency keys (sandbox extension) --------------------------------------------------


def test_same_idempotency_key_and_body_replays_the_first_escrow_and_locks_once(engine):
    first, replayed = engine.create(PAYER, amount_usd=D("2"), description="label data",
                                    counterparty_agent_id=WORKER, idempotency_key="task-1")
    again, replayed_again = engine.create(PAYER, amount_usd="2.000000",
                                          description="label data",
                                          counterparty_agent_id=WORKER,
                                          idempotency_key="task-1")
    assert (replayed, replayed_again) == (False, True)
    assert again == first
    assert engine.balance(PAYER)["locked"] == D("2")
    assert len(engine.list_escrows(PAYER)) == 1


def test_a_replay_after_release_answers_the_first_response_and_moves_no_money(engine):
    first = create(engine, "2", idempotency_key="task-1")
    engine.release(PAYER, first["escrow_id"])
    again, replayed = engine.create(PAYER, amount_usd=D("2"), description="label data",
                                    counterparty_agent_id=WORKER, idempotency_key="task-1")
    assert replayed is True
    assert again == first
    assert again["status"] == "funded"  # the first answer, as Stripe replays it
    assert engine.balance(PAYER)["usdc"] == START - D("2")


@pytest.mark.parametrize("change", [{"amount_usd": D("3")}, {"description": "other work"},
                                    {"timeout_hours": 48}, {"referral_code": "ref_x"}])
def test_same_idempotency_key_with_a_different_body_is_a_conflict(engine, change):
    create(engine, "2", idempotency_key="task-1")
    request = {"amount_usd": D("2"), "description": "label data",
               "counterparty_agent_id": WORKER, "idempotency_key": "task-1", **change}
    with pytest.raises(IdempotencyConflict) as caught:
        engine.create(PAYER, **request)
    assert caught.value.status == 409
    assert caught.value.code == "idempotency_conflict"
    assert engine.balance(PAYER)["locked"] == D("2")


def test_idempotency_keys_belong_to_one_creator(engine):
    alice = funded_agent(engine)
    mine = create(engine, "2", idempotency_key="task-1")
    hers = create(engine, "2", creator=alice["agent_id"], idempotency_key="task-1")
    assert mine["escrow_id"] != hers["escrow_id"]


def test_a_failed_create_does_not_use_up_its_idempotency_key(engine):
    alice = funded_agent(engine, amount="1")
    with pytest.raises(InsufficientFunds):
        create(engine, "2", creator=alice["agent_id"], idempotency_key="task-1")
    engine.claim(alice["agent_id"], D("1"))
    record = create(engine, "2", creator=alice["agent_id"], idempotency_key="task-1")
    assert record["status"] == "funded"


@pytest.mark.parametrize("key", ["", "   ", "k" * 256, 7])
def test_a_malformed_idempotency_key_is_refused(engine, key):
    with pytest.raises(InvalidRequest) as caught:
        create(engine, idempotency_key=key)
    assert caught.value.code == "invalid_idempotency_key"


# -- timeouts (live rule) ------------------------------------------------------------------


def test_an_escrow_past_its_timeout_is_refunded_minus_the_fee_when_next_read(clocked_engine,
                                                                                clock):
    engine = clocked_engine
    escrow = create(engine, "10", timeout_hours=2)
    clock.advance(hours=2)
    record = engine.get(escrow["escrow_id"])
    assert record["status"] == "refunded"
    assert record["refunded_at"] == record["auto_release_at"]
    assert engine.balance(PAYER) == {"agent_id": PAYER, "usdc": START - D("0.1"),
                                     "locked": D(0)}
    assert engine.balances()["house_fees"] == D("0.1")
    assert usdc(engine, WORKER) == D(0)


def test_an_escrow_is_not_refunded_a_moment_before_its_timeout(clocked_engine, clock):
    escrow = create(clocked_engine, "10", timeout_hours=2)
    clock.advance(hours=2, seconds=-0.01)
    assert clocked_engine.get(escrow["escrow_id"])["status"] == "funded"


def test_release_after_the_timeout_is_invalid_status_and_the_refund_sticks(clocked_engine,
                                                                            clock):
    engine = clocked_engine
    escrow = create(engine, "10", timeout_hours=1)
    clock.advance(hours=5)
    with pytest.raises(InvalidStatus) as caught:
        engine.release(PAYER, escrow["escrow_id"])
    assert caught.value.details == {"status": "refunded"}
    assert usdc(engine, WORKER) == D(0)
    assert usdc(engine, PAYER) == START - D("0.1")


def test_a_timed_out_escrow_pays_the_referrer_its_share(clocked_engine, clock):
    referrer = clocked_engine.register("referrer")
    create(clocked_engine, "100", timeout_hours=1, referral_code=referrer["referral_code"])
    clock.advance(hours=1)
    clocked_engine.expire_due()
    assert usdc(clocked_engine, referrer["agent_id"]) == D("0.15")
    assert clocked_engine.balances()["house_fees"] == D("0.85")


def test_a_completed_escrow_also_times_out(clocked_engine, clock):
    escrow = create(clocked_engine, "10", timeout_hours=1)
    clocked_engine.complete(WORKER, escrow["escrow_id"])
    clock.advance(hours=1)
    assert clocked_engine.get(escrow["escrow_id"])["status"] == "refunded"


def test_a_disputed_escrow_never_times_out(clocked_engine, clock):
    escrow = create(clocked_engine, "10", timeout_hours=1)
    clocked_engine.dispute(PAYER, escrow["escrow_id"], "unclear")
    clock.advance(hours=1000)
    assert clocked_engine.get(escrow["escrow_id"])["status"] == "disputed"
    assert clocked_engine.balance(PAYER)["locked"] == D("10")


def test_balances_refund_every_timed_out_escrow(clocked_engine, clock):
    for _ in range(3):
        create(clocked_engine, "1", timeout_hours=1)
    clock.advance(hours=1)
    totals = clocked_engine.balances()
    assert totals["agents"][PAYER] == {"usdc": START - D("0.03"), "locked": D(0)}
    assert totals["house_fees"] == D("0.03")


def test_a_create_short_of_funds_first_recovers_its_timed_out_escrows(clocked_engine, clock):
    alice = funded_agent(clocked_engine, amount="10")
    create(clocked_engine, "10", creator=alice["agent_id"], timeout_hours=1)
    clock.advance(hours=1)
    record = create(clocked_engine, "9.9", creator=alice["agent_id"])
    assert record["status"] == "funded"
    assert usdc(clocked_engine, alice["agent_id"]) == D(0)


# -- faucet, agents, balances ----------------------------------------------------------------


def test_register_makes_an_agent_with_a_sandbox_key_and_referral_code(engine):
    agent = engine.register("Data Labeler #1")
    assert AGENT_ID_RE.match(agent["agent_id"])
    assert agent["agent_id"].startswith("ag_data_labeler_1_")
    assert agent["api_key"].startswith("pf_sandbox_")
    assert check_api_key(agent["api_key"]) == agent["api_key"]
    assert agent["referral_code"].startswith("ref_")
    assert engine.agent_for_key(agent["api_key"]) == agent["agent_id"]
    assert engine.balance(agent["agent_id"])["usdc"] == D(0)


def test_keys_are_stored_hashed_never_in_clear(engine):
    agent = engine.register("bob")
    engine.close()
    raw = b"".join(p.read_bytes() for p in engine.path.parent.glob("escrow.db*"))
    assert agent["api_key"].encode() not in raw


@pytest.mark.parametrize("name", ["", "   ", None, 5])
def test_register_needs_a_name(engine, name):
    with pytest.raises(InvalidRequest):
        engine.register(name)


def test_claim_mints_100_usdc_by_default(engine):
    agent = engine.register("bob")["agent_id"]
    assert engine.claim(agent) == {"agent_id": agent, "claimed": D(100), "balance": D(100)}
    assert engine.balances()["minted"] == START + D(100)


def test_claim_mints_the_amount_asked_for(engine):
    agent = engine.register("bob")["agent_id"]
    engine.claim(agent, "0.000001")
    assert engine.claim(agent, D("2.5"))["balance"] == D("2.500001")


@pytest.mark.parametrize("amount", ["0", "-1", "1000000.000001", "1.0000001", "NaN", True])
def test_claim_refuses_bad_amounts(engine, amount):
    agent = engine.register("bob")["agent_id"]
    with pytest.raises(InvalidAmount):
        engine.claim(agent, amount)
    assert engine.balances()["minted"] == START


def test_claim_for_an_unknown_agent_is_not_found(engine):
    with pytest.raises(NotFound):
        engine.claim("ag_nobody")
    assert engine.balances()["minted"] == START


def test_balance_of_an_unknown_agent_is_not_found(engine):
    with pytest.raises(NotFound):
        engine.balance("ag_nobody")


def test_list_escrows_lists_one_creators_escrows_oldest_first(engine):
    alice = funded_agent(engine)
    first = create(engine, "1", creator=alice["agent_id"])
    create(engine, "1")
    second = create(engine, "2", creator=alice["agent_id"])
    listed = engine.list_escrows(alice["agent_id"])
    assert [e["escrow_id"] for e in listed] == [first["escrow_id"], second["escrow_id"]]
    assert len(engine.list_escrows()) == 3


def test_stats_count_escrows_by_outcome(engine):
    create(engine, "1")
    engine.release(PAYER, create(engine, "2")["escrow_id"])
    engine.refund(PAYER, create(engine, "3")["escrow_id"])
    stats = engine.stats()
    assert (stats["total_created"], stats["total_released"], stats["total_refunded"]) == (3, 1, 1)
    assert stats["total_volume_usd"] == D(6)
    assert stats["total_commission_usd"] == D("0.02")


# -- the invariant -------------------------------------------------------------------------


def test_check_invariant_catches_money_created_out_of_nothing(engine):
    create(engine, "1")
    with sqlite3.connect(engine.path) as conn:
        conn.execute("UPDATE agents SET usdc = usdc + 1 WHERE agent_id = ?", (WORKER,))
    with pytest.raises(AssertionError, match="off by -0.000001"):
        engine.check_invariant()
    with sqlite3.connect(engine.path) as conn:  # put it back for the after-test check
        conn.execute("UPDATE agents SET usdc = usdc - 1 WHERE agent_id = ?", (WORKER,))


def test_check_invariant_catches_locked_funds_without_an_escrow(engine):
    escrow = create(engine, "1")
    with sqlite3.connect(engine.path) as conn:
        conn.execute("UPDATE escrows SET status = 'released' WHERE escrow_id = ?",
                     (escrow["escrow_id"],))
    with pytest.raises(AssertionError, match="locked"):
        engine.check_invariant()
    with sqlite3.connect(engine.path) as conn:
        conn.execute("UPDATE escrows SET status = 'funded' WHERE escrow_id = ?",
                     (escrow["escrow_id"],))


# -- processes ---------------------------------------------------------------------------


def test_an_engine_used_before_a_fork_works_in_the_child_and_the_parent(engine):
    create(engine, "1")  # opens the connection in the parent
    pid = os.fork()
    if pid == 0:  # child: must reopen, not reuse the parent's connection
        code = 1
        try:
            escrow = create(engine, "2")
            engine.release(PAYER, escrow["escrow_id"])
            engine.check_invariant()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert usdc(engine, WORKER) == D("1.98")
    escrow = create(engine, "3")
    engine.refund(PAYER, escrow["escrow_id"])
    assert engine.balance(PAYER)["locked"] == D("1")


def test_a_database_locked_too_long_is_service_unavailable_and_changes_nothing(tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(engine_module, "BUSY_TIMEOUT_S", 0.2)
    engine = SandboxEngine(tmp_path / "busy.db")
    engine.check_invariant()
    blocker = sqlite3.connect(engine.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    try:
        with pytest.raises(ServiceUnavailable) as caught:
            create(engine, "1")
        assert caught.value.status == 503
        assert caught.value.retry_after == 1
        assert "nothing was changed" in caught.value.message
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert engine.balance(PAYER)["locked"] == D(0)
    create(engine, "1")
    engine.check_invariant()


# -- a process that starts many (Metaflow's runtime) holds the file open ---------------------


def _wal(path) -> bool:
    return os.path.exists(f"{path}-wal")


def test_hold_open_never_creates_a_database(tmp_path):
    try:
        assert engine_module.hold_open(tmp_path / "none" / "escrow.db") is False
        assert not (tmp_path / "none").exists()
    finally:
        engine_module.release_held()


def test_a_held_database_keeps_its_log_when_a_task_closes_and_loses_nothing(tmp_path):
    path = tmp_path / "escrow.db"
    first = SandboxEngine(path)
    create(first, "1")
    first.close()  # the last connection out checkpoints the log and deletes it
    assert not _wal(path)
    try:
        assert engine_module.hold_open(path) is True
        assert engine_module.hold_open(path) is True  # one holder per file
        task = SandboxEngine(path)  # a task: opens, pays, closes
        escrow = create(task, "2")
        task.release(PAYER, escrow["escrow_id"])
        task.close()
        assert _wal(path), "the holder keeps the log: the task's close is not the last one"
        reader = SandboxEngine(path)
        assert reader.balance(PAYER)["locked"] == D("1")
        assert usdc(reader, WORKER) == D("1.98")
        reader.close()
    finally:
        engine_module.release_held()
    assert not _wal(path), "the holder's close is the last one: the log is checkpointed and deleted"
    after = SandboxEngine(path)
    after.check_invariant()
    assert usdc(after, WORKER) == D("1.98")


def test_a_held_connection_blocks_no_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "escrow.db"
    SandboxEngine(path).check_invariant()
    try:
        engine_module.hold_open(path)
        engine = SandboxEngine(path)
        for amount in ("1", "2", "3"):
            escrow = create(engine, amount)
            engine.release(PAYER, escrow["escrow_id"])
        assert engine._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0  # not busy
        engine.check_invariant()
    finally:
        engine_module.release_held()


def test_a_forked_child_never_closes_the_parents_held_connection(tmp_path):
    path = tmp_path / "escrow.db"
    SandboxEngine(path).check_invariant()
    try:
        engine_module.hold_open(path)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if not engine_module._HELD else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert engine_module._HELD
    finally:
        engine_module.release_held()
