"""Payment scenarios, each run four ways: the embedded engine, a real sandbox server,
and :class:`EscrowClient` over each of them.

The server is a ``pf-metaflow sandbox serve`` subprocess on 127.0.0.1. The raw legs
speak to it with plain ``requests`` (JSON numbers parsed as Decimal) and call the engine
directly, so the engine's rules and the wire protocol are checked apart from the client;
the client legs prove the client and both sandbox transports agree. Agents are registered
and funded straight in the database file (every leg shares it with its server); every
scenario ends with the conservation invariant checked on that file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Optional

import pytest
import requests

from pf_metaflow.client import EscrowClient
from pf_metaflow.errors import (
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    InvalidStatus,
    NotFound,
    PermissionDenied,
    error_for,
)
from pf_metaflow.money import fee_for, quantize, split_by_weights, split_even
from pf_metaflow.sandbox.engine import SandboxEngine

D = Decimal
_AMOUNTS = {"amount_usd", "commission_usd", "net_to_counterparty", "amount_released",
            "commission", "referral_commission", "amount_refunded", "usdc", "locked"}


@dataclass
class Agent:
    agent_id: str
    api_key: str
    referral_code: str


class EmbeddedActor:
    """One agent calling the engine in-process."""

    def __init__(self, engine: SandboxEngine, agent: Agent) -> None:
        self.engine = engine
        self.agent_id = agent.agent_id

    def create(self, amount: Any, counterparty: str, description: str = "label data", *,
               timeout_hours: Optional[int] = None, referral_code: Optional[str] = None,
               idempotency_key: Optional[str] = None) -> dict:
        record, replayed = self.engine.create(
            self.agent_id, amount_usd=amount, description=description,
            counterparty_agent_id=counterparty, timeout_hours=timeout_hours,
            referral_code=referral_code, idempotency_key=idempotency_key,
        )
        return {**record, "replayed": replayed}

    def release(self, escrow_id: str) -> dict:
        return self.engine.release(self.agent_id, escrow_id)

    def refund(self, escrow_id: str) -> dict:
        return self.engine.refund(self.agent_id, escrow_id)

    def complete(self, escrow_id: str) -> dict:
        return self.engine.complete(self.agent_id, escrow_id)

    def dispute(self, escrow_id: str, reason: Optional[str] = None) -> dict:
        return self.engine.dispute(self.agent_id, escrow_id, reason)

    def get(self, escrow_id: str) -> dict:
        return self.engine.get(escrow_id)

    def balance(self) -> dict:
        return self.engine.balance(self.agent_id)


class HttpActor:
    """One agent speaking the wire protocol to a sandbox server with plain requests."""

    def __init__(self, url: str, agent: Agent, session: requests.Session) -> None:
        self.url = url
        self.agent_id = agent.agent_id
        self.session = session
        self.headers = {"Authorization": f"Bearer {agent.api_key}"}

    def _call(self, method: str, path: str, body: Optional[dict] = None,
              headers: Optional[dict] = None) -> tuple[dict, requests.Response]:
        response = self.session.request(
            method, self.url + path, json=body, headers={**self.headers, **(headers or {})},
            timeout=10,
        )
        data = json.loads(response.text, parse_float=Decimal)
        assert data.pop("_info")["service"] == "pf-metaflow sandbox"
        if response.status_code >= 400:
            details = {k: v for k, v in data.items() if k not in ("error", "message")}
            raise error_for(response.status_code, data.get("error"), data.get("message", ""),
                            details)
        for key in _AMOUNTS & data.keys():
            data[key] = quantize(D(data[key]))
        return data, response

    def create(self, amount: Any, counterparty: str, description: str = "label data", *,
               timeout_hours: Optional[int] = None, referral_code: Optional[str] = None,
               idempotency_key: Optional[str] = None) -> dict:
        body: dict[str, Any] = {"amount_usd": float(amount) if isinstance(amount, Decimal)
                                else amount,
                                "description": description, "counterparty_agent_id": counterparty}
        if timeout_hours is not None:
            body["timeout_hours"] = timeout_hours
        if referral_code is not None:
            body["referral_code"] = referral_code
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        data, response = self._call("POST", "/escrow/create", body, headers)
        assert response.status_code == 201
        data["replayed"] = response.headers.get("Idempotent-Replayed") == "true"
        return data

    def release(self, escrow_id: str) -> dict:
        return self._call("POST", f"/escrow/release/{escrow_id}")[0]

    def refund(self, escrow_id: str) -> dict:
        return self._call("POST", f"/escrow/refund/{escrow_id}")[0]

    def complete(self, escrow_id: str) -> dict:
        return self._call("POST", f"/escrow/complete/{escrow_id}")[0]

    def dispute(self, escrow_id: str, reason: Optional[str] = None) -> dict:
        return self._call("POST", f"/escrow/dispute/{escrow_id}",
                          {"reason": reason} if reason else None)[0]

    def get(self, escrow_id: str) -> dict:
        return self._call("GET", f"/escrow/{escrow_id}")[0]

    def balance(self) -> dict:
        return self._call("GET", "/wallet/balance")[0]


class ClientActor:
    """One agent using EscrowClient (embedded or HTTP). The client only pays and settles,
    so the counterparty's own actions (complete, dispute) go to the engine directly."""

    def __init__(self, url: str, agent: Agent, engine: SandboxEngine) -> None:
        self.client = EscrowClient(url, agent.api_key, max_attempts=1)
        self.agent_id = agent.agent_id
        self.engine = engine

    def create(self, amount: Any, counterparty: str, description: str = "label data", *,
               timeout_hours: Optional[int] = None, referral_code: Optional[str] = None,
               idempotency_key: Optional[str] = None) -> dict:
        escrow = self.client.create(
            amount, counterparty_agent_id=counterparty, description=description,
            timeout_hours=timeout_hours, referral_code=referral_code,
            idempotency_key=idempotency_key,
        )
        return escrow._asdict()

    def release(self, escrow_id: str) -> dict:
        paid = self.client.release(escrow_id)
        return {"escrow_id": paid.escrow_id, "status": paid.status,
                "amount_released": paid.net_usd, "commission": paid.commission_usd,
                "referral_commission": paid.referral_commission_usd}

    def refund(self, escrow_id: str) -> dict:
        back = self.client.refund(escrow_id)
        return {"escrow_id": back.escrow_id, "status": back.status,
                "amount_refunded": back.net_usd}

    def complete(self, escrow_id: str) -> dict:
        return self.engine.complete(self.agent_id, escrow_id)

    def dispute(self, escrow_id: str, reason: Optional[str] = None) -> dict:
        return self.engine.dispute(self.agent_id, escrow_id, reason)

    def get(self, escrow_id: str) -> dict:
        return self.client.get(escrow_id)._asdict()

    def balance(self) -> dict:
        return self.client.balance()


class Desk:
    """Where a scenario gets its agents: registered and funded in the shared db file."""

    def __init__(self, engine: SandboxEngine, actor_for) -> None:
        self.engine = engine
        self._actor_for = actor_for

    def agent(self, name: str, usdc: str = "0"):
        registered = self.engine.register(name)
        if D(usdc):
            self.engine.claim(registered["agent_id"], D(usdc))
        return self._actor_for(Agent(**registered))


@pytest.fixture(params=["embedded", "http", "client-embedded", "client-http"])
def desk(request, tmp_path):
    if request.param.endswith("embedded"):
        engine = SandboxEngine(tmp_path / "escrow.db")
        url = f"sandbox://{engine.path}"
    else:
        server = request.getfixturevalue("sandbox_server")
        engine = SandboxEngine(server.db)
        url = server.url
    if request.param == "embedded":
        desk = Desk(engine, lambda agent: EmbeddedActor(engine, agent))
    elif request.param == "http":
        session = requests.Session()
        request.addfinalizer(session.close)
        desk = Desk(engine, lambda agent: HttpActor(url, agent, session))
    else:
        desk = Desk(engine, lambda agent: ClientActor(url, agent, engine))
    engine.check_invariant()
    yield desk
    engine.check_invariant()


def usdc(actor) -> Decimal:
    return actor.balance()["usdc"]


# -- the scenarios ---------------------------------------------------------------------


def test_a_successful_step_pays_the_worker_amount_minus_the_fee(desk):
    payer, worker = desk.agent("payer", "50"), desk.agent("worker")
    escrow = payer.create(D("12.5"), worker.agent_id, "train model")
    assert escrow["status"] == "funded"
    assert payer.balance() == {"agent_id": payer.agent_id, "usdc": D("37.5"),
                               "locked": D("12.5")}
    paid = payer.release(escrow["escrow_id"])
    assert (paid["status"], paid["amount_released"], paid["commission"]) == (
        "released", D("12.375"), D("0.125"))
    assert usdc(worker) == D("12.375")
    assert payer.balance() == {"agent_id": payer.agent_id, "usdc": D("37.5"), "locked": D(0)}
    assert payer.get(escrow["escrow_id"])["status"] == "released"


def test_a_failed_step_is_refunded_in_full(desk):
    payer, worker = desk.agent("payer", "50"), desk.agent("worker")
    escrow = payer.create(D("20"), worker.agent_id)
    refunded = payer.refund(escrow["escrow_id"])
    assert (refunded["status"], refunded["amount_refunded"]) == ("refunded", D("20"))
    assert payer.balance() == {"agent_id": payer.agent_id, "usdc": D("50"), "locked": D(0)}
    assert usdc(worker) == D(0)


def test_the_worker_marks_done_and_the_payer_releases(desk):
    payer, worker = desk.agent("payer", "5"), desk.agent("worker")
    escrow = payer.create(D("5"), worker.agent_id)
    assert worker.complete(escrow["escrow_id"])["status"] == "completed"
    payer.release(escrow["escrow_id"])
    assert usdc(worker) == D("4.95")


def test_a_referrer_earns_fifteen_percent_of_the_fee(desk):
    payer, worker, referrer = desk.agent("payer", "200"), desk.agent("w"), desk.agent("ref")
    code = desk.engine.referral_code(referrer.agent_id)
    escrow = payer.create(D("200"), worker.agent_id, referral_code=code)
    paid = payer.release(escrow["escrow_id"])
    assert (paid["commission"], paid["referral_commission"]) == (D("2"), D("0.3"))
    assert (usdc(worker), usdc(referrer)) == (D("198"), D("0.3"))


def test_a_retried_create_with_the_same_idempotency_key_locks_once(desk):
    payer, worker = desk.agent("payer", "10"), desk.agent("worker")
    first = payer.create(D("4"), worker.agent_id, idempotency_key="run-1/train/7/0")
    again = payer.create(D("4"), worker.agent_id, idempotency_key="run-1/train/7/0")
    assert (first["replayed"], again["replayed"]) == (False, True)
    assert again["escrow_id"] == first["escrow_id"]
    assert payer.balance()["locked"] == D("4")


def test_reusing_an_idempotency_key_for_another_request_is_refused(desk):
    payer, worker = desk.agent("payer", "10"), desk.agent("worker")
    payer.create(D("4"), worker.agent_id, idempotency_key="k")
    with pytest.raises(IdempotencyConflict):
        payer.create(D("5"), worker.agent_id, idempotency_key="k")
    assert payer.balance()["locked"] == D("4")


def test_releasing_twice_pays_once(desk):
    payer, worker = desk.agent("payer", "10"), desk.agent("worker")
    escrow = payer.create(D("10"), worker.agent_id)
    payer.release(escrow["escrow_id"])
    try:  # the service refuses; EscrowClient reports the release that already happened
        again = payer.release(escrow["escrow_id"])
    except InvalidStatus:
        pass
    else:
        assert (again["status"], again["amount_released"]) == ("released", D("9.9"))
    assert usdc(worker) == D("9.9")


def test_a_refund_after_release_is_refused_and_the_worker_keeps_the_pay(desk):
    payer, worker = desk.agent("payer", "10"), desk.agent("worker")
    escrow = payer.create(D("10"), worker.agent_id)
    payer.release(escrow["escrow_id"])
    with pytest.raises(InvalidStatus):
        payer.refund(escrow["escrow_id"])
    assert (usdc(payer), usdc(worker)) == (D(0), D("9.9"))


def test_the_worker_can_neither_release_nor_refund(desk):
    payer, worker = desk.agent("payer", "10"), desk.agent("worker")
    escrow = payer.create(D("3"), worker.agent_id)
    for operation in (worker.release, worker.refund):
        with pytest.raises(PermissionDenied):
            operation(escrow["escrow_id"])
    assert worker.get(escrow["escrow_id"])["status"] == "funded"


def test_insufficient_funds_moves_no_money(desk):
    payer, worker = desk.agent("payer", "1"), desk.agent("worker")
    with pytest.raises(InsufficientFunds) as caught:
        payer.create(D("1.000001"), worker.agent_id)
    assert D(caught.value.details["balance"]) == D("1")
    assert payer.balance() == {"agent_id": payer.agent_id, "usdc": D("1"), "locked": D(0)}


def test_a_disputed_escrow_stays_locked(desk):
    payer, worker = desk.agent("payer", "10"), desk.agent("worker")
    escrow = payer.create(D("6"), worker.agent_id)
    assert worker.dispute(escrow["escrow_id"], "not paid for extra work")["status"] == "disputed"
    with pytest.raises(InvalidStatus):
        payer.release(escrow["escrow_id"])
    assert payer.balance()["locked"] == D("6")
    assert usdc(worker) == D(0)


def test_an_amount_below_the_minimum_is_refused(desk):
    payer, worker = desk.agent("payer", "10"), desk.agent("worker")
    with pytest.raises(InvalidAmount):
        payer.create("0.099999", worker.agent_id)
    assert usdc(payer) == D("10")


def test_an_unknown_escrow_is_not_found(desk):
    payer = desk.agent("payer")
    with pytest.raises(NotFound):
        payer.release("esc_0000000000000000")


def test_a_pipeline_budget_pays_passing_steps_and_refunds_the_failed_one(desk):
    payer, worker = desk.agent("payer", "12"), desk.agent("worker")
    budget = split_by_weights(D("12"), {"ingest": "0.15", "train": "0.5", "evaluate": "0.2",
                                        "deploy": "0.15"})
    escrows = {step: payer.create(amount, worker.agent_id, f"step {step}")
               for step, amount in budget.items()}
    assert payer.balance()["locked"] == D("12")
    for step in ("ingest", "train", "deploy"):
        payer.release(escrows[step]["escrow_id"])
    payer.refund(escrows["evaluate"]["escrow_id"])
    paid = sum(fee_for(budget[s]).net for s in ("ingest", "train", "deploy"))
    assert usdc(worker) == paid == D("9.504")
    assert payer.balance() == {"agent_id": payer.agent_id, "usdc": budget["evaluate"],
                               "locked": D(0)}


def test_foreach_shards_split_evenly_are_each_paid_to_the_micro_usdc(desk):
    payer, worker = desk.agent("payer", "1"), desk.agent("worker")
    shards = split_even(D("1"), 7)
    for i, amount in enumerate(shards):
        payer.release(payer.create(amount, worker.agent_id, f"shard {i}")["escrow_id"])
    assert usdc(payer) == D(0)
    assert usdc(worker) == sum(fee_for(a).net for a in shards) == D("0.989997")
