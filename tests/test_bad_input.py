"""Bad input, wherever a user can give it: one table, one test.

Each row says where the input goes in (the decorator, a budget, the CLI, the
client, the sandbox server), what the input is, and a fragment the error must
contain. Every row asserts three things: the input is refused, the refusal
names the problem, and no money moved (the sandbox's balances, minted total,
house fees and list of escrows are the same before and after).

Rows reach the library the way a user does: decorator rows are real flow runs
(graph-time checks, and run-time ones through Parameters and ``PF_*``
variables), budget rows call ``plan_budget`` / ``allot_shards`` / ``budget_for``
as a flow's ``start`` step does, CLI rows run ``python -m pf_metaflow``, client
rows call :class:`EscrowClient`, server rows send raw requests to
``pf-metaflow sandbox serve``. Everything shares one sandbox database, so one
balance snapshot covers them all.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from conftest import running_sandbox_server
from mfrun import DECORATED_START_FLOW, Workspace, write_flow
from werkzeug.wrappers import Response

from pf_metaflow import retries as client_mod
from pf_metaflow.budget import allot_shards, budget_for, plan_budget
from pf_metaflow.client import EscrowClient
from pf_metaflow.errors import PurpleFleaError
from pf_metaflow.sandbox.engine import PAYER_KEY, SandboxEngine
from pf_metaflow.sandbox.server import make_app, make_http_server, server_url

PAYER, WORKER = "ag_sandbox_payer", "ag_sandbox_worker"
UNKNOWN_KEY = "pf_sandbox_" + "0" * 32  # well-formed, registered to nobody
AGENT_FUNDS = Decimal("100")


# -- the world every row runs in --------------------------------------------------------------


@dataclass
class World:
    db: Path
    url: str  # pf-metaflow sandbox serve (a subprocess)
    answers_url: str  # the same sandbox behind a proxy that answers badly (see _BadAnswers)
    engine: SandboxEngine
    agent: str  # a registered agent holding AGENT_FUNDS
    key: str  # its sandbox key
    payer_escrow: str  # a funded escrow of ag_sandbox_payer's, for release/refund rows

    def money(self) -> tuple:
        """Everything that would change if money moved."""
        balances = self.engine.balances()
        escrows = sorted((e["escrow_id"], e["status"]) for e in self.engine.list_escrows())
        return balances, escrows


# Bad answers a proxy or a broken server might give, chosen by the URL's path prefix
# (``{answers_url}/html500`` is a base URL whose creates and releases get an HTML 500).
# Answered before the sandbox app sees the request, so the engine never acts on it.
_ANSWERS: dict[str, tuple[int, str, bytes]] = {
    "html500": (500, "text/html", b"<!DOCTYPE html><html><head><title>500 Internal Server Error"
                                  b"</title></head><body><h1>Internal Server Error</h1><hr>"
                                  b"nginx</body></html>"),
    "empty200": (200, "application/json", b""),
    "text200": (200, "text/plain", b"OK"),
    "teapot_json": (418, "application/json", b'{"error": "teapot", "message": "I am a teapot"}'),
    "teapot_text": (418, "text/plain", b"I'm a teapot"),
    "cf520": (520, "text/html", b"<html><body>Error 520: Web server is returning an unknown "
                                b"error</body></html>"),
    "weird_release": (200, "application/json", b'{"escrow_id": "esc_0123456789abcdef", '
                                               b'"status": "pending_review"}'),
    "no_escrow_id": (201, "application/json", b'{"status": "funded", "amount_usd": 1.5}'),
}


class _BadAnswers:
    def __init__(self, app: Callable) -> None:
        self.app = app

    def __call__(self, environ: dict, start_response: Callable):
        path = environ.get("PATH_INFO", "")
        kind, _, rest = path.lstrip("/").partition("/")
        environ["PATH_INFO"] = "/" + rest
        answer = _ANSWERS.get(kind)
        if answer and environ["REQUEST_METHOD"] == "POST" and rest.startswith("escrow/"):
            status, mimetype, body = answer
            return Response(body, status=status, mimetype=mimetype)(environ, start_response)
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    db = tmp_path_factory.mktemp("bad_input") / "escrow.db"
    engine = SandboxEngine(db)
    agent = engine.register("bad input tester")
    engine.claim(agent["agent_id"], AGENT_FUNDS)
    escrow, _ = engine.create(PAYER, amount_usd=Decimal("1"), description="held for rows",
                              counterparty_agent_id=WORKER)
    proxy = make_http_server(_BadAnswers(make_app(SandboxEngine(db))))
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        with running_sandbox_server(db) as server:
            yield World(db=db, url=server.url, answers_url=server_url(proxy), engine=engine,
                        agent=agent["agent_id"], key=agent["api_key"],
                        payer_escrow=escrow["escrow_id"])
    finally:
        proxy.shutdown()
        proxy.server_close()


@dataclass
class Ctx:
    world: World
    tmp: Path


# -- how rows act -------------------------------------------------------------------------------


class Accepted(AssertionError):
    """The bad input went through."""


def refused(call: Callable[[], Any]) -> str:
    """Run ``call``; it must raise a PurpleFleaError. Its message and code, as text."""
    try:
        result = call()
    except PurpleFleaError as exc:
        return f"{exc.message} [{exc.code}]"
    raise Accepted(f"accepted, returned {result!r}")


def as_client(url: str | None = None, key: str | None = None) -> Callable[[Ctx], EscrowClient]:
    return lambda c: EscrowClient(url or c.world.url, key or c.world.key, timeout=5)


def client_create(amount: Any = "1.5", *, to: str | None = WORKER, description: str = "label data",
                  timeout_hours: int | None = None, url: str | None = None,
                  key: str | None = None, answers: str | None = None) -> Callable[[Ctx], str]:
    """A row: ``EscrowClient(url, key).create(amount, ...)`` as the registered agent."""

    def act(c: Ctx) -> str:
        base = f"{c.world.answers_url}/{answers}" if answers else (url or c.world.url)
        payee = c.world.agent if to is None else to  # None: pay oneself
        return refused(lambda: EscrowClient(base, key or c.world.key, timeout=5).create(
            amount, counterparty_agent_id=payee, description=description,
            timeout_hours=timeout_hours))

    return act


def client_config(url: str | None, key: str | None) -> Callable[[Ctx], str]:
    """A row: configuring a client (no call needed to refuse)."""

    def act(c: Ctx) -> str:
        return refused(lambda: EscrowClient(url if url is not None else c.world.url, key))

    return act


def client_release(answers: str) -> Callable[[Ctx], str]:
    def act(c: Ctx) -> str:
        client = EscrowClient(f"{c.world.answers_url}/{answers}", PAYER_KEY, timeout=5)
        return refused(lambda: client.release(c.world.payer_escrow))

    return act


def server(path: str = "/escrow/create", fields: dict | None = None, *, raw: str | None = None,
           auth: str | None = "agent", escrow: bool = False) -> Callable[[Ctx], str]:
    """A row: one raw POST to the sandbox server. ``auth``: "agent", "payer", None or a header."""

    def act(c: Ctx) -> str:
        headers = {"Content-Type": "application/json"}
        if auth == "agent":
            headers["Authorization"] = f"Bearer {c.world.key}"
        elif auth == "payer":
            headers["Authorization"] = f"Bearer {PAYER_KEY}"
        elif auth is not None:
            headers["Authorization"] = auth
        body = raw
        if body is None and fields is not None:
            body = json.dumps({"amount_usd": 1.5, "description": "label data",
                               "counterparty_agent_id": WORKER, **fields})
        where = path.format(escrow=c.world.payer_escrow) if escrow else path
        answer = requests.post(c.world.url + where, data=body, headers=headers, timeout=10)
        if answer.status_code < 400:
            raise Accepted(f"accepted: HTTP {answer.status_code} {answer.text[:200]}")
        data = answer.json()
        return f"HTTP {answer.status_code} {data['error']}: {data['message']}"

    return act


def cli(*args: str) -> Callable[[Ctx], str]:
    """A row: ``python -m pf_metaflow ARGS`` on the shared sandbox database."""

    def act(c: Ctx) -> str:
        env = {**Workspace(c.tmp).env, "PF_SANDBOX_DB": str(c.world.db)}
        proc = subprocess.run([sys.executable, "-m", "pf_metaflow", *args], cwd=c.tmp, env=env,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            raise Accepted(f"accepted: {proc.stdout[-500:]}")
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc.stderr

    return act


def budget(call: Callable[[], Any]) -> Callable[[Ctx], str]:
    """A row: the budget helpers a flow's ``start`` step calls."""
    return lambda c: refused(call)

_TERMS_FLOW = '''
from metaflow import FlowSpec, Parameter, step
from pf_metaflow import pf_escrow_step

class BadTermsFlow(FlowSpec):
    agent_wallet = Parameter("agent_wallet", default="ag_sandbox_worker")
    amount = Parameter("amount", default="1.00")

    @step
    def start(self):
        self.next(self.work)

    @pf_escrow_step(amount_usdc="amount")
    @step
    def work(self):
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    BadTermsFlow()
'''

_BUDGET_FLOW = '''
from metaflow import FlowSpec, Parameter, step
from pf_metaflow import pf_escrow_step, plan_budget

class BadBudgetFlow(FlowSpec):
    total_budget_usdc = Parameter("total_budget_usdc", default="3.00")
    step_weights = Parameter("step_weights", default='{{"work": 1}}')  # text: plan_budget parses it

    @step
    def start(self):
        self.pf_budget = plan_budget(self.total_budget_usdc, self.step_weights, flow=self)
        self.next(self.work)

    @pf_escrow_step(agent_wallet="ag_sandbox_worker"{work_args})
    @step
    def work(self):
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    BadBudgetFlow()
'''


def flow(source: str, *args: str, http: bool = False, env: dict | None = None,
         graph_time: bool = False) -> Callable[[Ctx], str]:
    """A row: ``python flow.py run ARGS`` paying from the shared sandbox (embedded by default,
    ``http=True``: through the sandbox server with the registered agent's key)."""

    def act(c: Ctx) -> str:
        extra = {"PF_SANDBOX_DB": str(c.world.db)}
        if http:
            extra.update(PF_ESCROW_URL=c.world.url, PF_API_KEY=c.world.key)
        extra.update({k: v.format(url=c.world.url) for k, v in (env or {}).items()})
        ws = Workspace(c.tmp, extra)
        run = ws.run_flow(write_flow(c.tmp, "bad_flow.py", source), *args)
        if run.returncode == 0:
            raise Accepted(f"the run succeeded:\n{run.output[-2000:]}")
        if graph_time:
            assert "Task is starting" not in run.output, "refused only after tasks started"
        return run.output

    return act


def graph(args: str) -> Callable[[Ctx], str]:
    return flow(DECORATED_START_FLOW.format(args=args), graph_time=True)


def terms(*args: str, **kw: Any) -> Callable[[Ctx], str]:
    return flow(_TERMS_FLOW, *args, **kw)


def budget_flow(*args: str, work_args: str = "") -> Callable[[Ctx], str]:
    return flow(_BUDGET_FLOW.format(work_args=work_args), *args)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


UNREACHABLE = f"http://127.0.0.1:{closed_port()}"
WEIGHTS = '{"prep": 0.5, "work": 0.5}'
STEPS = ["start", "prep", "work", "end"]
PLAN = {"total_usdc": "3.000000", "steps": {"work": "3.000000"}, "shards": {"work": ["1.5", "1.5"]}}


# -- the table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    where: str  # decorator | budget | cli | client | server
    what: str  # the bad input, for people
    expect: str  # the error must contain this
    act: Callable[[Ctx], str]

    @property
    def id(self) -> str:
        return f"{self.where}: {self.what}"


ROWS = [
    # ---- amounts
    Row("decorator", "amount_usdc=-1", "amount_usdc must not be negative", graph("amount_usdc=-1")),
    Row("decorator", "amount_usdc=0", "below the Purple Flea escrow minimum", graph("amount_usdc=0")),
    Row("decorator", "amount_usdc=float('nan')", "amount_usdc must be a finite amount",
        graph("amount_usdc=float('nan')")),
    Row("decorator", "amount_usdc='inf'", "amount_usdc must be a finite amount", graph("amount_usdc='inf'")),
    Row("decorator", "amount_usdc='2.1234567'", "more than 6 decimal places",
        graph("amount_usdc='2.1234567'")),
    Row("decorator", "amount_usdc=0.05", "below the Purple Flea escrow minimum of 0.100000 USDC",
        graph("amount_usdc=0.05")),
    Row("decorator", "amount_usdc='1e30'", "amount_usdc is too large", graph("amount_usdc='1e30'")),
    Row("decorator", "--amount nan (a Parameter)", "amount must be a finite amount",
        terms("--amount", "nan")),
    Row("decorator", "--amount 2000000 (above the payer's balance)",
        "< escrow amount 2000000.000000 USDC", terms("--amount", "2000000")),
    Row("client", "amount -1", "amount_usd must not be negative", client_create(-1)),
    Row("client", "amount 0", "below the Purple Flea escrow minimum", client_create(0)),
    Row("client", "amount NaN", "amount_usd must be a finite amount", client_create(float("nan"))),
    Row("client", "amount inf", "amount_usd must be a finite amount", client_create(float("inf"))),
    Row("client", "amount '1.0000001'", "more than 6 decimal places", client_create("1.0000001")),
    Row("client", "amount 0.09", "below the Purple Flea escrow minimum", client_create("0.09")),
    Row("client", "amount 10**30", "too large", client_create(10**30)),
    Row("client", "amount True", "must be a number of USDC", client_create(True)),
    Row("client", "amount 150 (above the agent's 100 balance)",
        "balance 100.000000 USDC < escrow amount 150.000000 USDC", client_create(150)),
    Row("server", "amount_usd 'abc'", "invalid_amount: amount_usd is not a number",
        server(fields={"amount_usd": "abc"})),
    Row("server", "amount_usd -1", "amount_usd must not be negative", server(fields={"amount_usd": -1})),
    Row("server", "amount_usd 0", "below the Purple Flea escrow minimum", server(fields={"amount_usd": 0})),
    Row("server", "amount_usd NaN (a JSON extension)", "amount_usd must be a finite amount",
        server(raw='{"amount_usd": NaN, "description": "abc", "counterparty_agent_id": "ag_sandbox_worker"}')),
    Row("server", "amount_usd Infinity", "amount_usd must be a finite amount",
        server(raw='{"amount_usd": Infinity, "description": "abc", '
                   '"counterparty_agent_id": "ag_sandbox_worker"}')),
    Row("server", "amount_usd 1e400", "HTTP 400 invalid_amount: amount_usd is too large",
        server(raw='{"amount_usd": 1e400, "description": "abc", "counterparty_agent_id": "ag_sandbox_worker"}')),
    Row("server", "amount_usd 1.1234567", "more than 6 decimal places",
        server(fields={"amount_usd": 1.1234567})),
    Row("server", "amount_usd 0.05", "below the Purple Flea escrow minimum",
        server(fields={"amount_usd": 0.05})),
    Row("server", "amount_usd missing", "amount_usd is required",
        server(raw='{"description": "abc", "counterparty_agent_id": "ag_sandbox_worker"}')),
    Row("server", "amount_usd 150 (above the agent's 100 balance)",
        "HTTP 402 insufficient_balance: balance 100.000000 USDC < escrow amount 150.000000",
        server(fields={"amount_usd": 150})),
    Row("cli", "faucet --amount -5", "amount must not be negative",
        cli("sandbox", "faucet", WORKER, "--amount", "-5")),
    Row("cli", "faucet --amount 0", "amount must be more than 0", cli("sandbox", "faucet", WORKER, "--amount", "0")),
    Row("cli", "faucet --amount nan", "amount must be a finite amount",
        cli("sandbox", "faucet", WORKER, "--amount", "nan")),
    Row("cli", "faucet --amount inf", "amount must be a finite amount",
        cli("sandbox", "faucet", WORKER, "--amount", "inf")),
    Row("cli", "faucet --amount 1.0000001", "more than 6 decimal places",
        cli("sandbox", "faucet", WORKER, "--amount", "1.0000001")),
    Row("cli", "faucet --amount 1e30", "amount is too large", cli("sandbox", "faucet", WORKER, "--amount", "1e30")),
    Row("cli", "faucet --amount 5000000 (above the per-claim limit)", "at most 1000000.000000 USDC per claim",
        cli("sandbox", "faucet", WORKER, "--amount", "5000000")),
    # ---- budgets and weights
    Row("budget", "total_budget_usdc -3", "total_budget_usdc must not be negative",
        budget(lambda: plan_budget("-3", {"work": 1}, steps=STEPS))),
    Row("budget", "total_budget_usdc nan", "total_budget_usdc must be a finite amount",
        budget(lambda: plan_budget("nan", {"work": 1}, steps=STEPS))),
    Row("budget", "total_budget_usdc inf", "total_budget_usdc must be a finite amount",
        budget(lambda: plan_budget(float("inf"), {"work": 1}, steps=STEPS))),
    Row("budget", "total_budget_usdc 3.0000001", "more than 6 decimal places",
        budget(lambda: plan_budget("3.0000001", {"work": 1}, steps=STEPS))),
    Row("budget", "weights: a negative weight", "weight for 'prep' must be a finite number >= 0",
        budget(lambda: plan_budget("3", {"prep": -0.5, "work": 0.5}, steps=STEPS))),
    Row("budget", "weights: NaN", "weight for 'work' must be a finite number >= 0",
        budget(lambda: plan_budget("3", '{"work": NaN}', steps=STEPS))),
    Row("budget", "weights: a word", "weight for 'work' is not a number",
        budget(lambda: plan_budget("3", {"work": "half"}, steps=STEPS))),
    Row("budget", "weights summing to 1.2", "more than 1",
        budget(lambda: plan_budget("3", {"prep": 0.7, "work": 0.5}, steps=STEPS))),
    Row("budget", "weights naming an unknown step", "'trian', which is not a step of this flow",
        budget(lambda: plan_budget("3", {"trian": 1}, steps=STEPS))),
    Row("budget", "weights not JSON", "step_weights is not valid JSON",
        budget(lambda: plan_budget("3", "{prep: 0.5}", steps=STEPS))),
    Row("budget", "weights a JSON list", "step_weights must be a JSON object",
        budget(lambda: plan_budget("3", "[0.5, 0.5]", steps=STEPS))),
    Row("budget", "a step's share below the minimum", "would get 0.050000 USDC",
        budget(lambda: plan_budget("1", {"prep": 0.95, "work": 0.05}, steps=STEPS))),
    Row("budget", "shards whose allowance is below the minimum", "gives 0.075000 USDC each, below",
        budget(lambda: allot_shards(plan_budget("3", {"work": 1}, steps=STEPS), "work", 40))),
    Row("budget", "allot_shards over 0 shards", "cannot split step 'work''s budget over 0 shards",
        budget(lambda: allot_shards(plan_budget("3", {"work": 1}, steps=STEPS), "work", 0))),
    Row("budget", "allot_shards for a step without a budget", "the budget has no entry for step 'prep'",
        budget(lambda: allot_shards(plan_budget("3", {"work": 1}, steps=STEPS), "prep", 2))),
    Row("budget", "a shard beyond the split", "shard 5 of step 'work' has no allowance",
        budget(lambda: budget_for(PLAN, "work", 5))),
    Row("budget", "--step_weights '{work: 1}' (a flow run)", "step_weights is not valid JSON",
        budget_flow("--step_weights", "{work: 1}")),
    Row("budget", "amount_usdc above the step's budget (a flow run)",
        "amount_usdc 5.000000 USDC is above step 'work''s budget of 3.000000 USDC",
        budget_flow("--total_budget_usdc", "3.00", work_args=', amount_usdc="5.00"')),
    # ---- agent ids
    Row("decorator", "agent_wallet=''", "agent_wallet is empty", graph("agent_wallet='', amount_usdc=1")),
    Row("decorator", "agent_wallet='0xABC123'", "looks like an on-chain wallet address",
        graph("agent_wallet='0xABC123', amount_usdc=1")),
    Row("decorator", "agent_wallet='usr-42'", "'usr-42' is not a Purple Flea agent id",
        graph("agent_wallet='usr-42', amount_usdc=1")),
    Row("decorator", "--agent_wallet usr_42 (a Parameter)", "'usr_42' is not a Purple Flea agent id",
        terms("--agent_wallet", "usr_42")),
    Row("decorator", "--agent_wallet ag_sandbox_payer (paying oneself)", "cannot create an escrow with yourself",
        terms("--agent_wallet", PAYER)),
    Row("client", "counterparty ''", "counterparty_agent_id is empty", client_create(to="")),
    Row("client", "counterparty 0x wallet", "looks like an on-chain wallet address",
        client_create(to="0x52908400098527886E0F7030069857D2E4169EE7")),
    Row("client", "counterparty 'usr_abc'", "'usr_abc' is not a Purple Flea agent id", client_create(to="usr_abc")),
    Row("client", "counterparty = the payer itself", "self_escrow", client_create(to=None)),
    Row("client", "counterparty unknown", "counterparty agent ag_nobody_here not found",
        client_create(to="ag_nobody_here")),
    Row("server", "counterparty ''", "invalid_counterparty: counterparty_agent_id is empty",
        server(fields={"counterparty_agent_id": ""})),
    Row("server", "counterparty 0x wallet", "looks like an on-chain wallet address",
        server(fields={"counterparty_agent_id": "0xdeadbeef"})),
    Row("server", "counterparty 'usr_abc'", "is not a Purple Flea agent id",
        server(fields={"counterparty_agent_id": "usr_abc"})),
    Row("server", "counterparty = the payer itself", "HTTP 400 self_escrow: cannot create an escrow with yourself",
        server(fields={"counterparty_agent_id": PAYER}, auth="payer")),
    Row("cli", "faucet 0xabc", "'0xabc' looks like an on-chain wallet address", cli("sandbox", "faucet", "0xabc")),
    Row("cli", "faucet ''", "agent is empty", cli("sandbox", "faucet", "")),
    Row("cli", "faucet usr_1", "'usr_1' is not a Purple Flea agent id", cli("sandbox", "faucet", "usr_1")),
    # ---- other terms of an escrow
    Row("decorator", "timeout_hours=0", "timeout_hours must be a whole number from 1 to 720",
        graph("agent_wallet='ag_sandbox_worker', amount_usdc=1, timeout_hours=0")),
    Row("decorator", "steps naming an unknown step", "steps names trian, not steps of this flow",
        graph("agent_wallet='ag_sandbox_worker', amount_usdc=1, steps='trian'")),
    Row("client", "description 'a'", "description must be text of at least 3 characters",
        client_create(description="a")),
    Row("client", "timeout_hours 721", "timeout_hours must be a whole number of hours from 1 to 720",
        client_create(timeout_hours=721)),
    Row("server", "description 'a'", "invalid_description", server(fields={"description": "a"})),
    Row("server", "timeout_hours 'abc'", "timeout_hours must be a whole number of hours",
        server(fields={"timeout_hours": "abc"})),
    Row("server", "a body that is not JSON", "invalid_json: request body is not JSON", server(raw="amount=1.5")),
    Row("server", "a JSON list body", "request body must be a JSON object", server(raw="[1.5]")),
    Row("server", "release of an unknown escrow", "HTTP 404 not_found: escrow esc_nope not found",
        server("/escrow/release/esc_nope", raw="")),
    Row("server", "release of another agent's escrow", "HTTP 403 forbidden",
        server("/escrow/release/{escrow}", raw="", escrow=True)),
    Row("server", "refund of another agent's escrow", "HTTP 403 forbidden",
        server("/escrow/refund/{escrow}", raw="", escrow=True)),
    Row("cli", "register ''", "name must be non-empty text", cli("sandbox", "register", "")),
    Row("cli", "serve --create-rate 0/2", "expected N >= 1 and SECONDS > 0",
        cli("sandbox", "serve", "--create-rate", "0/2")),
    Row("cli", "serve --create-rate fast", "expected N/SECONDS such as 20/60",
        cli("sandbox", "serve", "--create-rate", "fast")),
    Row("cli", "serve --port 99999", "a port is a number from 0 to 65535",
        cli("sandbox", "serve", "--port", "99999")),
    Row("cli", "ledger of a flow with no runs", "Flow('NoSuchFlow') does not exist", cli("ledger", "NoSuchFlow")),
    Row("cli", "reconcile of a run that does not exist", "Run('NoSuchFlow/12') does not exist",
        cli("reconcile", "NoSuchFlow/12")),
    # ---- keys
    Row("decorator", "PF_ESCROW_URL set, PF_API_KEY missing", "set PF_API_KEY",
        terms(env={"PF_ESCROW_URL": "{url}"})),
    Row("decorator", "PF_API_KEY malformed", "PF_API_KEY is malformed",
        terms(env={"PF_ESCROW_URL": "{url}", "PF_API_KEY": "hunter2"})),
    Row("decorator", "PF_API_KEY unknown to the server", "unknown API key",
        terms(env={"PF_ESCROW_URL": "{url}", "PF_API_KEY": UNKNOWN_KEY})),
    Row("client", "no key for an http URL", "set PF_API_KEY", client_config(None, None)),
    Row("client", "a malformed key", "api_key is malformed", client_config(None, "not a key")),
    Row("client", "a key with a trailing newline", "api_key is malformed", client_config(None, UNKNOWN_KEY + "\n")),
    Row("client", "a key the server does not know", "unknown API key: no agent of this sandbox has it",
        client_create(key=UNKNOWN_KEY)),
    Row("client", "a key the embedded sandbox does not know", "the embedded sandbox does not know this API key",
        lambda c: refused(lambda: EscrowClient(f"sandbox://{c.world.db}", UNKNOWN_KEY).create(
            "1", counterparty_agent_id=WORKER, description="label data"))),
    Row("server", "no Authorization header", "HTTP 401 unauthorized: Authorization: Bearer <sandbox api key> required",
        server(fields={}, auth=None)),
    Row("server", "an unknown bearer key", "HTTP 401 unauthorized: unknown API key",
        server(fields={}, auth=f"Bearer {UNKNOWN_KEY}")),
    Row("server", "the key in the wrong scheme", "HTTP 401 unauthorized: Authorization: Bearer",
        server(fields={}, auth=f"Basic {PAYER_KEY}")),
    # ---- URLs
    Row("decorator", "PF_ESCROW_URL plain http to a remote host", "refusing to send the API key over plain http",
        terms(env={"PF_ESCROW_URL": "http://escrow.example.com", "PF_API_KEY": UNKNOWN_KEY})),
    Row("decorator", "PF_ESCROW_URL unreachable", "cannot reach the escrow service",
        terms(env={"PF_ESCROW_URL": UNREACHABLE, "PF_API_KEY": UNKNOWN_KEY, "PF_ESCROW_MAX_WAIT": "1"})),
    Row("client", "plain http to a remote host", "refusing to send the API key over plain http to escrow.example.com",
        client_config("http://escrow.example.com", UNKNOWN_KEY)),
    Row("client", "an ftp URL", "must be an https:// URL", client_config("ftp://escrow.purpleflea.com", UNKNOWN_KEY)),
    Row("client", "credentials inside the URL", "must not contain a user name or password",
        client_config("https://me:secret@escrow.purpleflea.com", UNKNOWN_KEY)),
    Row("client", "an unreachable URL", "connection refused); nothing was sent", client_create(url=UNREACHABLE)),
    # ---- what a server answers
    Row("client", "create answered by an HTML error page", "answered HTTP 500 with an HTML page",
        client_create(answers="html500")),
    Row("client", "create answered 200 with an empty body", "answered HTTP 200 with an empty body",
        client_create(answers="empty200")),
    Row("client", "create answered 200 'OK' as text", "something that is not a JSON object",
        client_create(answers="text200")),
    Row("client", "create answered an unknown status (418, JSON)", "I am a teapot (HTTP 418 teapot)",
        client_create(answers="teapot_json")),
    Row("client", "create answered an unknown status (418, text)", "answered HTTP 418 with something that is not",
        client_create(answers="teapot_text")),
    Row("client", "create answered an unknown status (520, HTML)", "answered HTTP 520 with an HTML page",
        client_create(answers="cf520")),
    Row("client", "create answered without an escrow_id", "has no valid escrow_id",
        client_create(answers="no_escrow_id")),
    Row("client", "release answered with an unknown escrow status", "a release answered status 'pending_review'",
        client_release("weird_release")),
]


@pytest.fixture(autouse=True)
def _no_retry_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod, "_sleep", lambda seconds: None)


def test_the_table_covers_every_place_input_enters():
    assert len(ROWS) >= 25
    assert {r.where for r in ROWS} == {"decorator", "budget", "cli", "client", "server"}
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_refused_naming_the_problem_and_moves_no_money(row: Row, world: World, tmp_path: Path):
    before = world.money()
    said = row.act(Ctx(world, tmp_path))
    assert row.expect in said, f"the error does not say {row.expect!r}:\n{said[-3000:]}"
    assert world.key not in said and UNKNOWN_KEY not in said
    assert world.money() == before, "money moved"
    world.engine.check_invariant()


def test_an_explicit_amount_within_the_steps_budget_is_still_locked_and_paid(tmp_path: Path):
    ws = Workspace(tmp_path)
    source = _BUDGET_FLOW.format(work_args=', amount_usdc="2.50"')
    run = ws.run_flow(write_flow(tmp_path, "within_budget.py", source), "--total_budget_usdc", "3.00")
    assert run.returncode == 0, run.output
    [entry] = ws.ledger(run.pathspec)["entries"]
    assert (entry["amount_usdc"], entry["status"]) == ("2.500000", "released")
