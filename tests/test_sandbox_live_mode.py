"""``pf-metaflow sandbox serve --live``: a real server process that behaves like live.

Live's facts (docs/design.md, "Rate limits"): a fixed window that opens with a bucket's
first request and counts every request, refused ones too; buckets keyed on the request
path and the first ``X-Forwarded-For`` address (else ``X-Real-IP``, else one shared bucket);
creates limited per client, release / complete / dispute per escrow path; over the limit
429 ``{"error": "rate_limited", "message": "Too many requests. Limit: N per Ss"}`` (plus the
``_info`` object every body carries) with no ``Retry-After`` header. No refund endpoint,
no idempotency keys.

Every request goes to 127.0.0.1; every loop is bounded; windows are a few seconds at most.
"""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
import requests

from pf_metaflow.sandbox.engine import PAYER_KEY, WORKER_KEY, SandboxEngine

D = Decimal
PAYER = "ag_sandbox_payer"
AS_PAYER = {"Authorization": f"Bearer {PAYER_KEY}"}
AS_WORKER = {"Authorization": f"Bearer {WORKER_KEY}"}
AMOUNT = D("1.5")
ESCROW = {"amount_usd": 1.5, "description": "label data",
          "counterparty_agent_id": "ag_sandbox_worker"}
MINTED = D("1000000")
TIMEOUT = 10


@pytest.fixture
def live_server(start_sandbox_server, tmp_path):
    """``live_server(*flags)``: a ``serve --live FLAGS`` subprocess on its own database."""
    count = iter(range(100))

    def start(*flags: str):
        return start_sandbox_server(tmp_path / f"live{next(count)}.db", "--live", *flags)

    return start


@pytest.fixture
def http():
    with requests.Session() as session:
        yield session


def create(http, server, headers=None, **fields):
    return http.post(f"{server.url}/escrow/create", json={**ESCROW, **fields},
                     headers={**AS_PAYER, **(headers or {})}, timeout=TIMEOUT)


def post(http, server, path, headers=AS_PAYER, **kwargs):
    return http.post(f"{server.url}{path}", headers=headers, timeout=TIMEOUT, **kwargs)


def assert_live_429(response, count: int, seconds: str) -> None:
    assert response.status_code == 429
    assert "Retry-After" not in response.headers
    body = response.json()
    assert set(body) == {"error", "message", "_info"}  # _info: as on every body, as live
    assert {k: body[k] for k in ("error", "message")} == {
        "error": "rate_limited", "message": f"Too many requests. Limit: {count} per {seconds}s"}


def assert_money(http, server, escrows_funded: int) -> None:
    """Only the ``escrows_funded`` accepted creates locked money; nothing else moved."""
    balances = http.get(f"{server.url}/sandbox/balances", timeout=TIMEOUT).json()
    locked = AMOUNT * escrows_funded
    assert balances["agents"][PAYER] == {"usdc": f"{MINTED - locked:.6f}",
                                         "locked": f"{locked:.6f}"}
    assert (balances["minted"], balances["house_fees"]) == (f"{MINTED:.6f}", "0.000000")
    stats = http.get(f"{server.url}/escrow/stats", timeout=TIMEOUT).json()
    assert stats["total_created"] == escrows_funded
    SandboxEngine(server.db).check_invariant()


# -- creates --------------------------------------------------------------------------------


def test_the_21st_create_in_a_window_is_429_with_lives_body_and_no_retry_after(
        live_server, http):
    server = live_server()  # live's own numbers: 20 per 60 s
    answers = [create(http, server) for _ in range(20)]
    assert [r.status_code for r in answers] == [201] * 20
    assert_live_429(create(http, server), 20, "60")
    assert_live_429(create(http, server), 20, "60")
    assert_money(http, server, escrows_funded=20)


def test_create_rate_sets_the_numbers_and_the_message_names_them(live_server, http):
    server = live_server("--create-rate", "2/2.5")
    assert [create(http, server).status_code for _ in range(2)] == [201, 201]
    assert_live_429(create(http, server), 2, "2.5")
    assert_money(http, server, escrows_funded=2)


def test_the_window_opens_with_the_first_request_and_refused_requests_do_not_extend_it(
        live_server, http):
    server = live_server("--create-rate", "3/2")
    sent = time.monotonic()
    first = create(http, server)
    opened_by = time.monotonic()  # the server opened the window between `sent` and now
    assert first.status_code == 201
    assert [create(http, server).status_code for _ in range(2)] == [201, 201]

    # Keep knocking during the window: every knock is refused (and counted) ...
    refused = 0
    for _ in range(40):
        if time.monotonic() > sent + 1.6:
            break
        response = create(http, server)
        if time.monotonic() < sent + 2:  # surely inside the window
            assert_live_429(response, 3, "2")
            refused += 1
        time.sleep(0.1)
    assert refused >= 3

    # ... yet the window still ends 2 s after the first request, not after the last knock.
    time.sleep(max(0.0, opened_by + 2.05 - time.monotonic()))
    sent = time.monotonic()
    assert create(http, server).status_code == 201  # opens the next window
    again = [create(http, server) for _ in range(3)]
    if time.monotonic() < sent + 2:
        assert [r.status_code for r in again[:2]] == [201, 201]
        assert_live_429(again[2], 3, "2")
    assert_money(http, server, escrows_funded=6)


def test_requests_refused_for_other_reasons_count_too(live_server, http):
    server = live_server("--create-rate", "3/60")
    unauthorized = create(http, server, headers={"Authorization": "Bearer pf_sandbox_nope"})
    invalid = create(http, server, amount_usd=0.01)
    assert (unauthorized.status_code, invalid.status_code) == (401, 400)
    assert create(http, server).status_code == 201
    assert_live_429(create(http, server), 3, "60")
    assert_money(http, server, escrows_funded=1)


# -- whose bucket ---------------------------------------------------------------------------


def test_each_forwarded_address_has_its_own_bucket(live_server, http):
    server = live_server("--create-rate", "2/60")

    def codes(headers, n):
        return [create(http, server, headers=headers).status_code for _ in range(n)]

    # the first X-Forwarded-For entry is the client; the proxies after it do not matter
    assert codes({"X-Forwarded-For": "10.0.0.1, 172.16.0.1"}, 3) == [201, 201, 429]
    assert codes({"X-Forwarded-For": "10.0.0.2 , 10.0.0.7"}, 1) == [201]
    assert codes({"X-Forwarded-For": "10.0.0.9, 10.0.0.1"}, 1) == [201]
    # X-Forwarded-For wins over X-Real-IP
    assert codes({"X-Forwarded-For": "10.0.0.4", "X-Real-IP": "10.0.0.1"}, 1) == [201]
    # an address is one bucket however it arrives
    assert codes({"X-Forwarded-For": "10.0.0.2"}, 2) == [201, 429]
    assert_money(http, server, escrows_funded=6)


def test_x_real_ip_is_the_client_when_there_is_no_x_forwarded_for(live_server, http):
    server = live_server("--create-rate", "2/60")
    real = {"X-Real-IP": "10.0.0.3"}
    assert [create(http, server, headers=real).status_code for _ in range(2)] == [201, 201]
    assert_live_429(create(http, server, headers=real), 2, "60")
    assert_live_429(create(http, server, headers={"X-Forwarded-For": "10.0.0.3"}), 2, "60")
    assert create(http, server, headers={"X-Real-IP": "10.0.0.5"}).status_code == 201
    assert_money(http, server, escrows_funded=3)


def test_without_address_headers_every_client_shares_one_bucket(live_server, http):
    server = live_server("--create-rate", "2/60")
    with requests.Session() as other:  # another connection from another "client"
        assert create(http, server).status_code == 201
        assert create(other, server).status_code == 201
        assert_live_429(create(http, server), 2, "60")
        assert_live_429(create(other, server), 2, "60")
    # the shared bucket is not any forwarded client's
    assert create(http, server, headers={"X-Forwarded-For": "10.0.0.1"}).status_code == 201
    assert_money(http, server, escrows_funded=3)


# -- release, complete, dispute: per escrow path ---------------------------------------------


def test_release_is_limited_per_escrow_path_and_a_refused_release_moves_nothing(
        live_server, http):
    server = live_server("--release-rate", "2/60")
    first, second, third = (create(http, server).json()["escrow_id"] for _ in range(3))

    assert post(http, server, f"/escrow/release/{first}").status_code == 200
    assert post(http, server, f"/escrow/release/{first}").status_code == 409
    assert_live_429(post(http, server, f"/escrow/release/{first}"), 2, "60")
    # another escrow is another path, another bucket
    assert post(http, server, f"/escrow/release/{second}").status_code == 200

    # the worker may not release (403), but it spends the path's window all the same
    for _ in range(2):
        assert post(http, server, f"/escrow/release/{third}", AS_WORKER).status_code == 403
    assert_live_429(post(http, server, f"/escrow/release/{third}"), 2, "60")
    escrow = http.get(f"{server.url}/escrow/{third}", timeout=TIMEOUT).json()
    assert escrow["status"] == "funded"

    balances = http.get(f"{server.url}/sandbox/balances", timeout=TIMEOUT).json()
    assert balances["agents"][PAYER]["locked"] == f"{AMOUNT:.6f}"
    assert balances["agents"]["ag_sandbox_worker"]["usdc"] == f"{2 * AMOUNT * D('0.99'):.6f}"
    assert balances["house_fees"] == f"{2 * AMOUNT * D('0.01'):.6f}"
    SandboxEngine(server.db).check_invariant()


def test_complete_shares_the_release_numbers_and_dispute_has_its_own(live_server, http):
    server = live_server("--release-rate", "1/60", "--dispute-rate", "1/60")
    escrow_id = create(http, server).json()["escrow_id"]

    assert post(http, server, f"/escrow/complete/{escrow_id}", AS_WORKER).status_code == 200
    assert_live_429(post(http, server, f"/escrow/complete/{escrow_id}", AS_WORKER), 1, "60")
    # release of the same escrow is another path
    assert post(http, server, f"/escrow/release/{escrow_id}").status_code == 200

    other = create(http, server).json()["escrow_id"]
    assert post(http, server, f"/escrow/dispute/{other}", json={"reason": "late work"}
                ).status_code == 200
    assert_live_429(post(http, server, f"/escrow/dispute/{other}"), 1, "60")
    SandboxEngine(server.db).check_invariant()


def test_dispute_is_10_per_window_per_escrow_by_default(live_server, http):
    server = live_server()
    escrow_id = create(http, server).json()["escrow_id"]
    codes = [post(http, server, f"/escrow/dispute/{escrow_id}").status_code
             for _ in range(10)]
    assert codes == [200] + [409] * 9
    assert_live_429(post(http, server, f"/escrow/dispute/{escrow_id}"), 10, "60")
    # release and complete would allow 30; the disputed escrow stays locked
    assert post(http, server, f"/escrow/release/{escrow_id}").status_code == 409
    assert_money(http, server, escrows_funded=1)


# -- no refund, no idempotency -------------------------------------------------------------


def test_live_mode_advertises_neither_refund_nor_idempotency(live_server, http):
    server = live_server()
    response = http.get(f"{server.url}/openapi.json", timeout=TIMEOUT)
    doc = response.json()
    assert doc["x-pf-sandbox"] == {"extensions": ["faucet", "balance"]}
    assert not any("refund" in path for path in doc["paths"])
    assert "idempotency" not in response.text.lower()
    assert "refund" not in response.text.lower()
    index = http.get(f"{server.url}/", timeout=TIMEOUT).json()
    assert index["extensions"] == ["faucet", "balance"]
    assert index["_info"]["extensions"] == ["faucet", "balance"]


def test_live_mode_has_no_refund_endpoint(live_server, http):
    server = live_server()
    escrow_id = create(http, server).json()["escrow_id"]
    refund = post(http, server, f"/escrow/refund/{escrow_id}")
    assert (refund.status_code, refund.json()["error"]) == (404, "not_found")
    escrow = http.get(f"{server.url}/escrow/{escrow_id}", timeout=TIMEOUT).json()
    assert escrow["status"] == "funded"
    assert_money(http, server, escrows_funded=1)


def test_live_mode_ignores_idempotency_keys(live_server, http):
    server = live_server()
    key = {"Idempotency-Key": "flow/1/train/3"}
    first, again = create(http, server, headers=key), create(http, server, headers=key)
    assert (first.status_code, again.status_code) == (201, 201)
    assert first.json()["escrow_id"] != again.json()["escrow_id"]
    assert "Idempotent-Replayed" not in again.headers
    different = create(http, server, headers=key, description="other work")  # no 409
    assert different.status_code == 201
    assert_money(http, server, escrows_funded=3)
