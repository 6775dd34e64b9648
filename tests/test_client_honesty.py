"""The client is honest about what a server ignores and what it is.

- An idempotency key sent to a server that does not honour keys: a warning (once per
  client) and ``Escrow.idempotency_honoured`` False; capabilities are read once.
- ``refund()`` on a server without a refund call reports ``refund_pending`` only for an
  escrow the caller's key created (the live GET is public: anyone can read any escrow).
- ``is_sandbox``: the embedded sandbox and a server advertising the sandbox marker.

requests-mock plays the live service; the real HTTP sandbox, run like live
(``--no-refund --no-idempotency``), checks the same against a server.
"""

from __future__ import annotations

import logging
from decimal import Decimal

import pytest

from pf_metaflow.client import EscrowClient
from pf_metaflow.errors import ConfigurationError, InvalidRequest, PermissionDenied
from pf_metaflow.sandbox.engine import SandboxEngine

URL = "https://escrow.purpleflea.com"
KEY = "pf_live_honestTESTkey_0123456789"
ESC = "esc_0123456789abcdef"
CREATED = {
    "escrow_id": ESC, "amount_usd": 2.5, "commission_usd": 0.025, "net_to_counterparty": 2.475,
    "description": "label data", "creator_id": "ag_me", "counterparty_id": "ag_worker",
    "status": "funded", "timeout_hours": 24, "auto_release_at": "2026-01-02T00:00:00.000Z",
}
LIVE_OPENAPI = {"openapi": "3.0.0", "paths": {"/escrow/create": {}}}
SANDBOX_OPENAPI = {"openapi": "3.0.3", "paths": {},
                   "x-pf-sandbox": {"extensions": ["refund", "idempotency", "faucet", "balance"]}}
LIKE_LIVE_OPENAPI = {"openapi": "3.0.3", "paths": {},
                     "x-pf-sandbox": {"extensions": ["faucet", "balance"]}}
PAYER_KEY = "pf_sandbox_payer_key"
WORKER_KEY = "pf_sandbox_worker_key"


@pytest.fixture
def client() -> EscrowClient:
    return EscrowClient(URL, KEY, max_attempts=1)


def record(**changes) -> dict:
    return {**CREATED, "created_at": "2026-01-01T00:00:00.000Z", **changes}


def create(client: EscrowClient, **kwargs):
    return client.create("2.50", counterparty_agent_id="ag_worker", description="label data", **kwargs)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- idempotency keys


def test_a_key_sent_to_a_server_that_ignores_keys_is_reported_loudly(client, requests_mock, caplog):
    requests_mock.get(f"{URL}/openapi.json", json=LIVE_OPENAPI)
    requests_mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    with caplog.at_level(logging.WARNING, logger="pf_metaflow"):
        escrow = create(client, idempotency_key="run/1/train/0")
    assert escrow.idempotency_honoured is False
    [warning] = warnings_of(caplog)
    assert URL in warning
    assert "does not honour idempotency keys" in warning
    assert "does nothing" in warning and "cannot be retried" in warning
    assert KEY not in caplog.text


def test_the_warning_comes_once_per_client_and_capabilities_are_read_once(client, requests_mock, caplog):
    requests_mock.get(f"{URL}/openapi.json", json=LIVE_OPENAPI)
    requests_mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    with caplog.at_level(logging.WARNING, logger="pf_metaflow"):
        for n in range(3):
            assert create(client, idempotency_key=f"run/1/train/{n}").idempotency_honoured is False
    assert len(warnings_of(caplog)) == 1
    assert [r.method for r in requests_mock.request_history] == ["GET", "POST", "POST", "POST"]


def test_a_server_that_honours_keys_says_so_without_a_warning(client, requests_mock, caplog):
    requests_mock.get(f"{URL}/openapi.json", json=SANDBOX_OPENAPI)
    requests_mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    with caplog.at_level(logging.WARNING, logger="pf_metaflow"):
        assert create(client, idempotency_key="k-1").idempotency_honoured is True
    assert warnings_of(caplog) == []


def test_a_create_without_a_key_costs_no_capability_read(client, requests_mock, caplog):
    requests_mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    with caplog.at_level(logging.WARNING, logger="pf_metaflow"):
        assert create(client).idempotency_honoured is None
    assert requests_mock.call_count == 1
    assert warnings_of(caplog) == []


def test_capabilities_that_cannot_be_read_leave_it_unknown_and_say_so(client, requests_mock, caplog):
    requests_mock.get(f"{URL}/openapi.json", status_code=500, json={"error": "internal_error"})
    requests_mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    with caplog.at_level(logging.WARNING, logger="pf_metaflow"):
        assert create(client, idempotency_key="k-1").idempotency_honoured is None
    [warning] = warnings_of(caplog)
    assert "could not learn whether" in warning


def test_the_embedded_sandbox_honours_keys(tmp_path):
    client = EscrowClient(f"sandbox://{tmp_path / 'e.db'}")
    escrow = client.create("1", counterparty_agent_id="ag_sandbox_worker", description="keyed",
                           idempotency_key="run/1/s/0")
    assert escrow.idempotency_honoured is True


def test_a_real_server_run_like_live_ignores_the_key_and_the_client_says_so(
    start_sandbox_server, tmp_path, caplog
):
    server = start_sandbox_server(tmp_path / "live_like.db", "--no-refund", "--no-idempotency")
    client = EscrowClient(server.url, PAYER_KEY)
    args = dict(counterparty_agent_id="ag_sandbox_worker", description="same key twice",
                idempotency_key="run/1/s/0")
    with caplog.at_level(logging.WARNING, logger="pf_metaflow"):
        first, second = client.create("1", **args), client.create("1", **args)
    assert first.escrow_id != second.escrow_id  # the key did nothing: two escrows
    assert (first.idempotency_honoured, second.idempotency_honoured) == (False, False)
    assert len(warnings_of(caplog)) == 1 and server.url in warnings_of(caplog)[0]


# --------------------------------------------------------------------------- refund_pending: only our own


def live(requests_mock, **escrow_changes) -> None:
    requests_mock.get(f"{URL}/openapi.json", json=LIVE_OPENAPI)
    requests_mock.get(f"{URL}/escrow/{ESC}", json=record(**escrow_changes))


def test_refund_of_an_escrow_another_key_created_is_refused(client, requests_mock):
    live(requests_mock, creator_id="ag_someone_else")
    requests_mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)  # we are ag_me
    create(client)
    with pytest.raises(PermissionDenied) as caught:
        client.refund(ESC)
    message = str(caught.value)
    assert "ag_someone_else" in message and "ag_me" in message
    assert KEY not in message and KEY not in repr(caught.value)
    assert not [r for r in requests_mock.request_history if r.method == "POST" and "refund" in r.url]


def test_refund_of_an_escrow_not_made_by_the_expected_creator_is_refused(client, requests_mock):
    live(requests_mock, creator_id="ag_someone_else")
    with pytest.raises(PermissionDenied, match="ag_someone_else"):
        client.refund(ESC, creator_id="ag_me")


def test_refund_of_our_own_escrow_is_pending_and_verified(client, requests_mock):
    live(requests_mock)
    settlement = client.refund(ESC, creator_id="ag_me")
    assert settlement.status == "refund_pending"
    assert "could not be verified" not in settlement.detail


def test_refund_of_an_escrow_after_our_own_create_is_verified_by_its_creator_id(client, requests_mock):
    live(requests_mock)
    requests_mock.post(f"{URL}/escrow/create", status_code=201, json=CREATED)
    create(client)
    assert "could not be verified" not in client.refund(ESC).detail


def test_refund_when_nobody_can_tell_whose_key_this_is_says_so(client, requests_mock):
    live(requests_mock)
    settlement = client.refund(ESC)
    assert settlement.status == "refund_pending"
    assert "creator could not be verified" in settlement.detail
    assert "creator_id=" in settlement.detail
    assert [r.method for r in requests_mock.request_history] == ["GET", "GET"]  # reads only


def test_an_already_refunded_escrow_of_another_creator_is_refused_too(client, requests_mock):
    live(requests_mock, status="refunded", creator_id="ag_someone_else")
    with pytest.raises(PermissionDenied):
        client.refund(ESC, creator_id="ag_me")


def test_a_malformed_expected_creator_is_refused_before_any_request(client, requests_mock):
    with pytest.raises(InvalidRequest):
        client.refund(ESC, creator_id="not an agent")
    assert requests_mock.call_count == 0


@pytest.fixture
def like_live(start_sandbox_server, tmp_path):
    return start_sandbox_server(tmp_path / "like_live.db", "--no-refund", "--no-idempotency")


def test_a_real_server_run_like_live_reports_refund_pending_for_the_creator(like_live):
    escrow = EscrowClient(like_live.url, PAYER_KEY).create(
        "2.00", counterparty_agent_id="ag_sandbox_worker", description="give it back")
    fresh = EscrowClient(like_live.url, PAYER_KEY)  # learns whose key it is from the balance
    settlement = fresh.refund(escrow.escrow_id)
    assert (settlement.status, settlement.commission_usd, settlement.net_usd) == (
        "refund_pending", Decimal("0.020000"), Decimal("1.980000"))
    assert "could not be verified" not in settlement.detail
    assert SandboxEngine(like_live.db).get(escrow.escrow_id)["status"] == "funded"


def test_a_real_server_run_like_live_refuses_refund_pending_to_another_key(like_live):
    escrow = EscrowClient(like_live.url, PAYER_KEY).create(
        "2.00", counterparty_agent_id="ag_sandbox_worker", description="not yours")
    with pytest.raises(PermissionDenied, match="ag_sandbox_payer") as caught:
        EscrowClient(like_live.url, WORKER_KEY).refund(escrow.escrow_id)
    assert WORKER_KEY not in str(caught.value) and PAYER_KEY not in str(caught.value)


# --------------------------------------------------------------------------- is_sandbox


def test_the_embedded_sandbox_is_a_sandbox(tmp_path):
    assert EscrowClient(f"sandbox://{tmp_path / 'e.db'}").is_sandbox is True


@pytest.mark.parametrize("openapi, sandbox", [(SANDBOX_OPENAPI, True), (LIKE_LIVE_OPENAPI, True),
                                              (LIVE_OPENAPI, False)])
def test_an_http_server_is_a_sandbox_only_if_it_says_so(client, requests_mock, openapi, sandbox):
    requests_mock.get(f"{URL}/openapi.json", json=openapi)
    assert client.is_sandbox is sandbox
    assert client.is_sandbox is sandbox
    assert requests_mock.call_count == 1


def test_a_server_without_openapi_is_not_a_sandbox(client, requests_mock):
    requests_mock.get(f"{URL}/openapi.json", status_code=404, json={"error": "not_found"})
    assert client.is_sandbox is False


def test_a_real_sandbox_server_run_like_live_is_still_a_sandbox(like_live):
    client = EscrowClient(like_live.url, PAYER_KEY)
    assert client.is_sandbox is True
    assert not client.supports_refund and not client.supports_idempotency


def test_a_configuration_error_never_becomes_a_sandbox():
    with pytest.raises(ConfigurationError):
        EscrowClient("ftp://escrow.example", KEY)


def test_pf_refund_passes_the_expected_creator(client, requests_mock):
    from pf_metaflow.api import pf_refund

    live(requests_mock, creator_id="ag_someone_else")
    with pytest.raises(PermissionDenied):
        pf_refund(ESC, creator_id="ag_me", client=client)
