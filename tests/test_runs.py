"""Reading a run sees every paid task or says it cannot; reconcile acts only on tasks that ended.

Real Metaflow runs against the embedded sandbox (one per test directory). Money is
read from the sandbox's balances, never from our own ledger's word for it.

Orchestrator-style runs are driven the way metaflow-dagster and Argo drive Metaflow:
``flow.py init --run-id R --task-id ID`` for the parameters task, then one
``flow.py step NAME --run-id R --task-id ID --input-paths ...`` process per task, with
task ids the orchestrator chose (plain integers here, which Metaflow's local metadata
does not register, so its client never lists those tasks).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from mfrun import Workspace

TESTFLOWS = Path(__file__).parent / "flows"
ORCHESTRATED = TESTFLOWS / "runs_orchestrated.py"
KILL_FLOW = TESTFLOWS / "kill_flow.py"
MINTED = Decimal("1000000")
PAYER, WORKER = "ag_sandbox_payer", "ag_sandbox_worker"
FEE = Decimal("0.01")  # Purple Flea's release commission
PAYER_KEY = "pf_sandbox_payer_key"  # the built-in payer's documented sandbox key

EXIT_SETTLED, EXIT_OPEN, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3
ALL_CLEAR = ("every escrow is settled", "nothing to do", "every escrow of the run is settled")


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def payer(ws: Workspace) -> dict:
    return ws.balances()["agents"].get(PAYER, {"usdc": MINTED, "locked": Decimal(0)})


def worker_usdc(ws: Workspace) -> Decimal:
    return ws.balances()["agents"].get(WORKER, {"usdc": Decimal(0)})["usdc"]


def paid_to_worker(*amounts: str) -> Decimal:
    """What the worker receives for releases of ``amounts`` (1% commission each)."""
    return sum((Decimal(a) * (1 - FEE) for a in amounts), Decimal(0))


class Orchestrator:
    """Runs a flow task by task, choosing the task ids, as an orchestrator does."""

    def __init__(self, ws: Workspace, flow: Path, run_id: str) -> None:
        self.ws, self.flow, self.run_id = ws, flow, run_id
        (ws.path / ".metaflow").mkdir(exist_ok=True)

    def _top(self) -> list[str]:
        return [sys.executable, str(self.flow), "--no-pylint", "--quiet", "--metadata", "local",
                "--datastore", "local", "--datastore-root", str(self.ws.path / ".metaflow"),
                "--environment", "local", "--event-logger", "nullSidecarLogger",
                "--monitor", "nullSidecarMonitor"]

    def _run(self, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self._top() + args, cwd=self.ws.path, env={**self.ws.env, **(env or {})},
                              capture_output=True, text=True, timeout=300)

    def init(self, task_id: str, **parameters: object) -> str:
        # Orchestrators pass parameter values to `init` as METAFLOW_INIT_<NAME>.
        env = {f"METAFLOW_INIT_{k.upper()}": str(v) for k, v in parameters.items()}
        done = self._run(["init", "--run-id", self.run_id, "--task-id", task_id], env)
        assert done.returncode == 0, done.stdout + done.stderr
        return f"{self.run_id}/_parameters/{task_id}"

    def step(self, name: str, task_id: str, input_paths: str, *,
             split_index: int | None = None) -> subprocess.CompletedProcess:
        args = ["step", name, "--run-id", self.run_id, "--task-id", task_id, "--input-paths", input_paths,
                "--retry-count", "0", "--max-user-code-retries", "0"]
        if split_index is not None:
            args += ["--split-index", str(split_index)]
        return self._run(args)


def orchestrate_with_a_killed_shard(ws: Workspace, run_id: str) -> str:
    """start (paid 0.25) -> work[0..2] (paid 1.00 each; work[1] SIGKILLed once its escrow is
    locked, so the orchestrator stops there: join and end never run). Every task id is an
    integer. Returns the run's pathspec."""
    o = Orchestrator(ws, ORCHESTRATED, run_id)
    params = o.init("1", kill_item=1)
    start = o.step("start", "1", params)
    assert start.returncode == 0, start.stdout + start.stderr
    for index in range(3):
        shard = o.step("work", str(2 + index), f"{run_id}/start/1", split_index=index)
        expected = -9 if index == 1 else 0
        assert shard.returncode == expected, shard.stdout + shard.stderr
    return f"RunsOrchestratedFlow/{run_id}"


def by_task(ledger: dict) -> dict[str, dict]:
    return {f"{e['step']}/{e['task']}": e for e in ledger["entries"]}


# -- (a) orchestrator-style task ids ---------------------------------------------------------


# Slow for the named run: the default tier orchestrates named runs in the tests below.
@pytest.mark.parametrize("run_id", [pytest.param("orch-" + uuid.uuid4().hex[:10], marks=pytest.mark.slow),
                                    "424242"], ids=["named-run", "integer-run"])
def test_run_with_integer_task_ids_is_read_whole_and_its_killed_shard_reconciled(ws, run_id):
    pathspec = orchestrate_with_a_killed_shard(ws, run_id)

    # Metaflow's client lists none of these tasks: local metadata registers no integer task id
    # (nor an integer run id at all).
    from metaflow.exception import MetaflowNotFound

    try:
        listed = [t.pathspec for step in ws.client_run(pathspec) for t in step]
    except MetaflowNotFound:
        listed = []
    assert listed == []

    ledger = ws.ledger(pathspec)
    assert ledger["complete"] is True and ledger["unseen"] == []
    assert {k: (e["amount_usdc"], e["status"]) for k, e in by_task(ledger).items()} == {
        "start/1": ("0.250000", "released"),
        "work/2": ("1.000000", "released"),
        "work/3": ("1.000000", "locked"),
        "work/4": ("1.000000", "released"),
    }
    assert {e["shard"] for e in ledger["entries"] if e["step"] == "work"} == {"work[0]", "work[1]", "work[2]"}
    from pf_metaflow import ledger_of

    assert ledger_of(pathspec) == ledger["entries"]
    assert payer(ws) == {"usdc": MINTED - Decimal("3.25"), "locked": Decimal("1.00")}

    done = ws.cli("reconcile", pathspec)
    assert done.returncode == EXIT_SETTLED, done.stdout + done.stderr
    killed = by_task(ledger)["work/3"]
    assert f"{killed['escrow_id']} (work/3 attempt 0, 1.000000 USDC) locked -> refunded" in done.stdout
    # The client alone would not have found these tasks: the output says where they were read.
    [read_from] = [line for line in done.stdout.splitlines() if line.startswith(f"Read from: {pathspec}: ")]
    assert "local metadata" in read_from and "its directory" in read_from, read_from
    assert ws.engine().get(killed["escrow_id"])["status"] == "refunded"
    assert payer(ws) == {"usdc": MINTED - Decimal("2.25"), "locked": Decimal(0)}
    assert worker_usdc(ws) == paid_to_worker("0.25", "1.00", "1.00")
    assert by_task(ws.ledger(pathspec))["work/3"]["status"] == "refunded"

    again = ws.cli("reconcile", pathspec)
    assert again.returncode == EXIT_SETTLED and "every escrow is settled; nothing to do" in again.stdout
    assert payer(ws)["usdc"] == MINTED - Decimal("2.25")
    ws.engine().check_invariant()


# -- (b) a task that is still running ----------------------------------------------------------


def start_in_background(ws: Workspace, *args: str) -> tuple[subprocess.Popen, Path]:
    """Run the flow in the background; a held shard waits until ``finish`` lets it go."""
    run_id_file = ws.path / f".bg-run-id-{uuid.uuid4().hex[:6]}"
    hold = ws.path / ".bg-hold"
    hold.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(ORCHESTRATED), "--no-pylint", "run", "--run-id-file", str(run_id_file),
         "--hold_file", str(hold), *args],
        cwd=ws.path, env=ws.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    return proc, run_id_file


def wait_until_locked(ws: Workspace, proc: subprocess.Popen, amount: Decimal, timeout: float = 120) -> None:
    """Until the payer has ``amount`` locked and nothing else is being created or settled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ws.db.exists():
            escrows = ws.engine().list_escrows()
            funded = [e for e in escrows if e["status"] == "funded"]
            if len(escrows) == 4 and [e["amount_usd"] for e in funded] == [amount]:
                return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.3)
    raise AssertionError("the sleeping shard never locked its escrow")


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    Path(proc.args[proc.args.index("--hold_file") + 1]).touch()  # let a held shard go on
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_reconcile_skips_a_task_that_is_still_running_and_moves_no_money(ws):
    proc, run_id_file = start_in_background(ws, "--sleep_item", "0", "--sleep_seconds", "120")
    try:
        wait_until_locked(ws, proc, Decimal("1.000000"))
        pathspec = f"RunsOrchestratedFlow/{run_id_file.read_text().strip()}"
        before = ws.balances()

        skipped = ws.cli("reconcile", pathspec)
        assert skipped.returncode == EXIT_OPEN, skipped.stdout + skipped.stderr
        [line] = [x for x in skipped.stdout.splitlines() if "skipped" in x and "work/" in x]
        assert "its task may still be running (attempt 0 is running (lease until 20" in line
        assert "or use --force" in line
        assert "1 still need attention" in skipped.stdout
        assert not any(clear in skipped.stdout for clear in ALL_CLEAR)
        assert ws.balances() == before  # nothing moved
        assert payer(ws)["locked"] == Decimal("1.00")
    finally:
        code, out = finish(proc)
    assert code == 0, out  # the task finished and paid its agent: reconcile took nothing from it

    ledger = ws.ledger(pathspec)
    assert {e["status"] for e in ledger["entries"]} == {"released"} and len(ledger["entries"]) == 4
    assert payer(ws) == {"usdc": MINTED - Decimal("3.25"), "locked": Decimal(0)}
    assert worker_usdc(ws) == paid_to_worker("0.25", "1.00", "1.00", "1.00")
    after = ws.cli("reconcile", pathspec)
    assert after.returncode == EXIT_SETTLED and "nothing to do" in after.stdout
    ws.engine().check_invariant()


def test_reconcile_force_settles_the_escrow_of_a_task_that_may_still_be_running(ws):
    proc, run_id_file = start_in_background(ws, "--sleep_item", "0", "--sleep_seconds", "120")
    try:
        wait_until_locked(ws, proc, Decimal("1.000000"))
        pathspec = f"RunsOrchestratedFlow/{run_id_file.read_text().strip()}"
        forced = ws.cli("reconcile", pathspec, "--force")
        assert forced.returncode == EXIT_SETTLED, forced.stdout + forced.stderr
        assert "locked -> refunded: reconciled with --force while its task may still be running" in forced.stdout
        assert payer(ws) == {"usdc": MINTED - Decimal("2.25"), "locked": Decimal(0)}
    finally:
        code, out = finish(proc)
    # The step then finds its escrow refunded: it fails rather than succeed with its agent unpaid.
    assert code != 0, out
    [entry] = [e for e in ws.ledger(pathspec)["entries"] if e.get("shard") == "work[0]"]
    assert entry["status"] == "refunded"
    assert payer(ws) == {"usdc": MINTED - Decimal("2.25"), "locked": Decimal(0)}
    assert worker_usdc(ws) == paid_to_worker("0.25", "1.00", "1.00")
    ws.engine().check_invariant()


# -- (c) FLOW alone is the user's own latest run ------------------------------------------------


def test_reconcile_of_a_flow_name_acts_on_the_users_latest_run_not_another_users_newer_one(ws):
    alice = ws.run_flow(KILL_FLOW, env={"METAFLOW_USER": "alice"})
    bob = ws.run_flow(KILL_FLOW, env={"METAFLOW_USER": "bob"})  # newer, and someone else's
    assert alice.returncode != 0 and bob.returncode != 0
    assert payer(ws)["locked"] == Decimal("5.00")
    alice_escrow = ws.ledger(alice.pathspec)["entries"][0]["escrow_id"]
    bob_escrow = ws.ledger(bob.pathspec)["entries"][0]["escrow_id"]

    mine = ws.cli("reconcile", "KillFlow", env={"METAFLOW_USER": "alice"})
    assert mine.returncode == EXIT_SETTLED, mine.stdout + mine.stderr
    assert alice.pathspec in mine.stdout and bob.pathspec not in mine.stdout
    assert ws.engine().get(alice_escrow)["status"] == "refunded"
    assert ws.engine().get(bob_escrow)["status"] == "funded"
    assert payer(ws)["locked"] == Decimal("2.50")

    ledger = ws.cli("ledger", "KillFlow", "--json", env={"METAFLOW_USER": "bob"})
    assert bob.pathspec in ledger.stdout and alice.pathspec not in ledger.stdout

    nobody = ws.cli("reconcile", "KillFlow", env={"METAFLOW_USER": "carol"})
    assert nobody.returncode == EXIT_USAGE
    assert "has no runs in namespace 'user:carol'" in nobody.stderr and "KillFlow/RUN_ID" in nobody.stderr
    assert payer(ws)["locked"] == Decimal("2.50")

    # A pathspec names one run, whoever started it.
    theirs = ws.cli("reconcile", bob.pathspec, env={"METAFLOW_USER": "alice"})
    assert theirs.returncode == EXIT_SETTLED and bob_escrow in theirs.stdout
    assert payer(ws) == {"usdc": MINTED, "locked": Decimal(0)}
    ws.engine().check_invariant()


# -- (d) reading that cannot prove it saw everything -------------------------------------------


def _hide_task_elsewhere(ws: Workspace, pathspec: str, task: str) -> None:
    """As if the task ran where this reader cannot see (another machine's metadata root)."""
    flow, run_id = pathspec.split("/")
    shutil.move(str(ws.path / ".metaflow" / flow / run_id / task), str(ws.path / "elsewhere"))


def _spoil_task_metadata(ws: Workspace, pathspec: str, task: str) -> None:
    flow, run_id = pathspec.split("/")
    (ws.path / ".metaflow" / flow / run_id / task / "_meta" / "sysmeta_zz_1.json").write_text("{half a rec")


def _lose_task_records(ws: Workspace, pathspec: str, task: str) -> None:
    """As if the task ran on remote compute whose metadata never came back here: what its own
    process recorded is gone, what was registered for it before it started is left."""
    flow, run_id = pathspec.split("/")
    meta = ws.path / ".metaflow" / flow / run_id / task / "_meta"
    for pattern in ("sysmeta_pf_*", "sysmeta_attempt*", "sysmeta_ds-*", "sysmeta_foreach-*", "sysmeta_origin-*"):
        for record in meta.glob(pattern):
            record.unlink()
    assert any(meta.glob("sysmeta_*"))


@pytest.mark.parametrize("hide, unseen", [
    (_hide_task_elsewhere, "/work: 3 task(s) of this paid step were due (start/1 recorded 3 foreach "
                           "split(s)), but 2 can be seen here"),
    pytest.param(_spoil_task_metadata, "/work/3: its metadata could not be read (JSONDecodeError",
                 marks=pytest.mark.slow),
    pytest.param(_lose_task_records, "/work/3: a task of a paid step with no escrow record, no recorded outcome "
                 "and no record of its own process here", marks=pytest.mark.slow),
], ids=["task-not-visible", "metadata-unreadable", "records-not-here"])
def test_reading_that_cannot_see_a_paid_task_never_gives_the_all_clear(ws, hide, unseen):
    pathspec = orchestrate_with_a_killed_shard(ws, "orch-" + uuid.uuid4().hex[:10])
    hide(ws, pathspec, "work/3")  # the killed shard, its 1.00 USDC still locked

    done = ws.cli("reconcile", pathspec)
    assert done.returncode == EXIT_INCOMPLETE, done.stdout + done.stderr
    assert not any(clear in done.stdout for clear in ALL_CLEAR)
    assert f"could not prove every paid task of {pathspec} was seen" in done.stdout
    assert pathspec + unseen in done.stdout
    assert "NOT settled" in done.stdout
    assert payer(ws)["locked"] == Decimal("1.00")  # still there, and reconcile said so

    ledger = ws.cli("ledger", pathspec, "--json")
    assert ledger.returncode == 0
    data = json.loads(ledger.stdout)
    assert data["complete"] is False and any(pathspec + unseen in u for u in data["unseen"])
    assert "WARNING: could not prove every paid task" in ledger.stderr
    table = ws.cli("ledger", pathspec)
    assert "WARNING: could not prove every paid task" in table.stdout and unseen in table.stdout


def test_a_complete_reading_after_the_hidden_task_reappears_settles_it(ws):
    pathspec = orchestrate_with_a_killed_shard(ws, "orch-" + uuid.uuid4().hex[:10])
    _hide_task_elsewhere(ws, pathspec, "work/3")
    assert ws.cli("reconcile", pathspec).returncode == EXIT_INCOMPLETE
    flow, run_id = pathspec.split("/")
    shutil.move(str(ws.path / "elsewhere"), str(ws.path / ".metaflow" / flow / run_id / "work" / "3"))

    done = ws.cli("reconcile", pathspec)
    assert done.returncode == EXIT_SETTLED, done.stdout + done.stderr
    assert "locked -> refunded" in done.stdout
    assert payer(ws) == {"usdc": MINTED - Decimal("2.25"), "locked": Decimal(0)}


def test_a_later_step_that_ran_proves_a_paid_task_this_reader_cannot_see(ws):
    run = ws.run_flow(TESTFLOWS / "pay_flow.py")
    assert run.returncode == 0, run.output
    flow, run_id = run.pathspec.split("/")
    [task_dir] = [d for d in (ws.path / ".metaflow" / flow / run_id / "work").iterdir() if d.name != "_meta"]
    shutil.move(str(task_dir), str(ws.path / "elsewhere"))

    done = ws.cli("reconcile", run.pathspec)
    assert done.returncode == EXIT_INCOMPLETE, done.stdout + done.stderr
    assert f"{run.pathspec}/work: 1 task(s) of this paid step were due (1 task(s) of end, which only work " \
           "leads to, ran), but 0 can be seen here" in done.stdout
    assert not any(clear in done.stdout for clear in ALL_CLEAR)


def test_a_failed_foreach_whose_other_shards_never_started_is_complete(ws):
    """Metaflow's runtime registers each task before starting it: shards it never started
    (the run stopped at the first failure, one worker at a time) locked nothing."""
    run = ws.run_flow(TESTFLOWS / "plain_fanout.py", "--fail_item", "1", "--max-workers", "1",
                      "--with", "pf_escrow_step:agent_wallet=ag_sandbox_worker,amount_usdc=0.5,steps=work")
    assert run.returncode != 0
    ledger = ws.ledger(run.pathspec)
    assert ledger["complete"] is True, ledger["unseen"]
    assert [(e["shard"], e["status"]) for e in ledger["entries"]] == [("work[0]", "refunded")]
    done = ws.cli("reconcile", run.pathspec)
    assert done.returncode == EXIT_SETTLED and "every escrow is settled; nothing to do" in done.stdout
    assert payer(ws) == {"usdc": MINTED, "locked": Decimal(0)}


# -- exit codes ----------------------------------------------------------------------------------


def test_reconcile_help_documents_its_exit_codes(ws):
    helped = ws.cli("reconcile", "--help")
    assert helped.returncode == 0
    text = " ".join(helped.stdout.split())
    assert "0 every escrow of the run was seen and is settled" in text
    assert "1 escrows are still held" in text
    assert "2 usage error, unknown flow or run" in text
    assert "3 reading the run could not prove it saw every paid task" in text
    assert "--force" in text


def test_dry_run_with_an_escrow_still_held_exits_1_and_moves_nothing(ws):
    run = ws.run_flow(KILL_FLOW)
    dry = ws.cli("reconcile", run.pathspec, "--dry-run")
    assert dry.returncode == EXIT_OPEN and "would settle 1 escrow(s)" in dry.stdout
    assert payer(ws)["locked"] == Decimal("2.50")


def test_refund_pending_counts_as_settled_and_is_reported(ws, start_sandbox_server):
    server = start_sandbox_server(ws.path / "live-like" / "escrow.db", "--no-refund", "--no-idempotency")
    env = {"PF_ESCROW_URL": server.url, "PF_API_KEY": PAYER_KEY}
    run = ws.run_flow(KILL_FLOW, env=env)
    assert run.returncode != 0

    done = ws.cli("reconcile", run.pathspec, env=env)
    assert done.returncode == EXIT_SETTLED, done.stdout + done.stderr
    assert "locked -> refund_pending" in done.stdout
    assert "2.500000 USDC refund_pending" in done.stdout
    [entry] = ws.ledger(run.pathspec)["entries"]
    assert entry["status"] == "refund_pending" and entry["expected_at"]

    from pf_metaflow.sandbox.engine import SandboxEngine

    # Still held by the service until its timeout: reported, not hidden.
    escrow = SandboxEngine(server.db).get(entry["escrow_id"])
    assert escrow["status"] == "funded" and escrow["amount_usd"] == Decimal("2.5")
    again = ws.cli("reconcile", run.pathspec, env=env)
    assert again.returncode == EXIT_SETTLED
    assert "still refund_pending" in again.stdout and "2.500000 USDC refund_pending" in again.stdout


def test_an_unknown_run_is_a_usage_error(ws):
    missing = ws.cli("reconcile", "RunsOrchestratedFlow/999")
    assert missing.returncode == EXIT_USAGE and "does not exist" in missing.stderr

