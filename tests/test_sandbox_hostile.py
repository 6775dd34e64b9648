"""Hostile input against a real ``pf-metaflow sandbox serve``: each probe of issue 15 gets a
short JSON 4xx within a fraction of a second, no balance moves, conservation holds; slow
clients cannot stall the server.

Every request goes to 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import socket
import time
from decimal import Decimal

import pytest
import requests
from werkzeug.test import Client

from pf_metaflow.sandbox import parsing
from pf_metaflow.sandbox.engine import PAYER_KEY, SandboxEngine
from pf_metaflow.sandbox.server import make_app

AS_PAYER = {"Authorization": f"Bearer {PAYER_KEY}"}
ESCROW = {"amount_usd": 1.5, "description": "label data",
          "counterparty_agent_id": "ag_sandbox_worker"}
FAST = 0.5  # seconds: "a fraction of a second", with room for a shared 2-core machine
TIMEOUT = 10


@pytest.fixture(scope="module")
def server(sandbox_server):
    return sandbox_server


@pytest.fixture
def http():
    with requests.Session() as session:
        yield session


@pytest.fixture
def unchanged(server, http):
    """Fails the test if any balance, locked sum, fee or escrow count moved."""
    def money():
        balances = http.get(f"{server.url}/sandbox/balances", timeout=TIMEOUT).json()
        stats = http.get(f"{server.url}/escrow/stats", timeout=TIMEOUT).json()
        balances.pop("_info"), stats.pop("_info")
        return balances, stats

    before = money()
    yield
    assert money() == before
    SandboxEngine(server.db).check_invariant()


def assert_refused(response, elapsed: float, status=None) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status
    assert elapsed < FAST, f"took {elapsed:.2f}s"
    assert response.headers["Content-Type"].startswith("application/json")
    assert len(response.content) < 1000  # short: no echo of the input
    body = response.json()
    assert isinstance(body["error"], str) and isinstance(body["message"], str)
    assert "Decimal(" not in body["message"] and "Traceback" not in response.text
    assert "Location" not in response.headers
    return body


def send(http, server, method, path, **kwargs):
    started = time.monotonic()
    response = http.request(method, f"{server.url}{path}", timeout=TIMEOUT, **kwargs)
    return response, time.monotonic() - started


def raw(server, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes on a fresh connection; everything answered until the server closes."""
    host, port = server.url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as conn:
        conn.sendall(data)
        chunks = []
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"connection: close" not in \
                        b"".join(chunks).lower():
                    break
        except (socket.timeout, ConnectionResetError):
            pass
        return b"".join(chunks)


# -- 1. numbers whose conversion cost grows with their exponent --------------------------------


@pytest.mark.parametrize("hours", ["1e1000000", "1e300000", "-1e1000000", "1" + "0" * 5000])
def test_a_huge_number_literal_is_refused_at_once(server, http, unchanged, hours):
    data = '{"amount_usd": 1.5, "description": "label data", ' \
           '"counterparty_agent_id": "ag_sandbox_worker", "timeout_hours": %s}' % hours
    response, elapsed = send(http, server, "POST", "/escrow/create", data=data,
                             headers={**AS_PAYER, "Content-Type": "application/json"})
    body = assert_refused(response, elapsed, 400)
    assert body["error"] == "invalid_timeout"
    assert "too large" in body["message"]


def test_health_answers_while_huge_numbers_arrive(server, http, unchanged):
    data = '{"amount_usd": 1.5, "timeout_hours": 1e1000000}'
    for _ in range(5):
        send(http, server, "POST", "/escrow/create", data=data, headers=AS_PAYER)
    response, elapsed = send(http, server, "GET", "/health")
    assert response.status_code == 200 and elapsed < FAST


# -- 2. bodies that used to reach SQLite or the recursion limit --------------------------------


def test_a_body_nested_2000_deep_is_400(server, http, unchanged):
    data = '{"amount_usd": ' + "[" * 2000 + "]" * 2000 + "}"
    response, elapsed = send(http, server, "POST", "/escrow/create", data=data,
                             headers=AS_PAYER)
    assert assert_refused(response, elapsed, 400)["error"] == "invalid_json"


@pytest.mark.parametrize("field", ["description", "referral_code"])
@pytest.mark.parametrize("bad", ["\\ud800", "ab\\u0000cd", "\\udfff tail"])
def test_a_lone_surrogate_or_nul_in_create_text_is_400(server, http, unchanged, field, bad):
    fields = {**ESCROW, field: "PLACEHOLDER"}
    data = json.dumps(fields).replace("PLACEHOLDER", bad)
    response, elapsed = send(http, server, "POST", "/escrow/create", data=data,
                             headers=AS_PAYER)
    assert assert_refused(response, elapsed, 400)["error"] == "invalid_string"


def test_a_lone_surrogate_in_a_dispute_reason_is_400(server, http):
    escrow_id = http.post(f"{server.url}/escrow/create", json=ESCROW, headers=AS_PAYER,
                          timeout=TIMEOUT).json()["escrow_id"]
    response, elapsed = send(http, server, "POST", f"/escrow/dispute/{escrow_id}",
                             data='{"reason": "late \\ud800"}', headers=AS_PAYER)
    assert assert_refused(response, elapsed, 400)["error"] == "invalid_string"
    assert http.get(f"{server.url}/escrow/{escrow_id}", timeout=TIMEOUT).json()["status"] \
        == "funded"
    http.post(f"{server.url}/escrow/refund/{escrow_id}", headers=AS_PAYER, timeout=TIMEOUT)


def test_a_lone_surrogate_in_a_faucet_name_is_400(server, http, unchanged):
    response, elapsed = send(http, server, "POST", "/faucet/register",
                             data='{"name": "\\ud800"}')
    assert assert_refused(response, elapsed, 400)["error"] == "invalid_string"


def test_invalid_utf8_is_400(server, http, unchanged):
    response, elapsed = send(http, server, "POST", "/escrow/create",
                             data=b'{"description": "\xed\xa0\x80"}', headers=AS_PAYER)
    assert_refused(response, elapsed, 400)


# -- 3. bodies over the limit: chunked or not, nothing is created ------------------------------


def _create_then_garbage() -> bytes:
    return json.dumps(ESCROW).encode() + b" " * (parsing.MAX_BODY) + b"garbage"


def test_a_chunked_body_over_the_limit_is_413_and_creates_nothing(server, http, unchanged):
    payload = _create_then_garbage()
    chunks = (payload[i:i + 8192] for i in range(0, len(payload), 8192))  # no length: chunked
    response, elapsed = send(http, server, "POST", "/escrow/create", data=chunks,
                             headers=AS_PAYER)
    assert assert_refused(response, elapsed, 413)["error"] == "payload_too_large"


def test_a_body_over_the_limit_with_content_length_is_413(server, http, unchanged):
    response, elapsed = send(http, server, "POST", "/escrow/create",
                             data=_create_then_garbage(), headers=AS_PAYER)
    assert assert_refused(response, elapsed, 413)["error"] == "payload_too_large"


def test_a_declared_length_over_the_limit_is_refused_before_the_body(server, unchanged):
    started = time.monotonic()
    answer = raw(server, b"POST /escrow/create HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999\r\n"
                         b"Authorization: Bearer " + PAYER_KEY.encode() + b"\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - started < FAST
    assert b'"payload_too_large"' in answer


def test_a_chunked_body_within_the_limit_still_creates(server, http):
    payload = json.dumps(ESCROW).encode()
    response = http.post(f"{server.url}/escrow/create", data=iter([payload[:10], payload[10:]]),
                         headers=AS_PAYER, timeout=TIMEOUT)
    assert response.status_code == 201
    http.post(f"{server.url}/escrow/refund/{response.json()['escrow_id']}", headers=AS_PAYER,
              timeout=TIMEOUT)


# -- 4. amounts: exact on the wire, plain ASCII decimals in -------------------------------------


@pytest.mark.parametrize("amount", ["1_0", "\u0661\u0660", "\uff11\uff10", "1e1", " nan",
                                    "Infinity", "0x10", "+10", "10.", ".5"])
def test_an_amount_string_that_is_not_a_plain_ascii_decimal_is_400(server, http, unchanged,
                                                                    amount):
    response, elapsed = send(http, server, "POST", "/escrow/create",
                             json={**ESCROW, "amount_usd": amount}, headers=AS_PAYER)
    assert assert_refused(response, elapsed, 400)["error"] == "invalid_amount"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json_numbers(server, http, unchanged, literal):
    data = '{"amount_usd": %s, "description": "label data", ' \
           '"counterparty_agent_id": "ag_sandbox_worker"}' % literal
    response, elapsed = send(http, server, "POST", "/escrow/create", data=data,
                             headers=AS_PAYER)
    body = assert_refused(response, elapsed, 400)
    assert (body["error"], body["message"]) == (
        "invalid_amount", "amount_usd must be a finite amount, got a value that is not")


def test_a_negative_zero_is_refused_without_a_python_repr(server, http, unchanged):
    data = '{"amount_usd": -0.0, "description": "label data", ' \
           '"counterparty_agent_id": "ag_sandbox_worker"}'
    response, elapsed = send(http, server, "POST", "/escrow/create", data=data,
                             headers=AS_PAYER)
    body = assert_refused(response, elapsed, 400)
    assert body["error"] == "invalid_amount"


def test_small_amounts_are_written_without_an_exponent(server, http):
    agent = http.post(f"{server.url}/faucet/register", json={"name": "tiny"},
                      timeout=TIMEOUT).json()
    response = http.post(f"{server.url}/faucet/claim", json={"amount": "0.000002"},
                         headers={"Authorization": f"Bearer {agent['api_key']}"},
                         timeout=TIMEOUT)
    assert response.status_code == 200
    assert '"claimed": 0.000002,' in response.text
    assert "e-" not in response.text.lower()


def test_large_amounts_keep_every_micro_usdc_on_the_wire(engine, monkeypatch):
    big = Decimal("9999999999.999999")
    monkeypatch.setattr(engine, "balance", lambda agent: {"agent_id": agent, "usdc": big,
                                                          "locked": Decimal("0.000001")})
    response = Client(make_app(engine)).get("/wallet/balance", headers=AS_PAYER)
    text = response.get_data(as_text=True)
    assert '"usdc": 9999999999.999999,' in text and '"locked": 0.000001,' in text
    assert json.loads(text, parse_float=Decimal)["usdc"] == big


def test_a_long_input_is_not_echoed(server, http, unchanged):
    long_text = "x" * 10_000
    for fields in ({"description": long_text}, {"counterparty_agent_id": "ag_" + long_text},
                   {"amount_usd": "9" * 900}):
        response, elapsed = send(http, server, "POST", "/escrow/create",
                                 json={**ESCROW, **fields}, headers=AS_PAYER)
        assert_refused(response, elapsed, 400)
        assert "xxxxxxxxxxxxxxxxxxxx" not in response.text
        assert "9999999999999999999999" not in response.text


# -- 5. routing like a real API -----------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/escrow/create", "POST"),
    ("PUT", "/escrow/create", "POST"),
    ("DELETE", "/escrow/esc_0123456789abcdef", "GET, HEAD"),
    ("GET", "/escrow/release/esc_x", "POST"),
    ("POST", "/health", "GET, HEAD"),
])
def test_a_wrong_method_is_405_with_allow(server, http, unchanged, method, path, allow):
    response, elapsed = send(http, server, method, path, headers=AS_PAYER)
    assert assert_refused(response, elapsed, 405)["error"] == "method_not_allowed"
    assert response.headers["Allow"] == allow


@pytest.mark.parametrize("path", ["//escrow//create", "/escrow//create", "/health/../health/x",
                                  "/%2e%2e/escrow/create"])
def test_odd_paths_are_404_and_never_redirect(server, http, unchanged, path):
    response = http.post(f"{server.url}{path}", json=ESCROW, allow_redirects=False,
                         headers={**AS_PAYER, "Host": "evil.example"}, timeout=TIMEOUT)
    assert response.status_code in (404, 405), response.status_code
    assert "evil.example" not in response.text and "Location" not in response.headers


def test_a_too_long_url_or_header_is_a_json_431(server, unchanged):
    for request in (b"GET /escrow/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"):
        started = time.monotonic()
        answer = raw(server, request)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        assert time.monotonic() - started < FAST
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"application/json" in head
        assert json.loads(body)["error"] == "request_header_fields_too_large"


def test_garbage_instead_of_http_is_a_json_400(server):
    answer = raw(server, b"\x16\x03\x01 this is not http\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "invalid_request"


# -- 7. slow clients cannot stall the server ----------------------------------------------------


SLOW_CLIENTS = 40


def test_health_answers_while_slow_clients_hold_connections(start_sandbox_server, tmp_path):
    server = start_sandbox_server(tmp_path / "slow.db", "--request-timeout", "2",
                                  "--max-connections", str(SLOW_CLIENTS + 20))
    host, port = server.url.rsplit("/", 1)[-1].split(":")
    slow = []
    try:
        for n in range(SLOW_CLIENTS):
            conn = socket.create_connection((host, int(port)), timeout=5)
            if n % 2:  # half stop in the headers, half in the body
                conn.sendall(b"POST /escrow/create HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            else:
                conn.sendall(b"POST /escrow/create HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 1000\r\n\r\n{\"amount_usd\"")
            slow.append(conn)
        with requests.Session() as http:
            for _ in range(5):
                started = time.monotonic()
                assert http.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200
                assert time.monotonic() - started < FAST
        # The server hangs up on them once their time is up (2 s), answering 408 where it can.
        deadline = time.monotonic() + 8
        closed = 0
        for conn in slow:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                answer = b""
                while True:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
                closed += 1
                assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:80]
            except (socket.timeout, ConnectionResetError):
                pass
        assert closed == SLOW_CLIENTS
    finally:
        for conn in slow:
            conn.close()
    SandboxEngine(server.db).check_invariant()


def test_connections_over_the_cap_are_a_json_503_at_once(start_sandbox_server, tmp_path):
    server = start_sandbox_server(tmp_path / "cap.db", "--max-connections", "5")
    host, port = server.url.rsplit("/", 1)[-1].split(":")
    held = [socket.create_connection((host, int(port)), timeout=5) for _ in range(5)]
    try:
        time.sleep(0.2)  # let the server accept them
        extra = socket.create_connection((host, int(port)), timeout=5)
        answer = extra.recv(4096)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer[:80]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "service_unavailable"
    finally:
        for conn in held:
            conn.close()
    time.sleep(0.2)
    assert requests.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200


# -- one process, one port: the sandbox beside a mounted ASGI app (MCP's /mcp) -----------------


def test_an_asgi_app_mounted_at_mcp_is_served_beside_the_sandbox(engine):
    import threading

    from pf_metaflow.sandbox.hosting import make_asgi_app, make_server

    async def mcp(scope, receive, send):
        body = json.dumps({"path": scope["path"]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    server = make_server(make_asgi_app(make_app(engine), mounts={"/mcp": mcp}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        for _ in range(50):  # uvicorn starts serving the bound socket in a moment
            try:
                assert requests.get(f"{url}/health", timeout=TIMEOUT).json()["status"] == "ok"
                break
            except requests.ConnectionError:
                time.sleep(0.05)
        assert requests.post(f"{url}/mcp", timeout=TIMEOUT).json()["path"] == "/mcp"
        assert requests.get(f"{url}/escrow/stats", timeout=TIMEOUT).status_code == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()
