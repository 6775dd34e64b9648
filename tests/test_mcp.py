"""Issue 14: the escrow over MCP (the sandbox's tools) and the step-side agent toolkit.

The MCP endpoint is served by uvicorn in a thread of this process (the ASGI app the sandbox
server mounts at /mcp) and called with the SDK's stock streamable-HTTP client. Money is
read from the sandbox engine itself, to the micro-USDC.
"""

from __future__ import annotations

import json
import textwrap
import threading
import time
from decimal import Decimal

import pytest

pytest.importorskip("mcp")
uvicorn = pytest.importorskip("uvicorn")

import anyio  # noqa: E402
from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from pf_metaflow.client import EscrowClient  # noqa: E402
from pf_metaflow.mcp import AgentEscrowTools, McpConnection, McpEscrowClient, build_server, mcp_asgi_app  # noqa: E402
from pf_metaflow.mcp.tools import TOOL_NAMES  # noqa: E402
from pf_metaflow.sandbox.engine import PAYER_KEY, SandboxEngine  # noqa: E402

from mfrun import Workspace, write_flow  # noqa: E402

D = Decimal
PAYER = "ag_sandbox_payer"
WORKER = "ag_sandbox_worker"


# ---------------------------------------------------------------------------------------
# Serving /mcp (uvicorn in a thread, bounded)


class Served:
    def __init__(self, engine: SandboxEngine) -> None:
        self.engine = engine
        self.app = mcp_asgi_app(engine)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.url = self.base + "/mcp"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def served(tmp_path):
    with Served(SandboxEngine(tmp_path / "mcp.db")) as s:
        yield s


async def _session_calls(url: str, calls: list) -> tuple[list, list]:
    """With the SDK's stock streamable-HTTP client: list the tools, then make ``calls``
    (name, arguments or a function of the answers so far)."""
    answers = []
    async with streamable_http_client(url) as (read, write, *_):
        async with ClientSession(read, write) as session:
            await session.initialize()
            listed = await session.list_tools()
            for name, args in calls:
                if callable(args):
                    args = args(answers)
                result = await session.call_tool(name, args)
                assert len(result.content) == 1 and result.content[0].type == "text"
                answers.append((bool(result.is_error), json.loads(result.content[0].text)))
    return listed.tools, answers


def stock_client(url: str, calls: list) -> tuple[list, list]:
    return anyio.run(_session_calls, url, calls)


def money(engine: SandboxEngine) -> dict:
    b = engine.balances()
    return {"agents": {a: (v["usdc"], v["locked"]) for a, v in b["agents"].items()},
            "house": b["house_fees"], "minted": b["minted"]}


# ---------------------------------------------------------------------------------------
# The sandbox's /mcp: live tool set, shapes, codes


def test_stock_client_lists_six_tools_creates_releases_reads_and_gets_self_escrow(served):
    before = money(served.engine)
    tools, answers = stock_client(served.url, [
        ("create_escrow", {"casino_api_key": PAYER_KEY, "amount_usd": 2.5, "counterparty_agent_id": WORKER,
                           "description": "label 40 images"}),
        ("release_escrow", lambda a: {"casino_api_key": PAYER_KEY, "escrow_id": a[0][1]["escrow_id"]}),
        ("get_escrow", lambda a: {"escrow_id": a[0][1]["escrow_id"]}),
        ("create_escrow", {"casino_api_key": PAYER_KEY, "amount_usd": 1, "counterparty_agent_id": PAYER,
                           "description": "pay myself"}),
        ("escrow_stats", {}),
    ])
    assert [t.name for t in tools] == list(TOOL_NAMES)
    schemas = {t.name: t.input_schema for t in tools}
    assert set(schemas["create_escrow"]["required"]) == {"casino_api_key", "amount_usd", "counterparty_agent_id",
                                                         "description"}
    assert set(schemas["create_escrow"]["properties"]) >= {"timeout_hours", "referral_code"}
    assert set(schemas["dispute_escrow"]["required"]) == {"casino_api_key", "escrow_id", "reason"}
    assert schemas["get_escrow"]["required"] == ["escrow_id"] and schemas["escrow_stats"]["properties"] == {}

    (e1, created), (e2, released), (e3, read), (e4, refused), (e5, stats) = answers
    assert not (e1 or e2 or e3 or e5)
    assert created["status"] == "funded" and created["amount_usd"] == 2.5 and created["commission_usd"] == 0.025
    assert created["net_to_counterparty"] == 2.475 and created["creator_id"] == PAYER
    assert released == {**released, "status": "released", "amount_released": 2.475, "commission": 0.025,
                        "counterparty_id": WORKER}
    assert read["status"] == "released" and read["escrow_id"] == created["escrow_id"]
    assert e4 and refused["error"] == "self_escrow" and refused["message"]
    assert stats["total_created"] == 1 and stats["total_released"] == 1

    after = money(served.engine)
    assert after["agents"][PAYER] == (before["agents"][PAYER][0] - D("2.5"), D(0))
    assert after["agents"][WORKER] == (before["agents"][WORKER][0] + D("2.475"), D(0))
    assert after["house"] == before["house"] + D("0.025")
    served.engine.check_invariant()
    # HTTP and MCP share one engine: the escrow client sees the MCP-created escrow.
    assert EscrowClient(f"sandbox://{served.engine.path}").get(created["escrow_id"]).status == "released"


def test_sandbox_serve_has_mcp_at_slash_mcp_on_the_same_database(start_sandbox_server, tmp_path):
    """`pf-metaflow sandbox serve` itself: the stock client at URL/mcp, the HTTP API beside it."""
    server = start_sandbox_server(tmp_path / "serve" / "escrow.db")
    tools, answers = stock_client(server.url + "/mcp", [
        ("create_escrow", {"casino_api_key": PAYER_KEY, "amount_usd": 1.5, "counterparty_agent_id": WORKER,
                           "description": "served over /mcp"}),
        ("release_escrow", lambda a: {"casino_api_key": PAYER_KEY, "escrow_id": a[0][1]["escrow_id"]}),
    ])
    assert sorted(t.name for t in tools) == sorted(TOOL_NAMES)
    (e1, created), (e2, released) = answers
    assert not (e1 or e2) and released["status"] == "released"
    http = EscrowClient(server.url, PAYER_KEY).get(created["escrow_id"])
    assert http.status == "released" and http.amount_usd == D("1.5")
    engine = SandboxEngine(server.db)
    assert engine.balances()["agents"][WORKER]["usdc"] == D("1.485")
    engine.check_invariant()


def test_bad_input_through_mcp_gets_live_codes_and_moves_nothing(served):
    poor = served.engine.register("poor agent")  # no USDC
    base = {"casino_api_key": PAYER_KEY, "amount_usd": 1.0, "counterparty_agent_id": WORKER,
            "description": "some work"}
    cases = {
        "self_escrow": {**base, "counterparty_agent_id": PAYER},
        "counterparty_not_found": {**base, "counterparty_agent_id": "ag_nobody_here"},
        "insufficient_balance": {**base, "casino_api_key": poor["api_key"]},
        "invalid_amount": {**base, "amount_usd": 0.05},
        "unauthorized": {**base, "casino_api_key": "pf_sandbox_not_a_real_key_123"},
        "invalid_counterparty": {**base, "counterparty_agent_id": "0xABC"},
        "invalid_description": {**base, "description": "x"},
    }
    before = money(served.engine)
    _, answers = stock_client(served.url, [("create_escrow", args) for args in cases.values()] + [
        ("release_escrow", {"casino_api_key": "pf_sandbox_not_a_real_key_123", "escrow_id": "esc_missing"}),
        ("get_escrow", {"escrow_id": "esc_missing"}),
    ])
    codes = [body["error"] for _, body in answers]
    assert codes == list(cases) + ["unauthorized", "not_found"]
    assert all(is_error and set(body) >= {"error", "message"} for is_error, body in answers)
    insufficient = answers[2][1]
    assert insufficient["balance"] == 0
    for _, body in answers:  # no answer repeats a key
        assert "pf_sandbox_not_a_real_key_123" not in json.dumps(body) and poor["api_key"] not in json.dumps(body)
    assert money(served.engine) == before
    assert served.engine.stats()["total_created"] == 0


def test_mounted_without_lifespan_says_so(tmp_path):
    import httpx2

    app = mcp_asgi_app(SandboxEngine(tmp_path / "x.db"))
    transport = httpx2.ASGITransport(app=app) if hasattr(httpx2, "ASGITransport") else None
    if transport is None:
        pytest.skip("httpx2 has no ASGITransport")

    async def post():
        async with httpx2.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return await c.post("/mcp", json={})

    response = anyio.run(post)
    assert response.status_code == 503 and "lifespan" in response.json()["message"]


# ---------------------------------------------------------------------------------------
# The toolkit, without Metaflow: the key, the allowance, settling


class Recorded:
    def __init__(self):
        self.records, self.noted, self.logs = [], [], []

    def write(self, entry, n):
        self.records.append(json.loads(json.dumps(entry)))

    def note(self, entries):
        self.noted.extend(entries)


def toolkit(engine, key, rec, *, allowance="3.00", url=None, attempt=0):
    connection = McpConnection(url) if url else McpConnection(server=build_server(engine))
    client = McpEscrowClient(connection, key, lambda: EscrowClient(f"sandbox://{engine.path}", key))
    return AgentEscrowTools(client, allowance_usdc=allowance, task_ref="F/1/hire/2", run="F/1", step="hire",
                            task="2", attempt=attempt, records=lambda: list(rec.records), write=rec.write,
                            note=rec.note, log=rec.logs.append)


@pytest.fixture
def funded(tmp_path):
    engine = SandboxEngine(tmp_path / "kit.db")
    boss = engine.register("boss")
    engine.claim(boss["agent_id"], "50")
    helpers = [engine.register(n)["agent_id"] for n in ("helper one", "helper two")]
    return engine, boss, helpers


def test_the_key_never_reaches_the_model(funded):
    engine, boss, helpers = funded
    key, rec = boss["api_key"], Recorded()
    tools = toolkit(engine, key, rec)
    seen = [json.dumps(tools.tool_specs())]
    assert "casino_api_key" not in seen[0]
    calls = [
        ("escrow_allowance", {}),
        ("create_escrow", {"amount_usd": 1.0, "counterparty_agent_id": helpers[0], "description": "job one"}),
        ("create_escrow", {"amount_usd": 1.0, "counterparty_agent_id": boss["agent_id"], "description": "self"}),
        ("create_escrow", {"amount_usd": 1.0, "counterparty_agent_id": "ag_ghost", "description": "ghost"}),
        ("create_escrow", {"amount_usd": 0.01, "counterparty_agent_id": helpers[0], "description": "tiny"}),
        ("create_escrow", {"amount_usd": 99, "counterparty_agent_id": helpers[0], "description": "too much"}),
        ("create_escrow", {"amount_usd": 1, "counterparty_agent_id": helpers[0], "description": "x",
                           "casino_api_key": key}),
        ("release_escrow", {"escrow_id": "esc_not_mine"}),
        ("dispute_escrow", {"escrow_id": "esc_not_mine", "reason": "bad"}),
        ("get_escrow", {"escrow_id": "esc_missing"}),
        ("no_such_tool", {}),
        ("escrow_stats", {}),
    ]
    results = [tools.call(name, args) for name, args in calls]
    seen += [r.text for r in results]
    errors = [r.json.get("error") for r in results if r.is_error]
    assert errors == ["self_escrow", "counterparty_not_found", "invalid_amount", "allowance_exceeded",
                      "invalid_request", "forbidden", "forbidden", "not_found", "unknown_tool"]
    tools.settle(ok=False)
    seen += rec.logs + [json.dumps(r) for r in rec.records] + [json.dumps(e) for e in rec.noted]
    assert all(key not in text for text in seen)
    # Creates the service refused are recorded (not_created, no money moved) but stay off the
    # ledger: the agent got the error; the ones refused before sending left no record at all.
    assert sorted(r["status"] for r in rec.records if r["status"] == "not_created") == ["not_created"] * 2
    assert sorted(e["status"] for e in tools.entries()) == ["refunded"]


def test_an_agent_cannot_spend_past_its_allowance_and_is_refused_before_any_escrow(funded):
    engine, boss, helpers = funded
    rec = Recorded()
    tools = toolkit(engine, boss["api_key"], rec, allowance="2.00")
    first = tools.call("create_escrow", {"amount_usd": 1.5, "counterparty_agent_id": helpers[0],
                                         "description": "job one"})
    assert not first.is_error
    escrows, records, before = len(engine.list_escrows()), len(rec.records), money(engine)
    over = tools.call("create_escrow", {"amount_usd": 0.51, "counterparty_agent_id": helpers[1],
                                        "description": "job two"})
    assert over.is_error and over.json["error"] == "allowance_exceeded"
    assert over.json["remaining_usd"] == 0.5 and over.json["allowance_usd"] == 2
    assert len(engine.list_escrows()) == escrows and len(rec.records) == records and money(engine) == before
    # Paying out does not free the allowance; a refund does.
    assert tools.call("release_escrow", {"escrow_id": first.json["escrow_id"]}).json["status"] == "released"
    assert tools.call("create_escrow", {"amount_usd": 0.6, "counterparty_agent_id": helpers[1],
                                        "description": "job two"}).json["error"] == "allowance_exceeded"
    assert not tools.call("create_escrow", {"amount_usd": 0.5, "counterparty_agent_id": helpers[1],
                                            "description": "job two"}).is_error


@pytest.mark.parametrize("over_http", [False, True], ids=["in-process", "streamable-http"])
def test_step_end_releases_what_is_marked_done_and_refunds_the_rest_exactly(funded, over_http):
    engine, boss, (one, two) = funded
    rec = Recorded()
    served = Served(engine) if over_http else None
    try:
        url = served.__enter__().url if served else None
        tools = toolkit(engine, boss["api_key"], rec, url=url)
        before = money(engine)
        a = tools.call("create_escrow", {"amount_usd": 1.25, "counterparty_agent_id": one, "description": "job a"})
        b = tools.call("create_escrow", {"amount_usd": 0.75, "counterparty_agent_id": two, "description": "job b"})
        assert money(engine)["agents"][boss["agent_id"]] == (before["agents"][boss["agent_id"]][0] - 2, D(2))
        assert tools.call("mark_complete", {"escrow_id": a.json["escrow_id"]}).json["marked_done"] is True
        with tools:
            pass
    finally:
        if served:
            served.__exit__()
    after = money(engine)
    assert after["agents"][boss["agent_id"]] == (before["agents"][boss["agent_id"]][0] - D("1.25"), D(0))
    assert after["agents"][one] == (D("1.2375"), D(0)) and after["agents"][two] == (D(0), D(0))
    assert after["house"] == before["house"] + D("0.0125")
    by_id = {e["escrow_id"]: e for e in tools.entries()}
    assert by_id[a.json["escrow_id"]]["status"] == "released" and by_id[a.json["escrow_id"]]["net_usdc"] == "1.237500"
    assert by_id[b.json["escrow_id"]]["status"] == "refunded"
    assert {e["ref"] for e in tools.entries()} == {"F/1/hire/2/agent/1", "F/1/hire/2/agent/2"}
    assert all(e["shard"].startswith("hire/agent/") for e in tools.entries())
    assert tools.call("create_escrow", {"amount_usd": 1, "counterparty_agent_id": one,
                                        "description": "late"}).json["error"] == "settled"
    engine.check_invariant()


def test_a_failed_step_gives_back_everything_and_the_next_attempt_takes_over_leftovers(funded):
    engine, boss, (one, two) = funded
    rec = Recorded()
    start = money(engine)
    with pytest.raises(RuntimeError):
        with toolkit(engine, boss["api_key"], rec) as tools:
            a = tools.call("create_escrow", {"amount_usd": 1, "counterparty_agent_id": one, "description": "a"})
            tools.call("mark_complete", {"escrow_id": a.json["escrow_id"]})
            raise RuntimeError("agent crashed")
    assert money(engine) == start
    # An attempt killed with an escrow open: the next attempt finds it in the records and gives it back.
    killed = toolkit(engine, boss["api_key"], rec, attempt=1)
    killed.call("create_escrow", {"amount_usd": 1, "counterparty_agent_id": two, "description": "b"})
    assert money(engine) != start
    nxt = toolkit(engine, boss["api_key"], rec, attempt=2)
    assert money(engine) == start
    assert [e["ref"] for e in nxt.entries()] == ["F/1/hire/2/agent/1", "F/1/hire/2/agent/2"]
    assert nxt.call("create_escrow", {"amount_usd": 1, "counterparty_agent_id": two,
                                      "description": "c"}).json["description"].endswith("/agent/3]")


# ---------------------------------------------------------------------------------------
# Real Metaflow runs: ledger, card data and reconcile see the agent's escrows


def test_agent_hiring_flow_ledger_shows_both_hires_one_paid_one_refunded(tmp_path):
    ws = Workspace(tmp_path)
    run = ws.run_flow("agent_hiring.py")
    assert run.returncode == 0, run.output
    assert "allowance_exceeded" in run.output
    entries = ws.ledger(run.pathspec)["entries"]
    agents = [e for e in entries if "/agent/" in e["ref"]]
    assert [(e["shard"], e["status"]) for e in agents] == [("hire/agent/1", "released"),
                                                           ("hire/agent/2", "refunded")]
    own = [e for e in entries if e["step"] == "hire" and "/agent/" not in e["ref"]]
    assert [e["status"] for e in own] == ["released"]
    assert all(e["task"] == own[0]["task"] and e["attempt"] == 0 for e in agents)
    # The artifact the card is drawn from holds them too.
    artifact = ws.client_run(run.pathspec)["end"].task.data.pf_ledger
    assert {e["ref"] for e in artifact} == {e["ref"] for e in entries}
    balances = ws.balances()["agents"]
    translator, summarizer = agents[0]["recipient"], agents[1]["recipient"]
    assert balances[translator]["usdc"] == D("1.485") and balances[summarizer]["usdc"] == D(0)
    assert balances[PAYER]["locked"] == D(0)
    rec = ws.cli("reconcile", run.pathspec)
    assert rec.returncode == 0 and "nothing to do" in rec.stdout + rec.stderr, rec.stdout + rec.stderr


KILLED_FLOW = textwrap.dedent('''
    import os, signal
    from metaflow import FlowSpec, step
    from pf_metaflow import pf_escrow_step


    class KilledHireFlow(FlowSpec):
        @step
        def start(self):
            self.next(self.hire)

        @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.00")
        @step
        def hire(self):
            from pf_metaflow.mcp import agent_escrow_tools

            tools = agent_escrow_tools(self, allowance_usdc="2.00")
            for amount in (1.25, 0.5):
                result = tools.call("create_escrow", {"amount_usd": amount, "description": "sub-task",
                                                      "counterparty_agent_id": "ag_sandbox_worker"})
                assert not result.is_error, result.text
            os.kill(os.getpid(), signal.SIGKILL)
            self.next(self.end)

        @step
        def end(self):
            pass


    if __name__ == "__main__":
        KilledHireFlow()
''')


def test_a_killed_steps_mcp_escrows_are_settled_by_reconcile(tmp_path):
    ws = Workspace(tmp_path)
    flow = write_flow(tmp_path, "killed_hire.py", KILLED_FLOW)
    run = ws.run_flow(flow)
    assert run.returncode != 0
    before = ws.ledger(run.pathspec)["entries"]
    assert sorted((e["amount_usdc"], e["status"]) for e in before) == [
        ("0.500000", "locked"), ("1.000000", "locked"), ("1.250000", "locked")]
    assert ws.balances()["agents"][PAYER]["locked"] == D("2.75")
    rec = ws.cli("reconcile", run.pathspec)
    assert rec.returncode == 0, rec.stdout + rec.stderr
    after = ws.ledger(run.pathspec)["entries"]
    assert {e["status"] for e in after} == {"refunded"} and len(after) == 3
    assert {e["settled_by"] for e in after} == {"reconcile"}
    money_now = ws.balances()
    assert money_now["agents"][PAYER]["locked"] == D(0) and money_now["agents"][WORKER]["usdc"] == D(0)
    assert money_now["house_fees"] == D(0)
    assert "nothing to do" in (ws.cli("reconcile", run.pathspec).stdout + ws.cli("reconcile", run.pathspec).stderr)
