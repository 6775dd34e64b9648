"""What the client retries, what it never retries, and how long it waits.

Only failures that cannot move money twice are retried: the request never left, the
server said "not now" (429, 503), or the operation is safe to repeat (a read, a
create with an Idempotency-Key on a server that honours it, a release/refund checked
first). Sleeps are recorded instead of slept.
"""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from http.client import RemoteDisconnected

import pytest
import requests
from urllib3.exceptions import MaxRetryError, NewConnectionError
from urllib3.exceptions import ProtocolError as Urllib3ProtocolError

from pf_metaflow import retries as client_mod
from pf_metaflow.client import EscrowClient
from pf_metaflow.errors import (
    AmbiguousOutcome,
    InsufficientFunds,
    InvalidStatus,
    NetworkError,
    RateLimited,
    ServerError,
    ServiceUnavailable,
)
from pf_metaflow.sandbox.server import make_app, make_http_server, server_url

URL = "https://escrow.purpleflea.com"
KEY = "pf_live_retryTESTkey_0123456789"
ESC = "esc_00aa11bb22cc33dd"
CREATE = f"{URL}/escrow/create"
RELEASE = f"{URL}/escrow/release/{ESC}"
REFUND = f"{URL}/escrow/refund/{ESC}"
GET = f"{URL}/escrow/{ESC}"
OPENAPI = f"{URL}/openapi.json"

CREATED = {
    "escrow_id": ESC, "amount_usd": 1.0, "commission_usd": 0.01, "net_to_counterparty": 0.99,
    "description": "shard 7 of 12", "creator_id": "ag_payer", "counterparty_id": "ag_worker",
    "status": "funded", "timeout_hours": 24, "auto_release_at": "2026-01-02T00:00:00.000Z",
}
RELEASED = {
    "escrow_id": ESC, "status": "released", "amount_released": 0.99, "commission": 0.01,
    "referral_commission": 0, "counterparty_id": "ag_worker",
}
LIVE_OPENAPI = {"openapi": "3.0.0", "paths": {}}
SANDBOX_OPENAPI = {"openapi": "3.0.3", "paths": {},
                   "x-pf-sandbox": {"extensions": ["refund", "idempotency"]}}


def record(status: str) -> dict:
    return {**CREATED, "status": status, "created_at": "2026-01-01T00:00:00.000Z"}


def refused() -> requests.exceptions.ConnectionError:
    """What requests raises when the connection is refused: nothing was sent."""
    reason = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] "
                                      "Connection refused")
    return requests.exceptions.ConnectionError(MaxRetryError(None, "/escrow/create", reason))


def dropped() -> requests.exceptions.ConnectionError:
    """What requests raises when the server hangs up after the request went out."""
    return requests.exceptions.ConnectionError(Urllib3ProtocolError(
        "Connection aborted.", RemoteDisconnected("Remote end closed connection without response")))


@pytest.fixture(autouse=True)
def _own_pacing_dir(monkeypatch, tmp_path) -> None:
    """Each test its own shared rate-limit window (pf_metaflow.pacing): none leaks between tests."""
    monkeypatch.setenv("PF_ESCROW_PACING_DIR", str(tmp_path / "pacing"))


@pytest.fixture
def waits(monkeypatch) -> list:
    recorded: list = []
    monkeypatch.setattr(client_mod, "_sleep", recorded.append)
    return recorded


@pytest.fixture
def client(waits) -> EscrowClient:
    return EscrowClient(URL, KEY, max_attempts=4, max_wait=30)


def create(client: EscrowClient, **kwargs):
    return client.create("1.00", counterparty_agent_id="ag_worker", description="shard 7 of 12",
                         **kwargs)


def sent(mock, method: str = "POST", url: str = CREATE) -> list:
    return [r for r in mock.request_history if r.method == method and r.url == url]


# --------------------------------------------------------------------------- never sent: retried


def test_a_refused_connection_is_retried_because_nothing_was_sent(client, requests_mock, waits):
    requests_mock.post(CREATE, [{"exc": refused()}, {"status_code": 201, "json": CREATED}])
    assert create(client).escrow_id == ESC
    assert len(sent(requests_mock)) == 2
    assert len(waits) == 1


def test_a_connect_timeout_is_retried(client, requests_mock, waits):
    requests_mock.post(CREATE, [{"exc": requests.exceptions.ConnectTimeout("connect timed out")},
                                {"status_code": 201, "json": CREATED}])
    assert create(client).escrow_id == ESC
    assert len(sent(requests_mock)) == 2


def test_a_refused_connection_gives_up_after_max_attempts(requests_mock, waits):
    client = EscrowClient(URL, KEY, max_attempts=3)
    requests_mock.post(CREATE, exc=refused())
    with pytest.raises(NetworkError, match="connection refused"):
        create(client)
    assert len(sent(requests_mock)) == 3
    assert len(waits) == 2


def test_backoff_without_retry_after_grows_exponentially_with_jitter(requests_mock, waits):
    client = EscrowClient(URL, KEY, max_attempts=4)
    requests_mock.post(CREATE, exc=refused())
    with pytest.raises(NetworkError):
        create(client)
    assert len(waits) == 3
    for n, wait in enumerate(waits):
        assert 2**n <= wait <= 2**n + 0.5


# --------------------------------------------------------------------------- create: unknown outcome


def test_a_read_timeout_on_create_without_idempotency_key_is_ambiguous_and_sent_once(
    client, requests_mock, waits
):
    requests_mock.post(CREATE, exc=requests.exceptions.ReadTimeout("read timed out"))
    with pytest.raises(AmbiguousOutcome) as caught:
        create(client)
    assert len(sent(requests_mock)) == 1
    assert requests_mock.call_count == 1  # not even a capability check
    assert waits == []
    assert caught.value.details["operation"] == "create"
    assert caught.value.details["description"] == "shard 7 of 12"
    assert "shard 7 of 12" in caught.value.message


def test_a_dropped_connection_after_sending_a_create_is_ambiguous(client, requests_mock):
    requests_mock.post(CREATE, exc=dropped())
    with pytest.raises(AmbiguousOutcome, match="closed by the server"):
        create(client)
    assert len(sent(requests_mock)) == 1


@pytest.mark.parametrize("status", [502, 504])
def test_a_gateway_error_on_create_is_ambiguous_and_not_retried(client, requests_mock, status):
    requests_mock.post(CREATE, status_code=status, text="<html>Bad Gateway</html>")
    with pytest.raises(AmbiguousOutcome) as caught:
        create(client)
    assert caught.value.status == status
    assert len(sent(requests_mock)) == 1


def test_a_read_timeout_with_idempotency_key_on_a_live_server_is_not_retried(
    client, requests_mock
):
    requests_mock.get(OPENAPI, json=LIVE_OPENAPI)
    requests_mock.post(CREATE, exc=requests.exceptions.ReadTimeout("read timed out"))
    with pytest.raises(AmbiguousOutcome, match="does not honour idempotency keys"):
        create(client, idempotency_key="run/1/step/0")
    assert len(sent(requests_mock)) == 1


def test_a_read_timeout_with_idempotency_key_is_retried_with_the_same_key_and_body(
    client, requests_mock
):
    requests_mock.get(OPENAPI, json=SANDBOX_OPENAPI)
    requests_mock.post(CREATE, [
        {"exc": requests.exceptions.ReadTimeout("read timed out")},
        {"status_code": 201, "json": CREATED, "headers": {"Idempotent-Replayed": "true"}},
    ])
    escrow = create(client, idempotency_key="run/1/step/0")
    assert escrow.replayed is True
    first, second = sent(requests_mock)
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == "run/1/step/0"
    assert first.text == second.text


def test_a_create_still_unanswered_after_max_attempts_is_ambiguous(requests_mock, waits):
    client = EscrowClient(URL, KEY, max_attempts=3)
    requests_mock.get(OPENAPI, json=SANDBOX_OPENAPI)
    requests_mock.post(CREATE, exc=requests.exceptions.ReadTimeout("read timed out"))
    with pytest.raises(AmbiguousOutcome) as caught:
        create(client, idempotency_key="k-9")
    assert type(caught.value) is AmbiguousOutcome
    assert len(sent(requests_mock)) == 3


def test_capabilities_that_cannot_be_read_mean_no_retry(client, requests_mock):
    requests_mock.get(OPENAPI, exc=refused())
    requests_mock.post(CREATE, exc=requests.exceptions.ReadTimeout("read timed out"))
    with pytest.raises(AmbiguousOutcome):
        create(client, idempotency_key="k-1")
    assert len(sent(requests_mock)) == 1


# --------------------------------------------------------------------------- 429 / 503 / 500


def test_429_waits_what_retry_after_says(client, requests_mock, waits):
    requests_mock.post(CREATE, [
        {"status_code": 429, "headers": {"Retry-After": "2"}, "json": {"error": "rate_limited"}},
        {"status_code": 201, "json": CREATED},
    ])
    assert create(client).escrow_id == ESC
    assert waits == [2.0]


def test_503_waits_what_retry_after_says_each_time(client, requests_mock, waits):
    requests_mock.get(GET, [
        {"status_code": 503, "headers": {"Retry-After": "3"}, "json": {"error": "unavailable"}},
        {"status_code": 503, "headers": {"Retry-After": "1.5"}, "text": "<html>down</html>"},
        {"status_code": 200, "json": record("funded")},
    ])
    assert client.get(ESC).status == "funded"
    assert waits == [3.0, 1.5]


def test_retry_after_as_an_http_date_is_honoured(client, requests_mock, waits):
    later = time.time() + 20
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(later))
    requests_mock.post(CREATE, [
        {"status_code": 429, "headers": {"Retry-After": date}, "json": {"error": "rate_limited"}},
        {"status_code": 201, "json": CREATED},
    ])
    create(client)
    assert len(waits) == 1 and 17 <= waits[0] <= 20


def test_429_without_retry_after_waits_for_the_window_its_message_names(requests_mock, waits):
    client = EscrowClient(URL, KEY, max_wait=600)
    requests_mock.post(CREATE, [
        {"status_code": 429, "json": {"error": "rate_limited",
                                      "message": "Too many requests. Limit: 20 per 60s"}},
        {"status_code": 201, "json": CREATED},
    ])
    assert create(client).escrow_id == ESC
    assert len(waits) == 1 and 60 <= waits[0] <= 62.5  # the window, not a short backoff


def test_429_without_retry_after_or_limit_waits_the_documented_60_s(requests_mock, waits):
    client = EscrowClient(URL, KEY, max_wait=600)
    requests_mock.post(CREATE, [
        {"status_code": 429, "json": {"error": "rate_limited"}},
        {"status_code": 201, "json": CREATED},
    ])
    create(client)
    assert len(waits) == 1 and 60 <= waits[0] <= 62.5


def test_a_429_window_beyond_max_wait_raises_saying_nothing_was_created(requests_mock, waits):
    client = EscrowClient(URL, KEY, max_wait=30)
    requests_mock.post(CREATE, status_code=429, json={
        "error": "rate_limited", "message": "Too many requests. Limit: 20 per 60s"})
    with pytest.raises(RateLimited) as caught:
        create(client)
    message = caught.value.message
    assert "20 per 60 s" in message and "PF_ESCROW_MAX_WAIT (30 s)" in message
    assert "never processed" in message and "nothing is locked" in message
    assert KEY not in message
    assert len(sent(requests_mock)) == 1 and waits == []


def test_max_wait_bounds_the_total_wait_over_many_windows(requests_mock, waits):
    client = EscrowClient(URL, KEY, max_wait=50)
    requests_mock.post(CREATE, status_code=429, json={
        "error": "rate_limited", "message": "Too many requests. Limit: 5 per 10s"})
    with pytest.raises(RateLimited) as caught:
        create(client)
    assert sum(waits) <= 50 and len(waits) >= 3  # waited window after window, then gave up
    assert "after waiting" in caught.value.message
    assert caught.value.details["gave_up"] is True


def test_a_429_on_release_without_retry_after_waits_for_its_window(client, requests_mock, waits):
    requests_mock.post(RELEASE, [
        {"status_code": 429, "json": {"error": "rate_limited",
                                      "message": "Too many requests. Limit: 30 per 10s"}},
        {"status_code": 200, "json": RELEASED},
    ])
    assert client.release(ESC).status == "released"
    assert len(waits) == 1 and 10 <= waits[0] <= 10.5


def test_a_retry_after_beyond_max_wait_is_not_waited_out(requests_mock, waits):
    client = EscrowClient(URL, KEY, max_wait=10)
    requests_mock.post(CREATE, status_code=429, headers={"Retry-After": "60"},
                       json={"error": "rate_limited", "message": "Limit: 20 per 60s"})
    with pytest.raises(RateLimited) as caught:
        create(client)
    assert caught.value.retry_after == 60.0
    assert waits == []
    assert len(sent(requests_mock)) == 1


def test_503_on_a_read_without_retry_after_gives_up_after_max_attempts(requests_mock, waits):
    client = EscrowClient(URL, KEY, max_attempts=3)
    requests_mock.get(GET, status_code=503, json={"error": "service_unavailable"})
    with pytest.raises(ServiceUnavailable):
        client.get(ESC)
    assert len(sent(requests_mock, "GET", GET)) == 3
    assert len(waits) == 2


def test_503_that_paces_with_retry_after_is_waited_out_but_never_more_than_50_requests(requests_mock, waits):
    client = EscrowClient(URL, KEY, max_attempts=3, max_wait=3600)
    requests_mock.get(GET, status_code=503, headers={"Retry-After": "1"},
                      json={"error": "service_unavailable"})
    with pytest.raises(ServiceUnavailable):
        client.get(ESC)
    assert len(sent(requests_mock, "GET", GET)) == 50
    assert waits == [1.0] * 49


def test_max_attempts_one_never_retries(requests_mock, waits):
    client = EscrowClient(URL, KEY, max_attempts=1)
    requests_mock.post(CREATE, exc=refused())
    with pytest.raises(NetworkError):
        create(client)
    assert len(sent(requests_mock)) == 1 and waits == []


FIVE_HUNDREDS = [
    pytest.param({"status_code": 500, "json": {"error": "debit_failed"}}, id="500-debit_failed"),
    pytest.param({"status_code": 500, "json": {"error": "internal_error"}}, id="500-internal_error"),
    pytest.param({"status_code": 500, "text": "<html>Internal Server Error</html>"}, id="500-html"),
    pytest.param({"status_code": 503, "json": {"error": "service_unavailable"}}, id="503-json"),
    pytest.param({"status_code": 503, "headers": {"Retry-After": "1"},
                  "json": {"error": "service_unavailable"}}, id="503-retry-after"),
    pytest.param({"status_code": 503, "text": "<html>down</html>"}, id="503-proxy-page"),
    pytest.param({"status_code": 502, "text": "<html>Bad Gateway</html>"}, id="502-proxy-page"),
    pytest.param({"status_code": 504, "text": "<html>Gateway Timeout</html>"}, id="504-proxy-page"),
    pytest.param({"status_code": 520, "text": "<html>Error 520</html>"}, id="520-cdn-page"),
]


@pytest.mark.parametrize("answer", FIVE_HUNDREDS)
def test_a_5xx_on_create_is_ambiguous_and_sent_once(client, requests_mock, waits, answer):
    requests_mock.post(CREATE, **answer)
    with pytest.raises(AmbiguousOutcome) as caught:
        create(client)
    assert type(caught.value) is AmbiguousOutcome
    assert caught.value.status == answer["status_code"]
    assert caught.value.details["description"] == "shard 7 of 12"
    assert len(sent(requests_mock)) == 1 and waits == []
    assert requests_mock.call_count == 1  # no key: not even a capability check


@pytest.mark.parametrize("answer", FIVE_HUNDREDS)
def test_a_5xx_on_create_with_a_key_the_server_ignores_is_ambiguous_and_sent_once(
    client, requests_mock, waits, answer
):
    requests_mock.get(OPENAPI, json=LIVE_OPENAPI)
    requests_mock.post(CREATE, **answer)
    with pytest.raises(AmbiguousOutcome, match="does not honour idempotency keys"):
        create(client, idempotency_key="run/1/step/0")
    assert len(sent(requests_mock)) == 1 and waits == []


@pytest.mark.parametrize("answer", FIVE_HUNDREDS)
def test_a_5xx_on_create_with_a_key_the_server_honours_is_resent_with_the_same_key(
    client, requests_mock, answer
):
    requests_mock.get(OPENAPI, json=SANDBOX_OPENAPI)
    requests_mock.post(CREATE, [answer, {"status_code": 201, "json": CREATED,
                                         "headers": {"Idempotent-Replayed": "true"}}])
    escrow = create(client, idempotency_key="run/1/step/0")
    assert (escrow.escrow_id, escrow.replayed) == (ESC, True)
    first, second = sent(requests_mock)
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] == "run/1/step/0"
    assert first.text == second.text


def test_a_reset_after_sending_a_create_is_ambiguous_and_sent_once(client, requests_mock, waits):
    reset = requests.exceptions.ConnectionError(Urllib3ProtocolError(
        "Connection aborted.", ConnectionResetError(104, "Connection reset by peer")))
    requests_mock.post(CREATE, exc=reset)
    with pytest.raises(AmbiguousOutcome, match="connection reset"):
        create(client)
    assert len(sent(requests_mock)) == 1 and waits == []


def test_a_500_on_release_is_not_retried(client, requests_mock, waits):
    requests_mock.post(RELEASE, status_code=500, json={"error": "release_failed"})
    with pytest.raises(ServerError):
        client.release(ESC)
    assert len(sent(requests_mock, "POST", RELEASE)) == 1 and waits == []


def test_503_on_release_is_still_retried(client, requests_mock, waits):
    requests_mock.post(RELEASE, [{"status_code": 503, "json": {"error": "service_unavailable"}},
                                 {"status_code": 200, "json": RELEASED}])
    assert client.release(ESC).status == "released"
    assert len(sent(requests_mock, "POST", RELEASE)) == 2


def test_a_4xx_answer_is_not_retried(client, requests_mock, waits):
    requests_mock.post(CREATE, status_code=402, json={"error": "insufficient_balance",
                                                      "balance": 0.5})
    with pytest.raises(InsufficientFunds):
        create(client)
    assert len(sent(requests_mock)) == 1 and waits == []


# --------------------------------------------------------------------------- reads


def test_a_read_timeout_on_get_is_retried(client, requests_mock):
    requests_mock.get(GET, [{"exc": requests.exceptions.ReadTimeout("read timed out")},
                            {"status_code": 200, "json": record("funded")}])
    assert client.get(ESC).status == "funded"
    assert len(sent(requests_mock, "GET", GET)) == 2


def test_a_gateway_timeout_on_get_is_retried(client, requests_mock):
    requests_mock.get(GET, [{"status_code": 504, "text": "timeout"},
                            {"status_code": 200, "json": record("funded")}])
    assert client.get(ESC).status == "funded"


# --------------------------------------------------------------------------- release / refund


def test_an_unanswered_release_that_went_through_is_read_back_not_resent(client, requests_mock):
    requests_mock.post(RELEASE, exc=requests.exceptions.ReadTimeout("read timed out"))
    requests_mock.get(GET, json=record("released"))
    settlement = client.release(ESC)
    assert settlement.status == "released"
    assert settlement.net_usd == Decimal("0.99")
    assert len(sent(requests_mock, "POST", RELEASE)) == 1


def test_an_unanswered_release_of_a_still_funded_escrow_is_sent_again(client, requests_mock):
    requests_mock.post(RELEASE, [{"exc": dropped()}, {"status_code": 200, "json": RELEASED}])
    requests_mock.get(GET, json=record("funded"))
    assert client.release(ESC).status == "released"
    assert [r.method for r in requests_mock.request_history] == ["POST", "GET", "POST"]


def test_a_resent_release_that_finds_it_already_released_never_errors(client, requests_mock):
    # The first release went through late: the check saw "funded", the resend gets 409.
    requests_mock.post(RELEASE, [
        {"exc": requests.exceptions.ReadTimeout("read timed out")},
        {"status_code": 409, "json": {"error": "invalid_status",
                                      "message": "Cannot release escrow in status 'released'"}},
    ])
    requests_mock.get(GET, [{"json": record("funded")}, {"json": record("released")}])
    settlement = client.release(ESC)
    assert settlement.status == "released"
    assert len(sent(requests_mock, "POST", RELEASE)) == 2


def test_an_unanswered_release_whose_check_also_fails_is_sent_again(client, requests_mock):
    requests_mock.post(RELEASE, [{"exc": requests.exceptions.ReadTimeout("read timed out")},
                                 {"status_code": 200, "json": RELEASED}])
    requests_mock.get(GET, exc=refused())
    assert client.release(ESC).status == "released"


def test_an_unanswered_release_of_a_refunded_escrow_is_invalid_status(client, requests_mock):
    requests_mock.post(RELEASE, exc=requests.exceptions.ReadTimeout("read timed out"))
    requests_mock.get(GET, json=record("refunded"))
    with pytest.raises(InvalidStatus, match="refunded"):
        client.release(ESC)
    assert len(sent(requests_mock, "POST", RELEASE)) == 1


def test_a_release_never_answered_gives_up_as_ambiguous_after_max_attempts(requests_mock, waits):
    client = EscrowClient(URL, KEY, max_attempts=2)
    requests_mock.post(RELEASE, exc=requests.exceptions.ReadTimeout("read timed out"))
    requests_mock.get(GET, json=record("funded"))
    with pytest.raises(AmbiguousOutcome, match="still funded"):
        client.release(ESC)
    assert len(sent(requests_mock, "POST", RELEASE)) == 2


def test_an_unanswered_sandbox_refund_that_went_through_is_read_back(client, requests_mock):
    requests_mock.get(OPENAPI, json=SANDBOX_OPENAPI)
    requests_mock.post(REFUND, exc=requests.exceptions.ReadTimeout("read timed out"))
    requests_mock.get(GET, json={**record("refunded"), "refunded_at": "2026-01-01T00:05:00Z"})
    settlement = client.refund(ESC)
    assert (settlement.status, settlement.net_usd, settlement.commission_usd) == (
        "refunded", Decimal("1.00"), Decimal("0"))
    assert len(sent(requests_mock, "POST", REFUND)) == 1


def test_a_refund_answered_429_waits_and_retries(client, requests_mock, waits):
    requests_mock.get(OPENAPI, json=SANDBOX_OPENAPI)
    requests_mock.post(REFUND, [
        {"status_code": 429, "headers": {"Retry-After": "4"}, "json": {"error": "rate_limited"}},
        {"status_code": 200, "json": {"escrow_id": ESC, "status": "refunded",
                                      "amount_refunded": 1.0, "creator_id": "ag_payer"}},
    ])
    assert client.refund(ESC).status == "refunded"
    assert waits == [4.0]


# --------------------------------------------------------------------------- a real slow server


class AnswerLate:
    """WSGI middleware: the first ``times`` requests to ``path`` are handled, then answered
    ``delay`` seconds late, so the client has given up although the escrow moved."""

    def __init__(self, app, path_prefix: str, delay: float, times: int = 1) -> None:
        self.app, self.prefix, self.delay, self.left = app, path_prefix, delay, times
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            late = environ["PATH_INFO"].startswith(self.prefix) and self.left > 0
            self.left -= late
        body = list(self.app(environ, start_response))
        if late:
            time.sleep(self.delay)
        return body


class ActThenFail:
    """WSGI middleware: the first ``times`` requests to ``path`` are handled (the escrow
    moves), then answered 500 as if the service broke after acting."""

    def __init__(self, app, path_prefix: str, times: int = 1) -> None:
        self.app, self.prefix, self.left = app, path_prefix, times
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            fail = environ["PATH_INFO"].startswith(self.prefix) and self.left > 0
            self.left -= fail
        if not fail:
            return self.app(environ, start_response)
        list(self.app(environ, lambda *args, **kwargs: None))
        start_response("500 Internal Server Error", [("Content-Type", "application/json")])
        return [b'{"error": "internal_error", "message": "Internal error"}']


@pytest.fixture
def failing_server(engine):
    servers = []

    def start(path_prefix: str, **options) -> str:
        server = make_http_server(ActThenFail(make_app(engine, **options), path_prefix))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server_url(server)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_real_create_that_acted_then_answered_500_is_ambiguous_and_sent_once(
    engine, failing_server, waits
):
    url = failing_server("/escrow/create", idempotency=False, refunds=False)
    client = EscrowClient(url, "pf_sandbox_payer_key")
    with pytest.raises(AmbiguousOutcome, match="may or may not have been created"):
        client.create("1.00", counterparty_agent_id="ag_sandbox_worker",
                      description="locked behind a 500", idempotency_key="run/9/s/0")
    assert [e["description"] for e in engine.list_escrows()] == ["locked behind a 500"]
    assert waits == []


def test_a_real_create_that_acted_then_answered_500_is_replayed_by_a_server_with_idempotency(
    engine, failing_server, waits
):
    url = failing_server("/escrow/create")
    client = EscrowClient(url, "pf_sandbox_payer_key")
    escrow = client.create("1.00", counterparty_agent_id="ag_sandbox_worker",
                           description="created once", idempotency_key="run/9/s/0")
    assert escrow.replayed is True
    assert [e["escrow_id"] for e in engine.list_escrows()] == [escrow.escrow_id]
    engine.check_invariant()


@pytest.fixture
def slow_server(engine):
    servers = []

    def start(path_prefix: str, **options) -> str:
        app = AnswerLate(make_app(engine, **options), path_prefix, delay=1.0)
        server = make_http_server(app)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server_url(server)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_real_timed_out_create_on_a_server_without_idempotency_is_sent_once(
    engine, slow_server, waits
):
    url = slow_server("/escrow/create", idempotency=False, refunds=False)
    client = EscrowClient(url, "pf_sandbox_payer_key", timeout=0.3)
    with pytest.raises(AmbiguousOutcome, match="timed out"):
        client.create("1.00", counterparty_agent_id="ag_sandbox_worker",
                      description="one and only", idempotency_key="k-1")
    time.sleep(1.2)  # let the late answer finish
    assert [e["description"] for e in engine.list_escrows()] == ["one and only"]


def test_a_real_timed_out_create_with_idempotency_is_retried_into_one_escrow(
    engine, slow_server, waits
):
    url = slow_server("/escrow/create")
    client = EscrowClient(url, "pf_sandbox_payer_key", timeout=0.3)
    escrow = client.create("1.00", counterparty_agent_id="ag_sandbox_worker",
                           description="exactly once", idempotency_key="run/5/train/0")
    assert escrow.replayed is True
    assert [e["escrow_id"] for e in engine.list_escrows()] == [escrow.escrow_id]
    engine.check_invariant()


def test_a_real_timed_out_release_pays_the_worker_once(engine, slow_server, waits):
    url = slow_server("/escrow/release/")
    client = EscrowClient(url, "pf_sandbox_payer_key", timeout=0.3)
    escrow = client.create("10.00", counterparty_agent_id="ag_sandbox_worker",
                           description="pay once")
    settlement = client.release(escrow)
    time.sleep(1.2)
    assert settlement.status == "released"
    assert engine.balance("ag_sandbox_worker")["usdc"] == Decimal("9.900000")
    engine.check_invariant()


def test_rate_limited_create_waits_its_turn_beyond_the_attempt_cap(requests_mock, monkeypatch):
    """Many tasks share a rate limit: Retry-After answers pace the client (bounded by max_wait),
    they do not use up its attempts."""
    from decimal import Decimal

    from pf_metaflow.client import EscrowClient

    waits = []
    monkeypatch.setattr("pf_metaflow.retries._sleep", waits.append)
    url = "https://escrow.purpleflea.com"
    limited = {"status_code": 429, "json": {"error": "rate_limited"}, "headers": {"Retry-After": "20"}}
    created = {"status_code": 201, "json": {
        "escrow_id": "esc_1", "status": "funded", "amount_usd": 1.0, "commission_usd": 0.01,
        "net_to_counterparty": 0.99, "description": "pf-metaflow x", "creator_id": "ag_me",
        "counterparty_id": "ag_w", "timeout_hours": 24, "auto_release_at": None}}
    requests_mock.post(f"{url}/escrow/create", [limited] * 6 + [created])
    client = EscrowClient(url, "pf_live_placeholder0000", max_attempts=4, max_wait=600)
    escrow = client.create(Decimal("1"), counterparty_agent_id="ag_w", description="pf-metaflow x")
    assert escrow.escrow_id == "esc_1"
    assert waits == [20.0] * 6
