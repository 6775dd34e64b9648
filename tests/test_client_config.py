"""Choosing and configuring a transport: PF_ESCROW_URL / PF_API_KEY, the sandbox forms,
key safety (HTTPS only except loopback, never shown), and the embedded engine path.

conftest.py gives every test its own working directory, a PF_SANDBOX_DB inside it, and
no PF_* variables from the developer's shell.
"""

from __future__ import annotations

import copy
import pickle
import socket
from decimal import Decimal
from pathlib import Path

import pytest

from pf_metaflow import retries as client_mod
from pf_metaflow.api import pf_create, pf_refund, pf_release
from pf_metaflow.client import EscrowClient, default_client
from pf_metaflow.errors import (
    AuthenticationError,
    ConfigurationError,
    InsufficientFunds,
    InvalidAgentId,
    InvalidStatus,
    NetworkError,
)
from pf_metaflow.sandbox.engine import SandboxEngine

LIVE = "https://escrow.purpleflea.com"
KEY = "pf_live_configTESTkey_abcdef012345"
OTHER_KEY = "pf_live_otherTESTkey_9876543210"


@pytest.fixture
def no_sleep(monkeypatch) -> None:
    monkeypatch.setattr(client_mod, "_sleep", lambda seconds: None)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- defaults


def test_url_and_key_default_to_the_environment(monkeypatch, requests_mock):
    monkeypatch.setenv("PF_ESCROW_URL", LIVE)
    monkeypatch.setenv("PF_API_KEY", KEY)
    client = EscrowClient()
    assert client.url == LIVE
    assert client.is_embedded is False
    requests_mock.get(f"{LIVE}/openapi.json", json={"openapi": "3.0.0"})
    client.capabilities()
    assert requests_mock.last_request.headers["Authorization"] == f"Bearer {KEY}"


def test_explicit_arguments_override_the_environment(monkeypatch, requests_mock):
    monkeypatch.setenv("PF_ESCROW_URL", "https://elsewhere.example")
    monkeypatch.setenv("PF_API_KEY", OTHER_KEY)
    client = EscrowClient("http://127.0.0.1:8765/", KEY)
    assert client.url == "http://127.0.0.1:8765"
    requests_mock.get("http://127.0.0.1:8765/openapi.json", json={})
    client.capabilities()
    assert requests_mock.last_request.headers["Authorization"] == f"Bearer {KEY}"


def test_a_trailing_slash_and_a_path_prefix_are_kept_tidy():
    assert EscrowClient("https://proxy.example/escrow/", KEY).url == "https://proxy.example/escrow"


def test_no_url_means_the_embedded_sandbox_at_pf_sandbox_db(tmp_path):
    client = EscrowClient()
    assert client.is_embedded is True
    assert client.url == f"sandbox://{tmp_path / '.pf_sandbox' / 'escrow.db'}"


def test_an_empty_pf_escrow_url_means_the_embedded_sandbox(monkeypatch):
    monkeypatch.setenv("PF_ESCROW_URL", "")
    assert EscrowClient().is_embedded is True


def test_sandbox_colon_alone_is_the_default_database(tmp_path, monkeypatch):
    monkeypatch.delenv("PF_SANDBOX_DB")
    client = EscrowClient("sandbox:")
    assert client.url == f"sandbox://{tmp_path / '.pf_sandbox' / 'escrow.db'}"


def test_sandbox_with_an_absolute_path_uses_that_database(tmp_path):
    db = tmp_path / "elsewhere" / "flows.db"
    client = EscrowClient(f"sandbox://{db}")
    assert client.url == f"sandbox://{db}"
    client.create("1", counterparty_agent_id="ag_sandbox_worker", description="where am I")
    assert db.exists()


def test_sandbox_with_a_host_is_refused():
    with pytest.raises(ConfigurationError, match=r"sandbox:///absolute/path"):
        EscrowClient("sandbox://host/escrow.db")


def test_the_embedded_sandbox_needs_no_key():
    assert repr(EscrowClient("sandbox:")).endswith("key=unset)")


# --------------------------------------------------------------------------- keys


def test_an_http_url_without_a_key_names_pf_api_key():
    with pytest.raises(ConfigurationError, match="PF_API_KEY"):
        EscrowClient(LIVE)


def test_a_malformed_key_is_refused_without_being_shown(monkeypatch):
    bad = "sk_live_this_is_not_ours_1234"
    monkeypatch.setenv("PF_API_KEY", bad)
    with pytest.raises(ConfigurationError, match="PF_API_KEY is malformed") as caught:
        EscrowClient(LIVE)
    assert bad not in str(caught.value) and bad not in repr(caught.value)


def test_a_malformed_explicit_key_names_the_argument():
    with pytest.raises(ConfigurationError, match="api_key is malformed"):
        EscrowClient(LIVE, "pf_short")


def test_a_key_with_surrounding_whitespace_is_malformed():
    with pytest.raises(ConfigurationError, match="malformed"):
        EscrowClient(LIVE, KEY + "\n")


@pytest.mark.parametrize("url", ["http://escrow.purpleflea.com", "http://10.0.0.5:8080",
                                 "http://127.0.0.1.nip.io:8080"])
def test_plain_http_to_a_remote_host_is_refused(url):
    with pytest.raises(ConfigurationError, match="plain http") as caught:
        EscrowClient(url, KEY)
    assert KEY not in str(caught.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://127.3.2.1", "http://[::1]:9000",
                                 "http://localhost:8080", "https://escrow.purpleflea.com"])
def test_plain_http_to_loopback_and_https_anywhere_are_allowed(url):
    assert EscrowClient(url, KEY).is_embedded is False


@pytest.mark.parametrize("url", ["ftp://escrow.purpleflea.com", "escrow.purpleflea.com",
                                 "https://", "https://host:notaport"])
def test_urls_that_are_not_http_or_sandbox_are_refused(url):
    with pytest.raises(ConfigurationError):
        EscrowClient(url, KEY)


def test_a_url_holding_credentials_is_refused_without_echoing_them():
    with pytest.raises(ConfigurationError, match="user name or password") as caught:
        EscrowClient("https://me:hunter2pw@escrow.purpleflea.com", KEY)
    assert "hunter2pw" not in str(caught.value)


def test_repr_shows_the_url_but_never_the_key():
    client = EscrowClient(LIVE, KEY)
    assert repr(client) == f"EscrowClient(url='{LIVE}', key=set)"
    assert KEY not in repr(client) and KEY not in str(client)
    assert KEY not in repr(vars(client)["_transport"].__dict__.get("_auth"))


def test_a_client_refuses_to_be_pickled_or_copied_so_the_key_cannot_leak():
    client = EscrowClient(LIVE, KEY)
    with pytest.raises(TypeError, match="API key"):
        pickle.dumps(client)
    with pytest.raises(TypeError):
        copy.deepcopy(client)


@pytest.mark.parametrize("options", [{"max_attempts": 0}, {"max_attempts": 1.5},
                                     {"timeout": 0}, {"max_wait": -1}])
def test_nonsense_retry_options_are_refused(options):
    with pytest.raises(ConfigurationError):
        EscrowClient(LIVE, KEY, **options)


# --------------------------------------------------------------------------- reaching the service


def test_an_unreachable_url_is_a_network_error_that_says_so(no_sleep):
    port = closed_port()
    client = EscrowClient(f"http://127.0.0.1:{port}", KEY, max_attempts=2, timeout=2)
    with pytest.raises(NetworkError) as caught:
        client.get("esc_abcdef")
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "connection refused" in message
    assert "nothing was sent" in message
    assert "PF_ESCROW_URL" in message
    assert KEY not in message


def test_an_unreachable_url_on_create_is_safe_to_retry_later(no_sleep):
    client = EscrowClient(f"http://127.0.0.1:{closed_port()}", KEY, max_attempts=1)
    with pytest.raises(NetworkError):
        client.create("1", counterparty_agent_id="ag_sandbox_worker", description="not sent")


# --------------------------------------------------------------------------- default_client


def test_default_client_is_made_once_per_environment(monkeypatch):
    monkeypatch.setenv("PF_ESCROW_URL", LIVE)
    monkeypatch.setenv("PF_API_KEY", KEY)
    first = default_client()
    assert default_client() is first
    monkeypatch.setenv("PF_API_KEY", OTHER_KEY)
    assert default_client() is not first


def test_default_client_follows_pf_sandbox_db(tmp_path, monkeypatch):
    monkeypatch.setenv("PF_SANDBOX_DB", str(tmp_path / "a.db"))
    first = default_client()
    monkeypatch.setenv("PF_SANDBOX_DB", str(tmp_path / "b.db"))
    second = default_client()
    assert (first.url, second.url) == (f"sandbox://{tmp_path / 'a.db'}",
                                       f"sandbox://{tmp_path / 'b.db'}")


# --------------------------------------------------------------------------- the embedded engine


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "embedded.db"


def test_embedded_create_and_release_move_real_sandbox_balances(db):
    client = EscrowClient(f"sandbox://{db}")
    escrow = client.create("10.00", counterparty_agent_id="ag_sandbox_worker",
                           description="embedded release")
    assert (escrow.status, escrow.creator_id, escrow.amount_usd) == (
        "funded", "ag_sandbox_payer", Decimal("10.000000"))
    settlement = client.release(escrow)
    assert (settlement.amount_usd, settlement.commission_usd, settlement.net_usd) == (
        Decimal("10.000000"), Decimal("0.100000"), Decimal("9.900000"))
    engine = SandboxEngine(db)
    assert engine.balance("ag_sandbox_worker")["usdc"] == Decimal("9.900000")
    assert client.get(escrow).status == "released"
    engine.check_invariant()


def test_embedded_refund_returns_everything_to_the_payer(db):
    client = EscrowClient(f"sandbox://{db}")
    before = client.balance()["usdc"]
    escrow = client.create("3.25", counterparty_agent_id="ag_sandbox_worker",
                           description="embedded refund")
    assert client.balance()["locked"] == Decimal("3.25")
    settlement = client.refund(escrow)
    assert (settlement.status, settlement.net_usd, settlement.commission_usd) == (
        "refunded", Decimal("3.25"), Decimal("0"))
    assert client.balance()["usdc"] == before


def test_embedded_settling_twice_returns_the_same_outcome_not_an_error(db):
    client = EscrowClient(f"sandbox://{db}")
    released = client.create("1", counterparty_agent_id="ag_sandbox_worker", description="twice")
    refunded = client.create("1", counterparty_agent_id="ag_sandbox_worker", description="twice")
    assert client.release(released).status == client.release(released).status == "released"
    assert client.refund(refunded).status == client.refund(refunded).status == "refunded"
    with pytest.raises(InvalidStatus):
        client.refund(released)
    SandboxEngine(db).check_invariant()
    assert SandboxEngine(db).balance("ag_sandbox_worker")["usdc"] == Decimal("0.99")


def test_embedded_create_with_an_idempotency_key_is_replayed(db):
    client = EscrowClient(f"sandbox://{db}")
    args = dict(counterparty_agent_id="ag_sandbox_worker", description="keyed",
                idempotency_key="run/1/s/0")
    first, again = client.create("2", **args), client.create("2", **args)
    assert (first.escrow_id, first.replayed, again.replayed) == (again.escrow_id, False, True)


def test_embedded_has_every_capability(db):
    client = EscrowClient(f"sandbox://{db}")
    assert client.capabilities() == {"refund", "idempotency", "faucet", "balance"}
    assert client.supports_refund and client.supports_idempotency


def test_embedded_with_a_sandbox_key_acts_as_that_agent(db):
    client = EscrowClient(f"sandbox://{db}", "pf_sandbox_worker_key")
    assert client.balance()["agent_id"] == "ag_sandbox_worker"
    with pytest.raises(InsufficientFunds):
        client.create("1", counterparty_agent_id="ag_sandbox_payer", description="no funds")


def test_embedded_with_an_unknown_key_explains_how_to_reach_live(db, monkeypatch):
    monkeypatch.setenv("PF_API_KEY", KEY)
    client = EscrowClient(f"sandbox://{db}")
    with pytest.raises(AuthenticationError, match="PF_ESCROW_URL") as caught:
        client.balance()
    assert KEY not in str(caught.value)


def test_embedded_self_escrow_is_refused_by_the_engine(db):
    client = EscrowClient(f"sandbox://{db}")
    with pytest.raises(InvalidAgentId):
        client.create("1", counterparty_agent_id="ag_sandbox_payer", description="to myself")


def test_api_helpers_work_on_the_default_embedded_sandbox(tmp_path):
    escrow = pf_create("ag_sandbox_worker", "0.10", "smallest escrow")
    assert pf_release(escrow).net_usd == Decimal("0.099000")
    other = pf_create("ag_sandbox_worker", Decimal("0.50"), "refunded one")
    assert pf_refund(other).net_usd == Decimal("0.50")
    assert (tmp_path / ".pf_sandbox" / "escrow.db").exists()


def test_escrow_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("PF_ESCROW_TIMEOUT", "2.5")
    assert default_client().timeout == 2.5


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "nan", "601"])
def test_a_bad_escrow_timeout_is_refused_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv("PF_ESCROW_TIMEOUT", raw)
    with pytest.raises(ConfigurationError, match="PF_ESCROW_TIMEOUT must be a number of seconds"):
        default_client()


def test_retry_time_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("PF_ESCROW_MAX_WAIT", "900")
    assert default_client().max_wait == 900
