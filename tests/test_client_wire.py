"""The escrow client on the wire: every request it sends and every answer it understands.

requests-mock stands in for the service (nothing leaves the process). The answers are
the live service's (docs/design.md), including its ``_info`` noise.
"""

from __future__ import annotations

import json
import logging
from decimal import Decimal

import pytest

from pf_metaflow import retries as client_mod
from pf_metaflow.api import pf_create, pf_get, pf_refund, pf_release
from pf_metaflow.client import Escrow, EscrowClient, Settlement
from pf_metaflow.errors import (
    AmbiguousOutcome,
    AuthenticationError,
    InsufficientFunds,
    InvalidAgentId,
    InvalidAmount,
    InvalidDescription,
    InvalidRequest,
    InvalidStatus,
    NotFound,
    PermissionDenied,
    ProtocolError,
    PurpleFleaError,
    RateLimited,
    ServerError,
    ServiceUnavailable,
)

URL = "https://escrow.purpleflea.com"
KEY = "pf_live_wireTESTkey_0123456789abcdef"
ESC = "esc_0123456789abcdef"
INFO = {"service": "agent-escrow", "docs": "https://escrow.purpleflea.com/llms.txt",
        "version": "1.0.0"}

CREATED = {
    "escrow_id": ESC,
    "amount_usd": 2.5,
    "commission_usd": 0.025,
    "net_to_counterparty": 2.475,
    "description": "label 1,000 images",
    "creator_id": "ag_payer",
    "counterparty_id": "ag_worker",
    "status": "funded",
    "timeout_hours": 24,
    "auto_release_at": "2026-01-02T00:00:00.000Z",
    "next_steps": {"creator": f"POST /escrow/release/{ESC} to release funds"},
    "_info": INFO,
}
RELEASED = {
    "escrow_id": ESC,
    "status": "released",
    "amount_released": 2.475,
    "commission": 0.025,
    "referral_commission": 0.00375,
    "counterparty_id": "ag_worker",
    "message": "$2.48 released to counterparty.",
    "_info": INFO,
}


def record(status: str = "funded", **changes) -> dict:
    """A GET /escrow/{id} answer."""
    body = {
        "escrow_id": ESC,
        "status": status,
        "amount_usd": 2.5,
        "commission_usd": 0.025,
        "net_to_counterparty": 2.475,
        "description": "label 1,000 images",
        "creator_id": "ag_payer",
        "counterparty_id": "ag_worker",
        "timeout_hours": 24,
        "created_at": "2026-01-01T00:00:00.000Z",
        "auto_release_at": "2026-01-02T00:00:00.000Z",
        "completed_at": None,
        "released_at": None,
        "disputed_at": None,
        "_info": INFO,
    }
    body.update(changes)
    return body


LIVE_OPENAPI = {"openapi": "3.0.0", "paths": {"/escrow/create": {}}, "_info": INFO}
SANDBOX_OPENAPI = {
    "openapi": "3.0.3",
    "paths": {"/escrow/create": {}, "/escrow/refund/{id}": {}},
    "x-pf-sandbox": {"extensions": ["refund", "idempotency", "faucet", "balance"]},
}


@pytest.fixture
def client() -> EscrowClient:
    return EscrowClient(URL, KEY, max_attempts=1)


@pytest.fixture
def mock(requests_mock):
    return requests_mock


def create(client: EscrowClient, **kwargs) -> Escrow:
    args = {"counterparty_agent_id": "ag_worker", "description": "label 1,000 images"}
    args.update(kwargs)
    return client.create(args.pop("amount_usd", "2.50"), **args)


def assert_key_only_in_authorization(mock) -> None:
    assert mock.request_history, "no request was sent"
    for request in mock.request_history:
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        assert KEY not in request.url
        assert KEY not in (request.text or "")
        others = {k: v for k, v in request.headers.items() if k != "Authorization"}
        assert KEY not in repr(others)


# --------------------------------------------------------------------------- requests sent


def test_create_posts_the_exact_json_body_to_escrow_create(client, mock):
    mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    create(client)
    (sent,) = mock.request_history
    assert sent.method == "POST"
    assert sent.url == f"{URL}/escrow/create"
    assert sent.json(parse_float=Decimal) == {
        "amount_usd": Decimal("2.5"),
        "description": "label 1,000 images",
        "counterparty_agent_id": "ag_worker",
    }
    assert sent.headers["Content-Type"] == "application/json"


def test_create_sends_the_bearer_key_and_no_idempotency_key_unless_given(client, mock):
    mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    create(client)
    (sent,) = mock.request_history
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert "Idempotency-Key" not in sent.headers


def test_create_sends_the_idempotency_key_header_when_given(client, mock):
    mock.get(f"{URL}/openapi.json", json=SANDBOX_OPENAPI)
    mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    create(client, idempotency_key="run-7/train/3/0")
    (sent,) = [r for r in mock.request_history if r.method == "POST"]
    assert sent.headers["Idempotency-Key"] == "run-7/train/3/0"
    assert "idempotency" not in sent.text.lower()


def test_create_sends_timeout_hours_and_referral_code_only_when_given(client, mock):
    mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    create(client, timeout_hours=48, referral_code="ref_abc123")
    assert mock.last_request.json() == {
        "amount_usd": 2.5,
        "description": "label 1,000 images",
        "counterparty_agent_id": "ag_worker",
        "timeout_hours": 48,
        "referral_code": "ref_abc123",
    }


@pytest.mark.parametrize(
    "amount, text",
    [("0.10", "0.1"), ("5", "5"), ("1234567.123456", "1234567.123456"), (Decimal("100.000"), "100")],
)
def test_create_writes_the_amount_as_an_exact_json_number(client, mock, amount, text):
    mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    create(client, amount_usd=amount)
    assert mock.last_request.text.startswith('{"amount_usd": ' + text + ", ")


def test_release_posts_to_the_release_path_with_no_body(client, mock):
    mock.post(f"{URL}/escrow/release/{ESC}", json=RELEASED)
    client.release(ESC)
    (sent,) = mock.request_history
    assert (sent.method, sent.url) == ("POST", f"{URL}/escrow/release/{ESC}")
    assert not sent.body
    assert "Idempotency-Key" not in sent.headers


def test_get_sends_a_get_to_the_escrow_path(client, mock):
    mock.get(f"{URL}/escrow/{ESC}", json=record())
    client.get(ESC)
    (sent,) = mock.request_history
    assert (sent.method, sent.url) == ("GET", f"{URL}/escrow/{ESC}")


def test_refund_on_a_sandbox_posts_to_the_refund_path(client, mock):
    mock.get(f"{URL}/openapi.json", json=SANDBOX_OPENAPI)
    mock.post(f"{URL}/escrow/refund/{ESC}", json={
        "escrow_id": ESC, "status": "refunded", "amount_refunded": 2.5, "creator_id": "ag_payer",
    })
    client.refund(ESC)
    assert [(r.method, r.path) for r in mock.request_history] == [
        ("GET", "/openapi.json"), ("POST", f"/escrow/refund/{ESC}"),
    ]


def test_the_key_travels_only_in_the_authorization_header(client, mock):
    mock.get(f"{URL}/openapi.json", json=LIVE_OPENAPI)
    mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    mock.post(f"{URL}/escrow/release/{ESC}", json=RELEASED)
    mock.get(f"{URL}/escrow/{ESC}", json=record())
    escrow = create(client, idempotency_key="k-1")
    client.release(escrow)
    client.get(escrow)
    client.refund(escrow)
    assert len(mock.request_history) == 5
    assert_key_only_in_authorization(mock)


def test_requests_do_not_follow_redirects(client, mock):
    mock.get(f"{URL}/escrow/{ESC}", status_code=302, headers={"Location": "https://evil.test/"})
    mock.get("https://evil.test/", json=record())
    with pytest.raises(ProtocolError):
        client.get(ESC)
    assert [r.hostname for r in mock.request_history] == ["escrow.purpleflea.com"]


# --------------------------------------------------------------------------- answers


def test_create_201_becomes_an_escrow_with_exact_amounts(client, mock):
    mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    escrow = create(client)
    assert escrow == Escrow(
        escrow_id=ESC,
        status="funded",
        amount_usd=Decimal("2.500000"),
        commission_usd=Decimal("0.025000"),
        net_to_counterparty=Decimal("2.475000"),
        description="label 1,000 images",
        creator_id="ag_payer",
        counterparty_id="ag_worker",
        timeout_hours=24,
        created_at=None,
        auto_release_at="2026-01-02T00:00:00.000Z",
        replayed=False,
    )
    assert str(escrow) == ESC


def test_amounts_are_parsed_as_decimals_not_floats(client, mock):
    mock.post(
        f"{URL}/escrow/create", status_code=201,
        text=json.dumps(CREATED).replace("2.5,", "0.3000001,", 1).replace("2.475", "0.297"),
    )
    escrow = create(client, amount_usd="0.30")
    assert isinstance(escrow.amount_usd, Decimal)
    assert escrow.amount_usd == Decimal("0.300000")  # 0.3000001 rounds at 6 places
    assert escrow.net_to_counterparty == Decimal("0.297000")


def test_a_replayed_create_is_marked_replayed(client, mock):
    mock.get(f"{URL}/openapi.json", json=SANDBOX_OPENAPI)
    mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED,
              headers={"Idempotent-Replayed": "true"})
    escrow = create(client, idempotency_key="k-1")
    assert (escrow.replayed, escrow.idempotency_honoured) == (True, True)


def test_release_200_becomes_a_settlement_with_gross_fee_and_net(client, mock):
    mock.post(f"{URL}/escrow/release/{ESC}", json=RELEASED)
    settlement = client.release(ESC)
    assert settlement == Settlement(
        escrow_id=ESC,
        status="released",
        amount_usd=Decimal("2.500000"),
        commission_usd=Decimal("0.025000"),
        referral_commission_usd=Decimal("0.003750"),
        net_usd=Decimal("2.475000"),
        expected_at=None,
        detail=settlement.detail,
    )
    assert "2.475000 USDC to ag_worker" in settlement.detail


def test_get_reads_every_field(client, mock):
    mock.get(f"{URL}/escrow/{ESC}", json=record("completed", timeout_hours=48))
    escrow = client.get(ESC)
    assert escrow.status == "completed"
    assert escrow.timeout_hours == 48
    assert escrow.created_at == "2026-01-01T00:00:00.000Z"
    assert escrow.amount_usd == Decimal("2.5")
    assert escrow.creator_id == "ag_payer"


def test_info_and_unknown_fields_are_ignored(client, mock):
    mock.get(f"{URL}/escrow/{ESC}", json=record(
        events=[{"type": "created"}], brand_new_field={"x": 1}, _info={"anything": [1, 2]},
    ))
    assert client.get(ESC).status == "funded"


def test_an_escrow_object_or_its_id_are_both_accepted(client, mock):
    mock.get(f"{URL}/escrow/{ESC}", json=record())
    escrow = client.get(ESC)
    assert client.get(escrow) == escrow


# --------------------------------------------------------------------------- error answers


@pytest.mark.parametrize(
    "status, code, error",
    [
        (400, "invalid_amount", InvalidAmount),
        (400, "invalid_description", InvalidDescription),
        (400, "invalid_counterparty", InvalidAgentId),
        (400, "self_escrow", InvalidAgentId),
        (401, "unauthorized", AuthenticationError),
        (402, "insufficient_balance", InsufficientFunds),
        (404, "counterparty_not_found", NotFound),
        (429, "rate_limited", RateLimited),
    ],
)
def test_create_refusals_map_to_error_classes(client, mock, status, code, error):
    mock.post(f"{URL}/escrow/create", status_code=status,
              json={"error": code, "message": "the service says no", "_info": INFO})
    with pytest.raises(error) as caught:
        create(client)
    assert caught.value.code == code
    assert caught.value.status == status
    assert "the service says no" in caught.value.message
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)
    assert len(mock.request_history) == 1


@pytest.mark.parametrize("code", ["debit_failed", "internal_error"])
def test_a_500_answer_to_a_create_is_an_unknown_outcome_not_a_refusal(client, mock, code):
    mock.post(f"{URL}/escrow/create", status_code=500,
              json={"error": code, "message": "the service says no", "_info": INFO})
    with pytest.raises(AmbiguousOutcome) as caught:
        create(client)
    assert (caught.value.code, caught.value.status) == ("outcome_unknown", 500)
    assert caught.value.details["error_code"] == code
    assert "the service says no" in caught.value.message
    assert "may or may not have been created" in caught.value.message
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)
    assert len(mock.request_history) == 1


@pytest.mark.parametrize("code", ["release_failed", "internal_error"])
def test_a_500_answer_to_a_release_stays_a_server_error(client, mock, code):
    mock.post(f"{URL}/escrow/release/{ESC}", status_code=500, json={"error": code})
    with pytest.raises(ServerError) as caught:
        client.release(ESC)
    assert caught.value.code == code


def test_402_carries_the_balance_as_a_decimal(client, mock):
    mock.post(f"{URL}/escrow/create", status_code=402, json={
        "error": "insufficient_balance", "message": "Balance $1.20 < escrow amount $2.50",
        "balance": 1.2, "_info": INFO,
    })
    with pytest.raises(InsufficientFunds) as caught:
        create(client)
    assert caught.value.details == {"balance": Decimal("1.200000")}
    assert "Balance $1.20" in caught.value.message


def test_401_without_a_message_still_says_unauthorized(client, mock):
    mock.post(f"{URL}/escrow/release/{ESC}", status_code=401, json={"error": "unauthorized"})
    with pytest.raises(AuthenticationError, match="unauthorized"):
        client.release(ESC)


def test_403_on_release_is_permission_denied(client, mock):
    mock.post(f"{URL}/escrow/release/{ESC}", status_code=403, json={
        "error": "forbidden", "message": "Only the escrow creator can release funds"})
    with pytest.raises(PermissionDenied, match="Only the escrow creator"):
        client.release(ESC)


def test_404_on_release_is_not_found(client, mock):
    mock.post(f"{URL}/escrow/release/{ESC}", status_code=404,
              json={"error": "not_found", "message": "Escrow not found"})
    with pytest.raises(NotFound) as caught:
        client.release(ESC)
    assert caught.value.code == "not_found"


def test_409_on_release_of_a_refunded_escrow_is_invalid_status(client, mock):
    mock.post(f"{URL}/escrow/release/{ESC}", status_code=409, json={
        "error": "invalid_status", "message": "Cannot release escrow in status 'refunded'"})
    mock.get(f"{URL}/escrow/{ESC}", json=record("refunded"))
    with pytest.raises(InvalidStatus, match="status 'refunded'"):
        client.release(ESC)


def test_409_on_release_of_an_already_released_escrow_is_its_settlement(client, mock):
    mock.post(f"{URL}/escrow/release/{ESC}", status_code=409, json={
        "error": "invalid_status", "message": "Cannot release escrow in status 'released'"})
    mock.get(f"{URL}/escrow/{ESC}", json=record("released", released_at="2026-01-01T01:00:00Z"))
    settlement = client.release(ESC)
    assert settlement.status == "released"
    assert settlement.net_usd == Decimal("2.475000")
    assert settlement.commission_usd == Decimal("0.025000")
    assert "already released" in settlement.detail


def test_an_already_released_escrow_read_back_has_an_unknown_referral_never_a_wrong_zero(client, mock):
    mock.post(f"{URL}/escrow/release/{ESC}", status_code=409, json={
        "error": "invalid_status", "message": "Cannot release escrow in status 'released'"})
    mock.get(f"{URL}/escrow/{ESC}", json=record("released"))
    assert client.release(ESC).referral_commission_usd is None


def test_the_referral_is_what_the_release_answer_says(client, mock):
    mock.post(f"{URL}/escrow/release/{ESC}", json={**RELEASED, "referral_commission": 0})
    assert client.release(ESC).referral_commission_usd == Decimal("0")


def test_a_release_answer_without_a_referral_leaves_it_unknown(client, mock):
    mock.post(f"{URL}/escrow/release/{ESC}",
              json={k: v for k, v in RELEASED.items() if k != "referral_commission"})
    assert client.release(ESC).referral_commission_usd is None


def test_429_carries_retry_after_seconds(client, mock):
    mock.post(f"{URL}/escrow/create", status_code=429, headers={"Retry-After": "17"},
              json={"error": "rate_limited", "message": "Too many requests. Limit: 20 per 60s"})
    with pytest.raises(RateLimited) as caught:
        create(client)
    assert caught.value.retry_after == 17.0


def test_503_is_service_unavailable(client, mock):
    mock.get(f"{URL}/escrow/{ESC}", status_code=503, headers={"Retry-After": "5"},
             json={"error": "service_unavailable"})
    with pytest.raises(ServiceUnavailable) as caught:
        client.get(ESC)
    assert caught.value.retry_after == 5.0


def test_a_proxy_html_503_page_is_still_service_unavailable(client, mock):
    mock.get(f"{URL}/escrow/{ESC}", status_code=503, text="<html><body>Down</body></html>")
    with pytest.raises(ServiceUnavailable):
        client.get(ESC)


def test_an_unknown_error_code_falls_back_to_its_http_status(client, mock):
    mock.post(f"{URL}/escrow/release/{ESC}", status_code=500, json={
        "error": "release_failed", "message": "Failed to release funds. Contact support."})
    with pytest.raises(ServerError) as caught:
        client.release(ESC)
    assert caught.value.code == "release_failed"


def test_a_server_message_echoing_the_key_is_redacted(client, mock):
    mock.post(f"{URL}/escrow/create", status_code=401,
              json={"error": "unauthorized", "message": f"unknown key {KEY}"})
    with pytest.raises(AuthenticationError) as caught:
        create(client)
    assert KEY not in str(caught.value)
    assert "pf_***" in str(caught.value)


# --------------------------------------------------------------------------- unreadable answers


def test_an_html_error_page_is_a_protocol_error_with_status_and_excerpt(client, mock):
    page = "<!DOCTYPE html><html><head><title>Bad gateway config</title></head></html>"
    mock.get(f"{URL}/escrow/{ESC}", status_code=500, text=page,
             headers={"Content-Type": "text/html"})
    with pytest.raises(ProtocolError) as caught:
        client.get(ESC)
    assert caught.value.status == 500
    assert "HTML page" in caught.value.message
    assert "Bad gateway config" in caught.value.details["excerpt"]


def test_an_html_error_page_answering_a_create_is_an_unknown_outcome_that_says_what_came(client, mock):
    page = "<!DOCTYPE html><html><head><title>Bad gateway config</title></head></html>"
    mock.post(f"{URL}/escrow/create", status_code=500, text=page,
              headers={"Content-Type": "text/html"})
    with pytest.raises(AmbiguousOutcome) as caught:
        create(client)
    assert caught.value.status == 500
    assert "answered HTTP 500 with an HTML page" in caught.value.message
    assert "Bad gateway config" in caught.value.details["excerpt"]


def test_an_empty_200_body_is_a_protocol_error(client, mock):
    mock.get(f"{URL}/escrow/{ESC}", status_code=200, text="")
    with pytest.raises(ProtocolError, match="empty body") as caught:
        client.get(ESC)
    assert caught.value.status == 200


def test_a_non_json_200_is_a_protocol_error(client, mock):
    mock.post(f"{URL}/escrow/release/{ESC}", status_code=200, text="OK released")
    with pytest.raises(ProtocolError, match="OK released"):
        client.release(ESC)


def test_a_json_array_answer_is_a_protocol_error(client, mock):
    mock.get(f"{URL}/escrow/{ESC}", json=[record()])
    with pytest.raises(ProtocolError):
        client.get(ESC)


def test_a_created_answer_without_an_escrow_id_is_an_unknown_outcome(client, mock):
    # A 201 we cannot read is a yes, garbled: the funds may well be locked.
    mock.post(f"{URL}/escrow/create", status_code=201,
              json={k: v for k, v in CREATED.items() if k != "escrow_id"})
    with pytest.raises(AmbiguousOutcome, match="no valid escrow_id") as caught:
        create(client)
    assert caught.value.details["description"] == "label 1,000 images"


def test_a_refusal_we_cannot_read_is_still_a_protocol_error(client, mock):
    mock.post(f"{URL}/escrow/create", status_code=418, text="I'm a teapot")
    with pytest.raises(ProtocolError) as caught:
        create(client)
    assert caught.value.status == 418


def test_a_protocol_error_excerpt_never_shows_the_key(client, mock):
    mock.get(f"{URL}/escrow/{ESC}", status_code=400, text=f"<pre>Authorization: Bearer {KEY}</pre>")
    with pytest.raises(ProtocolError) as caught:
        client.get(ESC)
    assert KEY not in str(caught.value) and KEY not in repr(caught.value.details)


# --------------------------------------------------------------------------- refund, live and sandbox


def test_refund_on_a_live_server_is_pending_until_auto_release_minus_one_percent(client, mock):
    mock.get(f"{URL}/openapi.json", json=LIVE_OPENAPI)
    mock.get(f"{URL}/escrow/{ESC}", json=record("funded"))
    settlement = client.refund(ESC)
    assert settlement.status == "refund_pending"
    assert settlement.expected_at == "2026-01-02T00:00:00.000Z"
    assert settlement.amount_usd == Decimal("2.500000")
    assert settlement.commission_usd == Decimal("0.025000")
    assert settlement.net_usd == Decimal("2.475000")
    assert "2026-01-02T00:00:00.000Z" in settlement.detail
    assert "no call can hasten it" in settlement.detail
    assert [r.method for r in mock.request_history] == ["GET", "GET"]  # no POST at all


def test_refund_pending_takes_the_commission_from_the_server_not_recomputed(client, mock):
    # The server rounds 1% of 0.3001 in floating point to 0.003; fee_for would say 0.003001.
    mock.get(f"{URL}/openapi.json", json=LIVE_OPENAPI)
    mock.get(f"{URL}/escrow/{ESC}", json=record(
        "funded", amount_usd=0.3001, commission_usd=0.003, net_to_counterparty=0.2971))
    settlement = client.refund(ESC)
    assert (settlement.amount_usd, settlement.commission_usd, settlement.net_usd) == (
        Decimal("0.300100"), Decimal("0.003000"), Decimal("0.297100"))
    assert "0.297100 USDC" in settlement.detail


def test_refund_on_a_live_server_of_a_timed_out_escrow_is_refunded_minus_the_fee(client, mock):
    mock.get(f"{URL}/openapi.json", json=LIVE_OPENAPI)
    mock.get(f"{URL}/escrow/{ESC}", json=record("refunded"))
    settlement = client.refund(ESC)
    assert (settlement.status, settlement.net_usd, settlement.commission_usd) == (
        "refunded", Decimal("2.475000"), Decimal("0.025000"))


def test_refund_on_a_live_server_of_a_released_escrow_is_invalid_status(client, mock):
    mock.get(f"{URL}/openapi.json", json=LIVE_OPENAPI)
    mock.get(f"{URL}/escrow/{ESC}", json=record("released"))
    with pytest.raises(InvalidStatus, match="already released"):
        client.refund(ESC)


def test_refund_on_a_live_server_of_a_disputed_escrow_is_invalid_status(client, mock):
    mock.get(f"{URL}/openapi.json", json=LIVE_OPENAPI)
    mock.get(f"{URL}/escrow/{ESC}", json=record("disputed"))
    with pytest.raises(InvalidStatus, match="disputed"):
        client.refund(ESC)


def test_refund_on_a_sandbox_is_a_full_refund_without_commission(client, mock):
    mock.get(f"{URL}/openapi.json", json=SANDBOX_OPENAPI)
    mock.post(f"{URL}/escrow/refund/{ESC}", json={
        "escrow_id": ESC, "status": "refunded", "amount_refunded": 2.5, "creator_id": "ag_payer",
        "_info": INFO})
    settlement = client.refund(ESC)
    assert (settlement.status, settlement.amount_usd, settlement.net_usd,
            settlement.commission_usd) == ("refunded", Decimal("2.5"), Decimal("2.5"), Decimal(0))


def test_capabilities_come_from_the_sandbox_marker_and_are_read_once(client, mock):
    mock.get(f"{URL}/openapi.json", json=SANDBOX_OPENAPI)
    assert client.capabilities() == {"refund", "idempotency", "faucet", "balance"}
    assert client.supports_refund and client.supports_idempotency
    assert mock.call_count == 1


def test_a_server_without_the_marker_has_no_capabilities(client, mock):
    mock.get(f"{URL}/openapi.json", json=LIVE_OPENAPI)
    assert client.capabilities() == frozenset()
    assert not client.supports_refund
    assert client.balance() is None


def test_a_server_without_openapi_json_has_no_capabilities(client, mock):
    mock.get(f"{URL}/openapi.json", status_code=404, json={"error": "not_found"})
    assert client.capabilities() == frozenset()


def test_balance_on_a_sandbox_server_reads_the_wallet(client, mock):
    mock.get(f"{URL}/openapi.json", json=SANDBOX_OPENAPI)
    mock.get(f"{URL}/wallet/balance",
             json={"agent_id": "ag_payer", "usdc": 997.5, "locked": 2.5, "_info": INFO})
    assert client.balance() == {
        "agent_id": "ag_payer", "usdc": Decimal("997.5"), "locked": Decimal("2.5")}


def test_create_and_release_send_exactly_two_requests_and_never_sleep(client, mock, monkeypatch):
    waits: list = []
    monkeypatch.setattr(client_mod, "_sleep", waits.append)
    mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    mock.post(f"{URL}/escrow/release/{ESC}", json=RELEASED)
    client.release(create(client))
    assert mock.call_count == 2
    assert waits == []


# --------------------------------------------------------------------------- bad input


BAD_CREATES = [
    pytest.param({"amount_usd": "0.05"}, InvalidAmount, id="below-minimum"),
    pytest.param({"amount_usd": "1.0000001"}, InvalidAmount, id="seven-places"),
    pytest.param({"amount_usd": "-1"}, InvalidAmount, id="negative"),
    pytest.param({"amount_usd": float("nan")}, InvalidAmount, id="nan"),
    pytest.param({"amount_usd": "Infinity"}, InvalidAmount, id="infinity"),
    pytest.param({"amount_usd": True}, InvalidAmount, id="bool"),
    pytest.param({"amount_usd": "two"}, InvalidAmount, id="words"),
    pytest.param({"counterparty_agent_id": "0x52908400098527886E0F7030069857D2E4169EE7"},
                 InvalidAgentId, id="wallet-address"),
    pytest.param({"counterparty_agent_id": "worker"}, InvalidAgentId, id="no-ag-prefix"),
    pytest.param({"counterparty_agent_id": ""}, InvalidAgentId, id="empty-agent"),
    pytest.param({"counterparty_agent_id": "ag_x y"}, InvalidAgentId, id="space-in-agent"),
    pytest.param({"description": "ab"}, InvalidDescription, id="short-description"),
    pytest.param({"description": "   "}, InvalidDescription, id="blank-description"),
    pytest.param({"timeout_hours": 0}, InvalidRequest, id="timeout-0"),
    pytest.param({"timeout_hours": 721}, InvalidRequest, id="timeout-721"),
    pytest.param({"timeout_hours": 1.5}, InvalidRequest, id="timeout-float"),
    pytest.param({"timeout_hours": True}, InvalidRequest, id="timeout-bool"),
    pytest.param({"idempotency_key": "has space"}, InvalidRequest, id="idempotency-space"),
    pytest.param({"idempotency_key": "line\nbreak"}, InvalidRequest, id="idempotency-newline"),
    pytest.param({"referral_code": ""}, InvalidRequest, id="empty-referral"),
]


@pytest.mark.parametrize("bad, error", BAD_CREATES)
def test_bad_create_input_raises_before_any_request(client, mock, bad, error):
    with pytest.raises(error):
        create(client, **bad)
    assert mock.call_count == 0


@pytest.mark.parametrize("escrow_id", ["", "123", "esc_../../wallet", "esc_a/b", None])
def test_malformed_escrow_ids_raise_before_any_request(client, mock, escrow_id):
    for operation in (client.get, client.release, client.refund):
        with pytest.raises(InvalidRequest):
            operation(escrow_id)
    assert mock.call_count == 0


def test_timeout_hours_at_the_bounds_are_accepted(client, mock):
    mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    create(client, timeout_hours=1)
    create(client, timeout_hours=720)
    assert [r.json()["timeout_hours"] for r in mock.request_history] == [1, 720]


# --------------------------------------------------------------------------- api.py


def test_pf_create_sends_the_referral_code_from_the_environment(client, mock, monkeypatch):
    monkeypatch.setenv("PF_REFERRAL_CODE", "ref_from_env")
    mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    escrow = pf_create("ag_worker", "2.50", "label 1,000 images", client=client)
    assert escrow.escrow_id == ESC
    assert mock.last_request.json()["referral_code"] == "ref_from_env"


def test_pf_create_names_its_own_parameters_in_errors(client, mock):
    with pytest.raises(InvalidAgentId, match="agent_wallet"):
        pf_create("0xabc", "2.50", client=client)
    with pytest.raises(InvalidAmount, match="amount_usdc"):
        pf_create("ag_worker", "0.01", client=client)
    assert mock.call_count == 0


def test_pf_create_defaults_to_a_generic_description(client, mock):
    mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    pf_create("ag_worker", 1, client=client)
    assert mock.last_request.json()["description"] == "pf-metaflow escrow"


def test_pf_release_pf_refund_and_pf_get_take_an_escrow_or_its_id(client, mock):
    mock.get(f"{URL}/openapi.json", json=LIVE_OPENAPI)
    mock.get(f"{URL}/escrow/{ESC}", json=record())
    mock.post(f"{URL}/escrow/release/{ESC}", json=RELEASED)
    escrow = pf_get(ESC, client=client)
    assert pf_release(escrow, client=client).status == "released"
    assert pf_refund(ESC, client=client).status == "refund_pending"


def test_api_helpers_use_the_default_client_from_the_environment(mock, monkeypatch):
    monkeypatch.setenv("PF_ESCROW_URL", URL)
    monkeypatch.setenv("PF_API_KEY", KEY)
    mock.get(f"{URL}/escrow/{ESC}", json=record())
    assert pf_get(ESC).escrow_id == ESC
    assert mock.last_request.headers["Authorization"] == f"Bearer {KEY}"


# --------------------------------------------------------------------------- logs


def test_debug_logs_of_a_retried_conversation_never_hold_the_key(mock, monkeypatch, caplog):
    monkeypatch.setattr(client_mod, "_sleep", lambda seconds: None)
    client = EscrowClient(URL, KEY)
    mock.post(f"{URL}/escrow/create", [
        {"status_code": 429, "headers": {"Retry-After": "1"}, "json": {"error": "rate_limited"}},
        {"status_code": 201, "json": CREATED},
    ])
    with caplog.at_level(logging.DEBUG):
        create(client)
    assert "retrying" in caplog.text
    assert KEY not in caplog.text


def test_every_error_class_raised_here_is_a_purple_flea_error(client, mock):
    mock.get(f"{URL}/escrow/{ESC}", status_code=418, json={"error": "teapot"})
    with pytest.raises(PurpleFleaError) as caught:
        client.get(ESC)
    assert caught.value.status == 418
