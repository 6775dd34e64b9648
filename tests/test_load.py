"""Load: ``flows/batch_shards.py`` with 500 shards through the HTTP sandbox, 16 at a time.

Every shard must lock, run and be paid: 500 escrows released, exactly the budget
spent, no task failed, no "database is locked" anywhere, no 5xx from the server.
Then the same against a server that limits creates: the run must still finish
with every shard paid, the clients pacing themselves by ``Retry-After``.

The server is the sandbox's own ``serve()`` (what ``pf-metaflow sandbox serve`` runs)
with a middleware that counts answers by operation and status, so the test knows
how many creates were turned away with 429 (the limit must really have bitten).

Slow (minutes each): run with ``pytest -m slow``.
"""

from __future__ import annotations

import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
import requests
from conftest import running_sandbox_server
from mfrun import FLOWS, Workspace

SHARDS = 500
BUDGET = Decimal("100")  # 0.20 USDC per shard
WORKERS = "16"
# Creates per window when limited. The example in the issue is 20 per 2 s; a small
# machine running 16 Metaflow tasks at once makes fewer than 10 creates a second, so
# that limit would never bite there. 20 per 10 s does on any machine (2 creates/s),
# and still lets all 16 workers through at each window's start.
CREATE_RATE = (20, 10)

_SERVER = '''
import collections, json, sys, threading
from pf_metaflow.sandbox.server import serve

counts = collections.Counter()
lock = threading.Lock()


def operation(path):
    parts = path.strip("/").split("/")
    return parts[1] if parts[0] == "escrow" and len(parts) > 1 else parts[0]


def wrap(app):
    def counted(environ, start_response):
        if environ.get("PATH_INFO") == "/_load/answers":
            with lock:
                body = json.dumps(dict(counts)).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]

        def start(status, headers, exc_info=None):
            with lock:
                counts[operation(environ.get("PATH_INFO", "")) + " " + status.split()[0]] += 1
            return start_response(status, headers, exc_info)

        return app(environ, start)
    return counted


db, rate = sys.argv[1], sys.argv[2]
create_rate = None if rate == "none" else (int(rate.split("/")[0]), float(rate.split("/")[1]))
serve("127.0.0.1", 0, db, create_rate=create_rate, wrap=wrap)
'''


def start_server(db: Path, rate: str):
    return running_sandbox_server(db, command=[sys.executable, "-c", _SERVER, str(db), rate])


def run_batch(tmp: Path, url: str):
    tmp.mkdir(parents=True, exist_ok=True)
    ws = Workspace(tmp, {"PF_ESCROW_URL": url, "PF_API_KEY": "pf_sandbox_payer_key"})
    started = time.monotonic()
    run = ws.run_flow(FLOWS / "batch_shards.py", "--num_shards", str(SHARDS),
                      "--total_budget_usdc", str(BUDGET), "--rows_per_shard", "20",
                      "--max-workers", WORKERS, "--max-num-splits", "1000", timeout=3600)
    return ws, run, time.monotonic() - started


def assert_every_shard_paid(ws: Workspace, run, db: Path, answers: dict) -> None:
    assert run.returncode == 0, run.output[-5000:]
    output = run.output.lower()
    assert "database is locked" not in output and "database is busy" not in output
    assert "task failed" not in output, "a task failed (even if @catch kept the run going)"
    assert f"{SHARDS} of {SHARDS} shards scored" in run.output
    assert not any(key.split()[1].startswith("5") for key in answers), answers

    from pf_metaflow.sandbox.engine import SandboxEngine

    engine = SandboxEngine(db)
    escrows = engine.list_escrows()
    assert len(escrows) == SHARDS and {e["status"] for e in escrows} == {"released"}
    balances = engine.balances()
    assert balances["agents"]["ag_sandbox_payer"]["locked"] == 0
    assert balances["agents"]["ag_sandbox_worker"]["usdc"] == BUDGET * Decimal("0.99")
    engine.check_invariant()

    data = ws.client_run(run.pathspec).data
    shards = [e for e in data.pf_ledger if e["step"] == "score"]
    assert len(shards) == SHARDS and {e["status"] for e in shards} == {"released"}
    assert sum(Decimal(e["amount_usdc"]) for e in shards) == BUDGET
    assert data.paid_shards == list(range(SHARDS))


@pytest.mark.slow
def test_500_shards_through_the_http_sandbox_all_settle(tmp_path: Path):
    with start_server(tmp_path / "sandbox" / "escrow.db", "none") as server:
        ws, run, seconds = run_batch(tmp_path / "run", server.url)
        answers = requests.get(server.url + "/_load/answers", timeout=10).json()
    print(f"\n{SHARDS} shards, {WORKERS} workers, unlimited: {seconds:.1f} s; answers {answers}")
    assert answers.get("create 201") == SHARDS and answers.get("release 200") == SHARDS
    assert_every_shard_paid(ws, run, server.db, answers)


@pytest.mark.slow
def test_500_shards_against_a_create_rate_limit_finish_by_honouring_retry_after(tmp_path: Path):
    count, seconds_per_window = CREATE_RATE
    rate = f"{count}/{seconds_per_window}"
    with start_server(tmp_path / "sandbox" / "escrow.db", rate) as server:
        ws, run, seconds = run_batch(tmp_path / "run", server.url)
        answers = requests.get(server.url + "/_load/answers", timeout=10).json()
    print(f"\n{SHARDS} shards, {WORKERS} workers, creates limited to {rate} s: {seconds:.1f} s; "
          f"answers {answers}")
    assert answers.get("create 429", 0) > 0, "the rate limit never bit: nothing was paced"
    assert answers.get("create 201") == SHARDS
    # Paced, not bursting: no faster than the limit allows (the first window is free).
    assert seconds >= (SHARDS / count - 1) * seconds_per_window
    assert_every_shard_paid(ws, run, server.db, answers)
