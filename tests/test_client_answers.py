"""What the service's answers mean (pf_metaflow.answers): one reading, used by the client
and by settlement alike. Amounts are the server's, never recomputed where it gave them."""

from __future__ import annotations

from decimal import Decimal

import pytest

from pf_metaflow import answers
from pf_metaflow.answers import (
    Escrow,
    Settlement,
    create_outcome_unknown,
    parse_capabilities,
    parse_escrow,
    parse_release,
    refund_pending,
    settlement_of,
)
from pf_metaflow.errors import (
    AmbiguousOutcome,
    InsufficientFunds,
    InvalidAmount,
    NetworkError,
    NotFound,
    ProtocolError,
    RateLimited,
    ServerError,
    ServiceUnavailable,
)

ESC = "esc_0123456789abcdef"
D = Decimal


def escrow(status: str, **changes) -> Escrow:
    record = {
        "escrow_id": ESC, "status": status, "amount_usd": 0.3001, "commission_usd": 0.003,
        "net_to_counterparty": 0.2971, "description": "label data", "creator_id": "ag_payer",
        "counterparty_id": "ag_worker", "timeout_hours": 24,
        "created_at": "2026-01-01T00:00:00.000Z", "auto_release_at": "2026-01-02T00:00:00.000Z",
    }
    record.update(changes)
    return parse_escrow(record)


def test_the_client_module_still_exports_escrow_and_settlement():
    from pf_metaflow import client

    assert client.Escrow is Escrow and client.Settlement is Settlement


# --------------------------------------------------------------------------- settlement_of


@pytest.mark.parametrize("status", ["funded", "completed", "disputed"])
def test_an_escrow_still_held_or_disputed_has_no_settlement(status):
    assert settlement_of(escrow(status)) is None


def test_released_takes_commission_and_net_from_the_server_and_leaves_the_referral_unknown():
    settled = settlement_of(escrow("released"))
    assert settled is not None
    assert (settled.status, settled.amount_usd, settled.commission_usd, settled.net_usd) == (
        "released", D("0.300100"), D("0.003000"), D("0.297100"))
    assert settled.referral_commission_usd is None


def test_a_sandbox_refund_before_the_timeout_is_in_full_without_commission():
    settled = settlement_of(escrow("refunded", refunded_at="2026-01-01T00:05:00.000Z"))
    assert settled is not None
    assert (settled.status, settled.commission_usd, settled.net_usd) == ("refunded", D(0), D("0.300100"))
    assert settled.referral_commission_usd == D(0)


def test_a_refund_at_the_timeout_keeps_the_servers_commission():
    settled = settlement_of(escrow("refunded", refunded_at="2026-01-02T00:00:00.000Z"))
    assert settled is not None
    assert (settled.commission_usd, settled.net_usd) == (D("0.003000"), D("0.297100"))
    assert settled.referral_commission_usd is None  # the referrer's share: not in a GET
    assert "timeout" in settled.detail


def test_a_refund_the_live_service_does_not_date_is_its_timeout_refund():
    # The live service refunds only at the timeout, and its GET carries no refunded_at.
    settled = settlement_of(escrow("refunded"))
    assert settled is not None
    assert (settled.commission_usd, settled.net_usd) == (D("0.003000"), D("0.297100"))


def test_an_escrow_whose_answer_lacks_a_commission_falls_back_to_one_percent():
    settled = settlement_of(escrow("refunded", commission_usd=None, net_to_counterparty=None,
                                   amount_usd=2))
    assert settled is not None and settled.commission_usd == D("0.020000")


def test_refund_pending_uses_the_servers_commission_and_says_when():
    pending = refund_pending(escrow("funded"), note="its creator could not be verified")
    assert (pending.status, pending.amount_usd, pending.commission_usd, pending.net_usd) == (
        "refund_pending", D("0.300100"), D("0.003000"), D("0.297100"))
    assert pending.expected_at == "2026-01-02T00:00:00.000Z"
    assert pending.detail.endswith("its creator could not be verified")


# --------------------------------------------------------------------------- parsing


def test_parse_escrow_reads_refunded_at():
    assert escrow("refunded", refunded_at="2026-01-01T00:05:00Z").refunded_at == "2026-01-01T00:05:00Z"


def test_a_release_answer_carries_the_referral_it_paid():
    settled = parse_release({"escrow_id": ESC, "status": "released", "amount_released": 2.475,
                             "commission": 0.025, "referral_commission": 0.00375})
    assert settled.referral_commission_usd == D("0.003750")


def test_amounts_are_never_floats():
    assert all(isinstance(v, Decimal) for v in (escrow("funded").amount_usd,
                                                 escrow("funded").commission_usd))


@pytest.mark.parametrize("document, sandbox, extensions", [
    ({"x-pf-sandbox": {"extensions": ["refund", "idempotency"]}}, True, {"refund", "idempotency"}),
    ({"x-pf-sandbox": {"extensions": ["faucet", "balance"]}}, True, {"faucet", "balance"}),
    ({"x-pf-sandbox": {}}, True, set()),
    ({"openapi": "3.0.0", "paths": {}}, False, set()),
    (None, False, set()),
])
def test_capabilities_come_from_the_sandbox_marker(document, sandbox, extensions):
    caps = parse_capabilities(document)
    assert (caps.sandbox, set(caps.extensions)) == (sandbox, extensions)


# --------------------------------------------------------------------------- failed creates


@pytest.mark.parametrize("error", [
    AmbiguousOutcome("no answer"),
    ServerError("500", status=500),
    ServiceUnavailable("503"),
    ProtocolError("an HTML page", status=502),
    ProtocolError("an empty body", status=200),
    ProtocolError("no escrow_id"),
])
def test_a_create_that_failed_this_way_may_have_locked_funds(error):
    assert create_outcome_unknown(error) is True


@pytest.mark.parametrize("error", [
    RateLimited("429"),
    NetworkError("refused"),
    InsufficientFunds("402"),
    NotFound("404"),
    InvalidAmount("400"),
    ProtocolError("a page", status=418),
])
def test_a_create_that_failed_this_way_did_nothing(error):
    assert create_outcome_unknown(error) is False


def test_answers_knows_nothing_of_the_client_or_the_wire():
    import inspect

    source = inspect.getsource(answers)
    assert "import requests" not in source and "from .client" not in source
