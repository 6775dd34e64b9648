"""Rate limits end to end (issue 10, items 4 and 5): an unpaid task is loud, a release waits.

- A create that never took effect (the service refused it, or the rate limit stayed full
  past ``PF_ESCROW_MAX_WAIT``) is kept in the ledger as ``not_created`` with the reason: not
  money moved, nothing for ``reconcile`` to settle, superseded when a later attempt of the
  same task does lock an escrow.
- A release meeting 429 (live's, without ``Retry-After``; or the sandbox's, with it) waits
  and retries; one that gives up leaves its escrow ``locked`` (the work was done: never
  refunded by the failing task), and ``reconcile`` settles it later.
- Real Metaflow runs of ``flows/batch_shards.py`` against ``pf-metaflow sandbox serve
  --live``: shards over the wait bound end unpaid, named in the summary, the run exits
  non-zero; 24 shards at 5 creates per 6 s are all paid (slow).

Money is read back from the sandbox (``/sandbox/balances``, ``/escrow/stats``). Every
request goes to 127.0.0.1; windows are seconds long; every loop is bounded.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest
import requests
from mfrun import Workspace, write_flow

from pf_metaflow import ledger as ledger_mod
from pf_metaflow import settle
from pf_metaflow.client import EscrowClient
from pf_metaflow.errors import RateLimited
from pf_metaflow.sandbox.engine import PAYER_KEY, WORKER_KEY, SandboxEngine
from pf_metaflow.task_escrow import TaskEscrow

D = Decimal
PAYER, WORKER = "ag_sandbox_payer", "ag_sandbox_worker"
MINTED = D("1000000")
MICRO = D("0.000001")
TIMEOUT = 10


def fee(amount: Decimal) -> Decimal:
    return (amount / 100).quantize(MICRO)


@pytest.fixture
def serve(start_sandbox_server, tmp_path):
    """``serve(*flags)``: a ``pf-metaflow sandbox serve FLAGS`` subprocess on its own database."""
    count = iter(range(100))

    def start(*flags: str):
        return start_sandbox_server(tmp_path / f"sb{next(count)}" / "escrow.db", *flags)

    return start


def balances(server) -> dict:
    data = requests.get(f"{server.url}/sandbox/balances", timeout=TIMEOUT).json()
    agents = {a: {k: D(v) for k, v in b.items()} for a, b in data["agents"].items()}
    return {"agents": agents, "house_fees": D(data["house_fees"]), "minted": D(data["minted"])}


def escrows_created(server) -> int:
    return requests.get(f"{server.url}/escrow/stats", timeout=TIMEOUT).json()["total_created"]


def intent(ref: str = "F/1/work/2", amount: str = "1.000000", **over) -> dict:
    entry = ledger_mod.new_entry(ref=ref, run="F/1", step="work", task=ref.split("/")[3], attempt=0,
                                 recipient=WORKER, amount_usdc=D(amount), description=f"pf-metaflow {ref} work")
    entry.update(over)
    return entry


def burn_release_path(server, escrow_id: str) -> None:
    """One request on the escrow's release path by someone else (refused 403, but counted:
    live counts every request), so the creator's release that follows meets the limit."""
    answer = requests.post(f"{server.url}/escrow/release/{escrow_id}", timeout=TIMEOUT,
                           headers={"Authorization": f"Bearer {WORKER_KEY}"})
    assert answer.status_code == 403, answer.text


def counting_client(server, max_wait: float) -> tuple[EscrowClient, list]:
    statuses: list = []
    session = requests.Session()
    session.hooks["response"].append(lambda r, *a, **k: statuses.append(r.status_code))
    return EscrowClient(server.url, PAYER_KEY, max_wait=max_wait, session=session), statuses


# --------------------------------------------------------------------------- unpaid: the ledger


class RefusingFirst:
    """An escrow client whose first ``n`` creates are refused with live's 429 after the wait ran out."""

    def __init__(self, client: EscrowClient, n: int = 1) -> None:
        self._client = client
        self.refusals = n

    def create(self, *args, **kwargs):
        if self.refusals:
            self.refusals -= 1
            raise RateLimited("create escrow: the escrow service's rate limit (20 per 60 s) was still full "
                              "after waiting 2 s; it was not sent: nothing was created and nothing is locked",
                              details={"gave_up": True})
        return self._client.create(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def task_escrow(records: list, client, attempt: int) -> TaskEscrow:
    return TaskEscrow("F/1/work/2", attempt, read=lambda: list(records), write=records.append,
                      client=lambda: client, log=lambda line: None)


def test_a_create_over_the_wait_bound_is_recorded_not_created_with_the_reason_and_locks_nothing(tmp_path):
    engine_client = EscrowClient(f"sandbox:///{tmp_path / 'escrow.db'}")
    records: list = []
    first = task_escrow(records, RefusingFirst(engine_client), attempt=0)
    with pytest.raises(RateLimited):
        first.lock(lambda ref, generation: intent(ref))
    assert first.fail("step failed: PfEscrowRuntimeError", final=True)["status"] == "not_created"
    [entry] = ledger_mod.merge(records)
    assert entry["status"] == "not_created" and entry["escrow_id"] is None
    assert entry["reason"].startswith("no escrow created (rate limited): create escrow: the escrow service's "
                                      "rate limit (20 per 60 s) was still full")
    totals = ledger_mod.totals([entry])
    assert (totals["not_created"], totals["not_created_count"]) == (D("1"), 1)
    assert totals["locked"] == totals["released"] == totals["refunded"] == totals["unknown"] == 0
    assert entry["status"] not in ledger_mod.OPEN_STATUSES  # reconcile: nothing to settle
    engine = SandboxEngine(tmp_path / "escrow.db")
    assert engine.balance(PAYER)["locked"] == 0
    engine.check_invariant()


def test_a_later_attempt_of_an_unpaid_task_creates_its_escrow_under_the_same_entry(tmp_path):
    engine_client = EscrowClient(f"sandbox:///{tmp_path / 'escrow.db'}")
    client = RefusingFirst(engine_client)
    records: list = []
    with pytest.raises(RateLimited):
        task_escrow(records, client, attempt=0).lock(lambda ref, generation: intent(ref))
    second = task_escrow(records, client, attempt=1)
    locked = second.lock(lambda ref, generation: intent(ref, attempt=1))
    assert locked["ref"] == "F/1/work/2" and locked["status"] == "locked"
    second.succeed(True, "")
    [entry] = ledger_mod.merge(records)  # one task, one entry: the not_created record is superseded
    assert (entry["status"], entry["settled_by"], entry["attempt"]) == ("released", 1, 1)
    assert engine_client.balance()["usdc"] == MINTED - D("1")


# --------------------------------------------------------------------------- releases under limits


@pytest.mark.parametrize("flags, retry_after", [
    (("--live", "--release-rate", "1/2"), False),
    (("--release-rate", "1/2"), True),
], ids=["live-no-retry-after", "sandbox-retry-after"])
def test_a_release_meeting_429_waits_for_the_window_and_pays_once(serve, flags, retry_after):
    server = serve(*flags)
    client, statuses = counting_client(server, max_wait=30)
    locked = settle.open_escrow(client, intent(amount="2.000000"))
    burn_release_path(server, locked["escrow_id"])
    records: list = []
    released = settle.release(client, locked, records.append, by=0)
    assert released["status"] == "released" and records[-1] == released
    assert statuses.count(429) == 1 and statuses[-1] == 200
    amount = D("2")
    b = balances(server)
    assert b["agents"][WORKER]["usdc"] == amount - fee(amount)
    assert b["agents"][PAYER] == {"usdc": MINTED - amount, "locked": D(0)}
    assert b["house_fees"] == fee(amount)
    assert D(released["net_usdc"]) == amount - fee(amount)
    again = client.release(locked["escrow_id"])  # safe to repeat: 409 after the success, read back
    assert again.status == "released"
    assert balances(server)["agents"][WORKER]["usdc"] == amount - fee(amount)
    SandboxEngine(server.db).check_invariant()


def test_a_release_that_gives_up_on_429_leaves_its_escrow_locked_for_reconcile(serve):
    server = serve("--live", "--release-rate", "1/30")
    client, _ = counting_client(server, max_wait=1)
    records: list = []
    task = task_escrow(records, client, attempt=0)
    task.lock(lambda ref, generation: intent(ref, amount="1.500000"))
    burn_release_path(server, task.entry["escrow_id"])
    with pytest.raises(settle.ReleaseRateLimited) as caught:
        task.succeed(True, "")
    assert caught.value.entry["status"] == "locked"
    assert "rate limit" in caught.value.message.lower() and "stays locked" in caught.value.message
    after = task.fail("step failed: PfEscrowReleaseError", final=True)  # never refunded by the task
    assert after["status"] == "locked" and "kept locked when the task failed" in after["reason"]
    [entry] = ledger_mod.merge(records)
    assert entry["status"] == "locked" and entry["escrow_id"] == task.entry["escrow_id"]
    assert client.get(entry["escrow_id"]).status == "funded"
    assert balances(server)["agents"][PAYER] == {"usdc": MINTED - D("1.5"), "locked": D("1.5")}
    # What reconcile does with it (on live: refund_pending, the service has no refund call).
    settled = settle.resolve(client, entry, "reconciled", records.append, by="reconcile")
    assert settled["status"] == "refund_pending" and settled["expected_at"]
    SandboxEngine(server.db).check_invariant()


# --------------------------------------------------------------------------- real runs

RELEASE_FLOW = '''
import os

import requests
from metaflow import FlowSpec, catch, step

from pf_metaflow import pf_escrow_step


class RateLimitedReleaseFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @catch(var="work_error", print_exception=False)
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="1.25", label="work")
    @step
    def work(self):
        # Someone else's request on this escrow's release path fills its window first.
        answer = requests.post(os.environ["PF_ESCROW_URL"] + "/escrow/release/" + self.pf_escrows["work"],
                               headers={"Authorization": "Bearer pf_sandbox_worker_key"}, timeout=10)
        assert answer.status_code == 403, answer.text
        self.done = True
        self.next(self.end)

    @step
    def end(self):
        print("work_error:", self.work_error)


if __name__ == "__main__":
    RateLimitedReleaseFlow()
'''


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    path = tmp_path / "run_dir"
    path.mkdir()
    return Workspace(path)


def test_a_finished_task_whose_release_gave_up_stays_locked_until_reconcile_settles_it(serve, ws):
    server = serve("--release-rate", "1/60")  # the sandbox's limiter: 429 with Retry-After 60
    env = {"PF_ESCROW_URL": server.url, "PF_API_KEY": PAYER_KEY, "PF_ESCROW_MAX_WAIT": "2"}
    run = ws.run_flow(write_flow(ws.path, "release_flow.py", RELEASE_FLOW), env=env)
    assert run.returncode == 0, run.output
    [entry] = ws.cli_json("ledger", run.pathspec, env=env)["entries"]
    assert entry["status"] == "locked", entry
    assert "rate limit" in entry["reason"].lower() and "kept locked when the task failed" in entry["reason"]
    assert balances(server)["agents"][PAYER]["locked"] == D("1.25")
    assert "could not pay ag_sandbox_worker" in run.output
    done = ws.cli("reconcile", run.pathspec, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    [entry] = ws.cli_json("ledger", run.pathspec, env=env)["entries"]
    assert (entry["status"], entry["settled_by"]) == ("refunded", "reconcile")
    b = balances(server)
    assert b["agents"][PAYER] == {"usdc": MINTED, "locked": D(0)} and b["house_fees"] == 0
    assert ws.cli("reconcile", run.pathspec, env=env).returncode == 0  # nothing left: a no-op
    SandboxEngine(server.db).check_invariant()


def end_lines(run) -> list[str]:
    return [re.sub(r"^\S+ \S+ \[[^\]]+\] ", "", line) for line in run.stdout.splitlines()
            if "/end/" in line and "Task finished" not in line and "Task is starting" not in line]


def test_shards_over_the_wait_bound_are_recorded_unpaid_and_the_run_says_so(serve, ws):
    server = serve("--live", "--create-rate", "2/60")
    env = {"PF_ESCROW_URL": server.url, "PF_API_KEY": PAYER_KEY, "PF_ESCROW_MAX_WAIT": "3"}
    run = ws.run_flow("batch_shards.py", "--num_shards", "4", "--total_budget_usdc", "5.00",
                      "--max-workers", "4", env=env)
    assert run.returncode != 0, run.output  # paid work went unpaid: not a successful run
    ledger = ws.cli_json("ledger", run.pathspec, env=env)
    by_status: dict = {}
    for e in ledger["entries"]:
        by_status.setdefault(e["status"], []).append(e)
    assert sorted(by_status) == ["not_created", "released"]
    assert len(by_status["released"]) == 2 and len(by_status["not_created"]) == 2
    unpaid = sorted(e["shard"] for e in by_status["not_created"])
    for e in by_status["not_created"]:
        assert e["escrow_id"] is None and e["reason"].startswith("no escrow created (rate limited)")
        assert "PF_ESCROW_MAX_WAIT" in e["reason"] and "nothing is locked" in e["reason"]
    totals = ledger["totals"]
    assert (totals["not_created"], totals["not_created_count"]) == ("2.500000", 2)
    assert (totals["released"], totals["locked"], totals["unknown"]) == ("2.500000", "0.000000", "0.000000")
    # The sandbox agrees: two escrows, both released; nothing locked for the unpaid shards.
    assert escrows_created(server) == 2
    b = balances(server)
    paid, fees = D("2.5"), 2 * fee(D("1.25"))
    assert b["agents"][PAYER] == {"usdc": MINTED - paid, "locked": D(0)}
    assert b["agents"][WORKER]["usdc"] == paid - fees and b["house_fees"] == fees
    SandboxEngine(server.db).check_invariant()
    # The run's end: the summary names the unpaid shards and why; end failed, so the exit did too.
    names = ", ".join(unpaid)
    tail = end_lines(run)
    assert f"RESULT: UNPAID: no escrow could be created for {names}" in tail
    assert any(line.startswith(f"WARNING: paid work went unpaid: 2 tasks ({names}) did not run because no "
                               "escrow could be created for them (the escrow service's rate limit)")
               for line in tail)
    assert sum(line.startswith("UNPAID score[") and "rate limited" in line for line in tail) == 2
    assert "Paid work went unpaid" in run.output and f"2 paid tasks went unpaid ({names})" in run.output
    assert "unpaid shards, no escrow created (2):" in run.stdout
    client_run = ws.client_run(run.pathspec)
    assert not client_run.successful
    end = client_run["end"].task.data
    assert "RESULT: UNPAID" in end.summary and sorted(end.unpaid_shards) == sorted(
        int(s[len("score["):-1]) for s in unpaid)
    # Nothing to reconcile: no escrow was left open.
    done = ws.cli("reconcile", run.pathspec, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    table = ws.cli("ledger", run.pathspec, env=env).stdout
    assert "WARNING: 2 paid tasks went unpaid" in table and "not paid, no escrow created (2 tasks)" in table


@pytest.mark.slow
def test_24_shards_at_5_creates_per_6_s_are_all_paid(serve, ws):
    server = serve("--live", "--create-rate", "5/6")
    env = {"PF_ESCROW_URL": server.url, "PF_API_KEY": PAYER_KEY}
    run = ws.run_flow("batch_shards.py", "--num_shards", "24", "--total_budget_usdc", "24.00",
                      "--rows_per_shard", "50", "--max-workers", "16", env=env, timeout=900)
    assert run.returncode == 0, run.output
    ledger = ws.cli_json("ledger", run.pathspec, env=env)
    assert len(ledger["entries"]) == 24
    assert {e["status"] for e in ledger["entries"]} == {"released"}
    assert ledger["totals"]["released"] == "24.000000" and ledger["totals"]["not_created_count"] == 0
    assert escrows_created(server) == 24
    b = balances(server)
    fees = 24 * fee(D("1"))
    assert b["agents"][PAYER] == {"usdc": MINTED - 24, "locked": D(0)}
    assert b["agents"][WORKER]["usdc"] == 24 - fees and b["house_fees"] == fees
    SandboxEngine(server.db).check_invariant()
    assert end_lines(run)[-1] == "RESULT: OK: all paid work succeeded and was paid"
