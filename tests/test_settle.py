"""The settlement rules (docs/design.md) on their own: against a simulated live service and the embedded sandbox."""

from __future__ import annotations

from decimal import Decimal

import pytest
import requests

from pf_metaflow import ledger as ledger_mod
from pf_metaflow import settle
from pf_metaflow.client import EscrowClient
from pf_metaflow.errors import AmbiguousOutcome, InsufficientFunds

LIVE = "https://escrow.purpleflea.com"
KEY = "pf_live_placeholder0000"


def entry(**over) -> dict:
    base = ledger_mod.new_entry(
        ref="F/1/train/2/0", run="F/1", step="train", task="2", attempt=0, recipient="ag_worker1",
        amount_usdc=Decimal("2.50"), description="pf-metaflow F/1/train/2/0 train",
        idempotency_key="pfmf-abc", timeout_hours=2,
    )
    base.update(over)
    return base


def escrow_json(status: str = "funded", **over) -> dict:
    doc = {
        "escrow_id": "esc_1", "status": status, "amount_usd": 2.5, "commission_usd": 0.025,
        "net_to_counterparty": 2.475, "description": "pf-metaflow F/1/train/2/0 train",
        "creator_id": "ag_me", "counterparty_id": "ag_worker1", "timeout_hours": 2,
        "created_at": "2026-11-21T10:00:00Z", "auto_release_at": "2026-11-21T12:00:00Z",
        "_info": {"docs": "https://example.invalid"},
    }
    doc.update(over)
    return doc


@pytest.fixture
def live(requests_mock):
    """A live-like service: no x-pf-sandbox extensions (no refund path, no idempotency)."""
    requests_mock.get(f"{LIVE}/openapi.json", json={"openapi": "3.0.0", "paths": {"/escrow/create": {}}})
    return requests_mock


@pytest.fixture
def live_client(live) -> EscrowClient:
    return EscrowClient(LIVE, KEY)


def test_refund_on_the_live_service_is_reported_pending_with_when_and_how_much(live, live_client):
    live.get(f"{LIVE}/escrow/esc_1", json=escrow_json())
    records = []
    out = settle.refund(live_client, entry(escrow_id="esc_1", status="locked"), "step failed: boom", records.append)
    assert out["status"] == "refund_pending"
    assert out["expected_at"] == "2026-11-21T12:00:00Z"
    assert out["fee_usdc"] == "0.025000" and out["net_usdc"] == "0.000000"
    assert "step failed: boom" in out["reason"]
    assert records == [out]
    assert not [r for r in live.request_history if "/refund/" in r.path]


def test_create_with_unknown_outcome_is_recorded_unknown_and_sent_once(live, live_client):
    live.post(f"{LIVE}/escrow/create", exc=requests.exceptions.ReadTimeout("read timed out"))
    records = []
    with pytest.raises(AmbiguousOutcome):
        settle.open_escrow(live_client, entry(), records.append)
    assert [r["status"] for r in records] == ["unknown", "unknown"]
    assert records[0]["seq"] == 0 and records[1]["seq"] == 1  # intent recorded before the create
    assert "not retried" in records[1]["reason"] and "pf-metaflow F/1/train/2/0 train" in records[1]["reason"]
    assert len([r for r in live.request_history if r.path == "/escrow/create"]) == 1


def test_create_the_service_refused_leaves_no_ledger_entry(live, live_client):
    live.post(f"{LIVE}/escrow/create", status_code=402, json={"error": "insufficient_balance", "balance": 1.0})
    records = []
    with pytest.raises(InsufficientFunds):
        settle.open_escrow(live_client, entry(), records.append)
    assert records[-1]["status"] == ledger_mod.NOT_CREATED
    [unpaid] = ledger_mod.merge(records)  # kept, so the unpaid work is seen
    assert unpaid["escrow_id"] is None and "insufficient_balance" in unpaid["reason"]
    assert ledger_mod.totals([unpaid])["locked"] == 0


def test_refund_of_an_unknown_create_without_idempotency_stays_unknown(live, live_client):
    unknown = entry(status="unknown", reason="create outcome unknown")
    assert settle.refund(live_client, unknown, "step failed") is unknown
    assert not [r for r in live.request_history if r.method == "POST"]


def test_release_answered_invalid_status_but_already_released_is_not_an_error(live, live_client):
    live.post(f"{LIVE}/escrow/release/esc_1", status_code=409, json={"error": "invalid_status"})
    live.get(f"{LIVE}/escrow/esc_1", json=escrow_json("released"))
    out = settle.release(live_client, entry(escrow_id="esc_1", status="locked"))
    assert out["status"] == "released" and out["net_usdc"] == "2.475000"


def test_resolve_reads_the_server_before_refunding(live, live_client):
    live.get(f"{LIVE}/escrow/esc_1", json=escrow_json("released"))
    out = settle.resolve(live_client, entry(escrow_id="esc_1", status="locked"), "task died")
    assert out["status"] == "released"
    assert not [r for r in live.request_history if r.method == "POST"]


def test_pending_refund_becomes_refunded_once_the_service_has_paid_it_back(live, live_client):
    live.get(f"{LIVE}/escrow/esc_1", json=escrow_json("refunded"))
    pending = entry(escrow_id="esc_1", status="refund_pending", reason="comes back at 12:00")
    out = settle.resolve(live_client, pending, "reconciled")
    assert out["status"] == "refunded" and out["seq"] == pending["seq"] + 1


# -- embedded sandbox ------------------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path):
    client = EscrowClient(f"sandbox://{tmp_path / 'escrow.db'}")
    yield client
    from pf_metaflow.sandbox.engine import SandboxEngine

    SandboxEngine(tmp_path / "escrow.db").check_invariant()


def test_open_then_release_pays_the_agent_amount_less_one_percent(sandbox):
    locked = settle.open_escrow(sandbox, entry(recipient="ag_sandbox_worker"))
    assert locked["status"] == "locked" and locked["escrow_id"].startswith("esc_")
    done = settle.release(sandbox, locked)
    assert (done["status"], done["fee_usdc"], done["net_usdc"]) == ("released", "0.025000", "2.475000")
    assert sandbox.get(done["escrow_id"]).status == "released"


def test_unknown_create_is_recovered_through_its_idempotency_key_and_refunded(sandbox):
    # The answer to the first create was lost: the entry knows only its key.
    first = sandbox.create(Decimal("2.50"), counterparty_agent_id="ag_sandbox_worker",
                           description="pf-metaflow F/1/train/2/0 train", timeout_hours=2,
                           idempotency_key="pfmf-abc")
    lost = entry(recipient="ag_sandbox_worker", status="unknown")
    out = settle.refund(sandbox, lost, "task died mid-create")
    assert out["escrow_id"] == first.escrow_id and out["status"] == "refunded"
    assert sandbox.get(first.escrow_id).status == "refunded"


def test_refunding_twice_changes_nothing_the_second_time(sandbox):
    locked = settle.open_escrow(sandbox, entry(recipient="ag_sandbox_worker"))
    once = settle.refund(sandbox, locked, "failed")
    assert settle.refund(sandbox, once, "failed again") is once


def test_unknown_create_the_server_now_refuses_is_void_not_an_error(sandbox):
    lost = entry(recipient="ag_sandbox_worker", status="unknown", amount_usdc="2000000.000000")
    out = settle.refund(sandbox, lost, "task died mid-create")
    assert out["status"] == ledger_mod.NOT_CREATED and "never took effect" in out["reason"]
    assert [e["status"] for e in ledger_mod.merge([out])] == [ledger_mod.NOT_CREATED]


def test_refund_that_cannot_reach_the_server_keeps_the_entry_open_for_reconcile(live, live_client, monkeypatch):
    monkeypatch.setattr("pf_metaflow.retries._sleep", lambda seconds: None)  # retries, without the waiting
    live.get(f"{LIVE}/escrow/esc_1", exc=requests.exceptions.ConnectionError("refused"))
    out = settle.refund(live_client, entry(escrow_id="esc_1", status="locked"), "step failed")
    assert out["status"] == "locked" and "pf-metaflow reconcile" in out["reason"]


def test_release_whose_answer_is_garbled_but_took_effect_is_recorded_released(live, live_client):
    live.post(f"{LIVE}/escrow/release/esc_1", status_code=200, text="<html>gateway hiccup</html>")
    live.get(f"{LIVE}/escrow/esc_1", json=escrow_json("released"))
    out = settle.release(live_client, entry(escrow_id="esc_1", status="locked"))
    assert out["status"] == "released"


def test_release_that_did_not_happen_stays_locked_and_raises(live, live_client, monkeypatch):
    monkeypatch.setattr("pf_metaflow.retries._sleep", lambda seconds: None)
    live.post(f"{LIVE}/escrow/release/esc_1", status_code=500, json={"error": "release_failed"})
    live.get(f"{LIVE}/escrow/esc_1", json=escrow_json("funded"))
    records = []
    with pytest.raises(settle.ReleaseFailed) as failed:
        settle.release(live_client, entry(escrow_id="esc_1", status="locked"), records.append)
    assert records[-1]["status"] == "locked" and "release failed" in records[-1]["reason"]
    assert "the escrow is funded on the service" in records[-1]["reason"]
    assert failed.value.entry == records[-1]


def test_create_answered_by_a_proxy_error_page_is_unknown_not_refused(live, live_client):
    live.post(f"{LIVE}/escrow/create", status_code=520, text="<html>origin error</html>")
    records = []
    with pytest.raises(AmbiguousOutcome):
        settle.open_escrow(live_client, entry(), records.append)
    assert records[-1]["status"] == "unknown" and "pf-metaflow F/1/train/2/0 train" in records[-1]["reason"]
