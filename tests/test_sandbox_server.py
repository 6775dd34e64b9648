"""The sandbox HTTP server: the live wire protocol, the extensions, and live-like mode.

Most tests call the WSGI app in-process (werkzeug's test client); the ones about the
command line, signals and sockets run ``pf-metaflow sandbox serve`` as a subprocess.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from decimal import Decimal

import pytest
import requests
from werkzeug.test import Client

from pf_metaflow.errors import ServiceUnavailable
from pf_metaflow.sandbox.engine import PAYER_KEY, WORKER_KEY, SandboxEngine
from pf_metaflow.sandbox.server import LiveRateLimits, RateLimiter, make_app

D = Decimal
PAYER = "ag_sandbox_payer"
WORKER = "ag_sandbox_worker"
AS_PAYER = {"Authorization": f"Bearer {PAYER_KEY}"}
AS_WORKER = {"Authorization": f"Bearer {WORKER_KEY}"}
ESCROW = {"amount_usd": 1.5, "description": "label data", "counterparty_agent_id": WORKER}
LIVE_CREATE_FIELDS = {"escrow_id", "amount_usd", "commission_usd", "net_to_counterparty",
                      "description", "creator_id", "counterparty_id", "status",
                      "timeout_hours", "auto_release_at"}
LIVE_GET_FIELDS = LIVE_CREATE_FIELDS | {"created_at", "completed_at", "released_at",
                                        "disputed_at"}


@pytest.fixture
def client(engine):
    return Client(make_app(engine))


@pytest.fixture(autouse=True)
def _invariant_after_each_test(request):
    engine = request.getfixturevalue("engine")
    yield
    engine.check_invariant()


def body(response) -> dict:
    assert response.mimetype == "application/json"
    return json.loads(response.get_data(as_text=True), parse_float=Decimal)


def create(client, headers=AS_PAYER, **fields):
    return client.post("/escrow/create", json={**ESCROW, **fields}, headers=headers)


# -- the live protocol ---------------------------------------------------------------------


def test_create_answers_201_with_the_live_fields_and_amounts_as_json_numbers(client):
    response = create(client)
    assert response.status_code == 201
    data = body(response)
    assert LIVE_CREATE_FIELDS <= data.keys()
    assert data["status"] == "funded"
    assert (data["amount_usd"], data["commission_usd"], data["net_to_counterparty"]) == (
        D("1.5"), D("0.015"), D("1.485"))
    raw = response.get_data(as_text=True)
    assert '"amount_usd": 1.5,' in raw  # a number, not a string


def test_every_json_body_carries_an_info_object(client):
    for response in (create(client), client.get("/health"), client.get("/escrow/esc_nope"),
                     client.post("/escrow/create", json=ESCROW), client.get("/nowhere")):
        info = body(response)["_info"]
        assert info["service"] == "pf-metaflow sandbox"
        assert info["sandbox"] is True


def test_get_shows_the_escrow_with_every_live_field(client):
    escrow_id = body(create(client))["escrow_id"]
    response = client.get(f"/escrow/{escrow_id}")
    assert response.status_code == 200
    data = body(response)
    assert LIVE_GET_FIELDS <= data.keys()
    assert data["completed_at"] is None
    assert data["created_at"].endswith("Z")


def test_release_answers_the_live_release_shape(client):
    escrow_id = body(create(client, amount_usd=10))["escrow_id"]
    response = client.post(f"/escrow/release/{escrow_id}", headers=AS_PAYER)
    assert response.status_code == 200
    data = body(response)
    assert {k: data[k] for k in ("escrow_id", "status", "amount_released", "commission",
                                 "referral_commission", "counterparty_id")} == {
        "escrow_id": escrow_id, "status": "released", "amount_released": D("9.9"),
        "commission": D("0.1"), "referral_commission": 0, "counterparty_id": WORKER}


def test_complete_and_dispute_answer_their_new_status(client):
    escrow_id = body(create(client))["escrow_id"]
    done = client.post(f"/escrow/complete/{escrow_id}", headers=AS_WORKER)
    assert (done.status_code, body(done)["status"]) == (200, "completed")
    disputed = client.post(f"/escrow/dispute/{escrow_id}", json={"reason": "late"},
                           headers=AS_WORKER)
    assert (disputed.status_code, body(disputed)["status"], body(disputed)["reason"]) == (
        200, "disputed", "late")


def test_dispute_accepts_an_empty_body(client):
    escrow_id = body(create(client))["escrow_id"]
    response = client.post(f"/escrow/dispute/{escrow_id}", headers=AS_PAYER)
    assert body(response)["reason"] == "No reason provided"


def test_an_amount_given_as_a_string_is_accepted_like_live(client):
    response = create(client, amount_usd="2.25")
    assert body(response)["amount_usd"] == D("2.25")


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"amount_usd": 0.05}, 400, "invalid_amount"),
        ({"amount_usd": "1.0000001"}, 400, "invalid_amount"),
        ({"amount_usd": None}, 400, "invalid_amount"),
        ({"description": "ab"}, 400, "invalid_description"),
        ({"counterparty_agent_id": "0xABC"}, 400, "invalid_counterparty"),
        ({"counterparty_agent_id": PAYER}, 400, "self_escrow"),
        ({"counterparty_agent_id": "ag_nobody"}, 404, "counterparty_not_found"),
        ({"amount_usd": 2_000_000}, 402, "insufficient_balance"),
    ],
)
def test_create_refusals_have_the_live_status_and_error_code(client, fields, status, code):
    response = create(client, **fields)
    assert response.status_code == status
    data = body(response)
    assert data["error"] == code
    assert data["message"]


def test_insufficient_balance_carries_the_balance_as_a_number(client):
    data = body(create(client, amount_usd=2_000_000))
    assert data["balance"] == D("1000000")


def test_an_empty_create_body_is_an_invalid_amount_like_live(client):
    response = client.post("/escrow/create", data="", headers=AS_PAYER)
    assert (response.status_code, body(response)["error"]) == (400, "invalid_amount")


@pytest.mark.parametrize("payload", ["not json", "{", "[1, 2]", '"text"'])
def test_a_body_that_is_not_a_json_object_is_400(client, payload):
    response = client.post("/escrow/create", data=payload, headers=AS_PAYER)
    assert response.status_code == 400
    assert body(response)["error"] == "invalid_json"


def test_a_huge_body_is_refused_with_413(client):
    response = client.post("/escrow/create", data="x" * 100_000, headers=AS_PAYER)
    assert response.status_code == 413
    assert body(response)["error"] == "payload_too_large"


# -- auth ------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer pf_sandbox_unknown_key", "Basic abc",
                                    PAYER_KEY, "Bearer "])
def test_missing_or_unknown_credentials_are_401(client, header):
    headers = {"Authorization": header} if header else {}
    response = create(client, headers=headers)
    assert response.status_code == 401
    data = body(response)
    assert data["error"] == "unauthorized"
    assert "pf_sandbox_unknown_key" not in response.get_data(as_text=True)


def test_only_the_creator_may_release_403(client):
    escrow_id = body(create(client))["escrow_id"]
    response = client.post(f"/escrow/release/{escrow_id}", headers=AS_WORKER)
    assert (response.status_code, body(response)["error"]) == (403, "forbidden")


def test_get_needs_no_credentials_like_live(client):
    escrow_id = body(create(client))["escrow_id"]
    assert client.get(f"/escrow/{escrow_id}").status_code == 200


# -- other statuses ----------------------------------------------------------------------


def test_releasing_twice_is_409_invalid_status(client):
    escrow_id = body(create(client))["escrow_id"]
    client.post(f"/escrow/release/{escrow_id}", headers=AS_PAYER)
    response = client.post(f"/escrow/release/{escrow_id}", headers=AS_PAYER)
    assert (response.status_code, body(response)["error"]) == (409, "invalid_status")
    assert body(response)["status"] == "released"


def test_an_unknown_escrow_is_404_not_found(client):
    response = client.post("/escrow/release/esc_nope", headers=AS_PAYER)
    assert (response.status_code, body(response)["error"]) == (404, "not_found")


def test_an_unknown_path_is_404_json(client):
    response = client.get("/api/escrow/create")
    assert (response.status_code, body(response)["error"]) == (404, "not_found")


def test_a_wrong_method_is_405_json(client):
    response = client.get("/escrow/release/esc_x")
    assert (response.status_code, body(response)["error"]) == (405, "method_not_allowed")


def test_an_unexpected_engine_failure_is_a_500_json_answer(engine, client, monkeypatch, capsys):
    def broken(escrow_id):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine, "get", broken)
    response = client.get("/escrow/esc_x")
    assert (response.status_code, body(response)["error"]) == (500, "internal_error")
    assert "disk on fire" not in response.get_data(as_text=True)
    assert "disk on fire" in capsys.readouterr().err


def test_a_busy_database_is_503_with_retry_after(engine, client, monkeypatch):
    def busy(*args, **kwargs):
        raise ServiceUnavailable("the sandbox database stayed locked",
                                 details={"retry_after": 1})

    monkeypatch.setattr(engine, "release", busy)
    response = client.post("/escrow/release/esc_x", headers=AS_PAYER)
    assert (response.status_code, body(response)["error"]) == (503, "service_unavailable")
    assert response.headers["Retry-After"] == "1"


def test_health_stats_and_index_answer(client):
    assert body(client.get("/health"))["status"] == "ok"
    escrow_id = body(create(client))["escrow_id"]
    client.post(f"/escrow/release/{escrow_id}", headers=AS_PAYER)
    stats = body(client.get("/escrow/stats"))
    assert (stats["total_created"], stats["total_released"]) == (1, 1)
    assert body(client.get("/"))["service"] == "pf-metaflow sandbox"


# -- sandbox extensions --------------------------------------------------------------------


def test_refund_returns_everything_to_the_creator(engine, client):
    escrow_id = body(create(client, amount_usd=3))["escrow_id"]
    response = client.post(f"/escrow/refund/{escrow_id}", headers=AS_PAYER)
    assert response.status_code == 200
    data = body(response)
    assert (data["status"], data["amount_refunded"], data["creator_id"]) == (
        "refunded", D(3), PAYER)
    assert engine.balance(PAYER)["locked"] == D(0)


def test_an_idempotency_key_replays_the_first_answer_with_a_replayed_header(engine, client):
    headers = {**AS_PAYER, "Idempotency-Key": "flow/1/train/3/0"}
    first = create(client, headers=headers)
    again = create(client, headers=headers)
    assert (first.status_code, again.status_code) == (201, 201)
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert body(again) == body(first)
    assert engine.balance(PAYER)["locked"] == D("1.5")


def test_an_equal_amount_written_differently_is_the_same_request(client):
    headers = {**AS_PAYER, "Idempotency-Key": "k"}
    first = create(client, headers=headers, amount_usd=1.5)
    again = create(client, headers=headers, amount_usd="1.500000")
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert body(again)["escrow_id"] == body(first)["escrow_id"]


def test_an_idempotency_key_reused_for_another_request_is_409(engine, client):
    headers = {**AS_PAYER, "Idempotency-Key": "k"}
    create(client, headers=headers)
    response = create(client, headers=headers, amount_usd=2)
    assert (response.status_code, body(response)["error"]) == (409, "idempotency_conflict")
    assert engine.balance(PAYER)["locked"] == D("1.5")


def test_faucet_register_then_claim_then_wallet_balance(client):
    registered = client.post("/faucet/register", json={"name": "labeler"})
    assert registered.status_code == 201
    agent = body(registered)
    auth = {"Authorization": f"Bearer {agent['api_key']}"}
    claimed = body(client.post("/faucet/claim", json={"amount": 25.5}, headers=auth))
    assert (claimed["agent_id"], claimed["claimed"], claimed["balance"]) == (
        agent["agent_id"], D("25.5"), D("25.5"))
    balance = body(client.get("/wallet/balance", headers=auth))
    assert (balance["usdc"], balance["locked"]) == (D("25.5"), 0)


def test_faucet_claim_needs_credentials(client):
    assert client.post("/faucet/claim", json={}).status_code == 401


def test_sandbox_balances_are_decimal_strings(client):
    create(client)
    data = body(client.get("/sandbox/balances"))
    assert data["agents"][PAYER] == {"usdc": "999998.500000", "locked": "1.500000"}
    assert (data["house_fees"], data["minted"]) == ("0.000000", "1000000.000000")


def test_openapi_lists_the_paths_and_advertises_every_extension(client):
    data = body(client.get("/openapi.json"))
    assert data["x-pf-sandbox"] == {"extensions": ["refund", "idempotency", "faucet", "balance"]}
    for path in ("/escrow/create", "/escrow/release/{escrow_id}", "/escrow/refund/{escrow_id}",
                 "/escrow/{escrow_id}", "/faucet/register", "/wallet/balance"):
        assert path in data["paths"]
    assert "post" in data["paths"]["/escrow/create"]


# -- live-like mode ----------------------------------------------------------------------


@pytest.fixture
def live_like(engine):
    return Client(make_app(engine, refunds=False, idempotency=False))


def test_live_like_mode_has_no_refund_path(live_like):
    escrow_id = body(create(live_like))["escrow_id"]
    response = live_like.post(f"/escrow/refund/{escrow_id}", headers=AS_PAYER)
    assert (response.status_code, body(response)["error"]) == (404, "not_found")


def test_live_like_mode_ignores_idempotency_keys(engine, live_like):
    headers = {**AS_PAYER, "Idempotency-Key": "k"}
    first, again = create(live_like, headers=headers), create(live_like, headers=headers)
    assert body(first)["escrow_id"] != body(again)["escrow_id"]
    assert "Idempotent-Replayed" not in again.headers
    assert engine.balance(PAYER)["locked"] == D(3)


def test_live_like_mode_advertises_neither_refund_nor_idempotency(live_like):
    data = body(live_like.get("/openapi.json"))
    assert data["x-pf-sandbox"] == {"extensions": ["faucet", "balance"]}
    assert "/escrow/refund/{escrow_id}" not in data["paths"]


# -- rate limits ---------------------------------------------------------------------------


def test_creates_over_the_rate_are_429_with_retry_after(engine):
    client = Client(make_app(engine, create_rate=(2, 60)))
    assert [create(client).status_code for _ in range(2)] == [201, 201]
    response = create(client)
    assert (response.status_code, body(response)["error"]) == (429, "rate_limited")
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert engine.balance(PAYER)["locked"] == D(3)


def test_the_rate_is_per_client_address(engine):
    client = Client(make_app(engine, create_rate=(1, 60)))
    first = create(client)
    other = client.post("/escrow/create", json=ESCROW, headers=AS_PAYER,
                        environ_overrides={"REMOTE_ADDR": "127.0.0.2"})
    assert (first.status_code, other.status_code, create(client).status_code) == (201, 201, 429)


def test_releases_over_the_rate_are_429_and_refunds_have_their_own_window(engine):
    client = Client(make_app(engine, release_rate=(1, 60)))
    ids = [body(create(client))["escrow_id"] for _ in range(3)]
    assert client.post(f"/escrow/release/{ids[0]}", headers=AS_PAYER).status_code == 200
    limited = client.post(f"/escrow/release/{ids[1]}", headers=AS_PAYER)
    assert limited.status_code == 429
    assert "Retry-After" in limited.headers
    assert client.post(f"/escrow/refund/{ids[1]}", headers=AS_PAYER).status_code == 200
    assert client.post(f"/escrow/refund/{ids[2]}", headers=AS_PAYER).status_code == 429
    assert engine.get(ids[2])["status"] == "funded"


def test_a_rate_window_opens_again_after_its_seconds():
    limiter = RateLimiter(1, 0.05)
    assert limiter.retry_after("a") is None
    assert limiter.retry_after("a") == 1
    time.sleep(0.06)
    assert limiter.retry_after("a") is None


def test_a_limiter_drops_expired_windows_when_it_holds_many():
    now = [0.0]
    limiter = RateLimiter(1, 10, clock=lambda: now[0])
    for n in range(RateLimiter._PRUNE_ABOVE):
        limiter.retry_after(f"/escrow/release/esc_{n}:unknown")
    now[0] = 11
    assert limiter.retry_after("fresh") is None
    assert len(limiter._windows) == 1


# -- live mode (in process, on a fake clock; tests/test_sandbox_live_mode.py runs the server) --


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def live_client(engine, clock, **rates):
    app = make_app(engine, live=True)
    app.live_limits = LiveRateLimits(clock=clock, **rates)
    return app, Client(app)


def test_live_mode_defaults_to_lives_numbers_and_drops_refund_and_idempotency(engine):
    app = make_app(engine, live=True)
    assert (app.refunds, app.idempotency, app.extensions) == (False, False, ["faucet", "balance"])
    assert app.live_limits.rates == {"create": (20, 60.0), "release": (30, 60.0),
                                     "complete": (30, 60.0), "dispute": (10, 60.0)}
    numbers = make_app(engine, live=True, create_rate=(5, 6), release_rate=(7, 8)).live_limits
    assert numbers.rates == {"create": (5, 6), "release": (7, 8), "complete": (7, 8),
                             "dispute": (10, 60.0)}


@pytest.mark.parametrize("extension", ["refunds", "idempotency"])
def test_live_mode_refuses_an_extension(engine, extension):
    with pytest.raises(ValueError, match="live mode"):
        make_app(engine, live=True, **{extension: True})


def test_live_window_is_fixed_from_the_first_request_counting_refusals(engine):
    clock = _Clock()
    _, client = live_client(engine, clock, create_rate=(2, 10))
    codes = []
    for _ in range(6):  # knocking every 1.9 s: a sliding window would never reopen
        codes.append(create(client).status_code)
        clock.now += 1.9
    assert codes == [201, 201, 429, 429, 429, 429]
    clock.now = 1000.0 + 10  # 10 s after the first request: a new window
    assert [create(client).status_code for _ in range(3)] == [201, 201, 429]
    assert engine.balance(PAYER)["locked"] == D(6)


def test_live_429_has_lives_body_and_no_retry_after(engine):
    _, client = live_client(engine, _Clock(), create_rate=(1, 2.5))
    create(client)
    response = create(client)
    assert response.status_code == 429
    assert "Retry-After" not in response.headers
    data = body(response)
    assert data.keys() == {"error", "message", "_info"}
    assert (data["error"], data["message"]) == (
        "rate_limited", "Too many requests. Limit: 1 per 2.5s")


def test_live_buckets_ignore_the_connecting_address(engine):
    _, client = live_client(engine, _Clock(), create_rate=(1, 60))
    assert create(client).status_code == 201
    other = client.post("/escrow/create", json=ESCROW, headers=AS_PAYER,
                        environ_overrides={"REMOTE_ADDR": "127.0.0.2"})
    assert other.status_code == 429  # no X-Forwarded-For / X-Real-IP: one shared bucket
    forwarded = create(client, headers={**AS_PAYER, "X-Forwarded-For": "127.0.0.2"})
    assert forwarded.status_code == 201


def test_live_limits_leave_reads_and_sandbox_extensions_alone(engine):
    _, client = live_client(engine, _Clock(), create_rate=(1, 60), release_rate=(1, 60))
    escrow_id = body(create(client))["escrow_id"]
    for _ in range(5):
        assert client.get(f"/escrow/{escrow_id}").status_code == 200
        assert client.get("/sandbox/balances").status_code == 200
        assert client.get("/openapi.json").status_code == 200


def test_without_live_the_connecting_address_still_decides_and_forwarding_is_ignored(engine):
    client = Client(make_app(engine, create_rate=(1, 60)))
    assert create(client).status_code == 201
    spoofed = create(client, headers={**AS_PAYER, "X-Forwarded-For": "10.0.0.1"})
    assert spoofed.status_code == 429
    assert "Retry-After" in spoofed.headers


# -- the real server process ---------------------------------------------------------------


def test_serve_prints_its_url_and_speaks_http(start_sandbox_server, tmp_path):
    server = start_sandbox_server(tmp_path / "srv.db")
    assert server.url.startswith("http://127.0.0.1:")
    response = requests.post(f"{server.url}/escrow/create", json=ESCROW, headers=AS_PAYER,
                             timeout=10)
    assert response.status_code == 201
    SandboxEngine(server.db).check_invariant()


def test_serve_flags_make_a_live_like_rate_limited_server(start_sandbox_server, tmp_path):
    server = start_sandbox_server(tmp_path / "srv.db", "--no-refund", "--no-idempotency",
                                  "--create-rate", "1/60")
    with requests.Session() as http:
        ext = http.get(f"{server.url}/openapi.json", timeout=10).json()["x-pf-sandbox"]
        assert ext == {"extensions": ["faucet", "balance"]}
        first = http.post(f"{server.url}/escrow/create", json=ESCROW,
                          headers={**AS_PAYER, "Idempotency-Key": "k"}, timeout=10)
        again = http.post(f"{server.url}/escrow/create", json=ESCROW,
                          headers={**AS_PAYER, "Idempotency-Key": "k"}, timeout=10)
        assert (first.status_code, again.status_code) == (201, 429)
        assert int(again.headers["Retry-After"]) >= 1
        refund = http.post(f"{server.url}/escrow/refund/{first.json()['escrow_id']}",
                           headers=AS_PAYER, timeout=10)
        assert refund.status_code == 404


def test_serve_stops_cleanly_on_sigterm(start_sandbox_server, tmp_path):
    server = start_sandbox_server(tmp_path / "srv.db")
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=10) == 0


WRAPPED_SERVER = """
import sys
from pf_metaflow.sandbox.server import serve

def wrap(app):
    def middleware(environ, start_response):
        def start(status, headers, exc_info=None):
            return start_response(status, headers + [("X-Fault-Injector", "on")], exc_info)
        return app(environ, start)
    return middleware

serve(port=0, db=sys.argv[1], wrap=wrap)
"""


def test_serve_applies_wrap_middleware_to_the_app(start_sandbox_server, tmp_path):
    db = tmp_path / "srv.db"
    server = start_sandbox_server(db, command=[sys.executable, "-c", WRAPPED_SERVER, str(db)])
    response = requests.get(f"{server.url}/health", timeout=10)
    assert response.headers["X-Fault-Injector"] == "on"
    assert response.json()["status"] == "ok"
