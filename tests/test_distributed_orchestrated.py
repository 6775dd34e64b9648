"""An orchestrator-started paid run on the metadata service, S3 and the HTTP sandbox (``distributed`` tier).

Argo Workflows, Step Functions and Dagster do not use ``flow.py run``: they call
``flow.py init --run-id R`` and then one ``flow.py step NAME --run-id R --task-id ID`` process
per task, with ids they choose. ``metaflow-local-service`` 0.2.0 never registers a run under
such an id (Metaflow POSTs ``{"run_number": R}`` to ``/flows/F/run``; the service's
``store.create_run`` ignores it and registers an empty run under a number of its own), so the
Metaflow client cannot open ``Flow/R`` there. Every task's metadata (escrow records included)
is kept under ``R`` all the same, and every task writes its attempt to the datastore before any
decorator runs: ``pf-metaflow ledger`` and ``reconcile`` find the tasks in the datastore and read
their records through the service's task endpoints, and say so.

Task ids: plain integers, as metaflow-dagster gives them (``--task-id 1``). Argo's (``t-1a2b…``)
and Step Functions' (Batch job ids) are not numbers; on metaflow-local-service 0.2.0 such a task
cannot even start in a run it did not register (its ``POST …/task`` answers 500), which the
``argo`` case records as an expected failure of that service rather than of this library.

Money is read from the escrow service's balances and escrow statuses, never from our ledger.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

distributed = pytest.mark.distributed

FLOW_NAME = "OrchPaidFlow"
FLOW = f'''
import os
import signal

from metaflow import FlowSpec, Parameter, step
from pf_metaflow import pf_escrow_step


class {FLOW_NAME}(FlowSpec):
    agent_wallet = Parameter("agent_wallet", default="")
    kill_item = Parameter("kill_item", default=-1, type=int)

    @pf_escrow_step(agent_wallet="agent_wallet", amount_usdc="0.25", label="plan")
    @step
    def start(self):
        self.items = [0, 1, 2]
        self.next(self.work, foreach="items")

    @pf_escrow_step(agent_wallet="agent_wallet", amount_usdc="1.00", label="shard")
    @step
    def work(self):
        if self.input == self.kill_item:
            os.kill(os.getpid(), signal.SIGKILL)  # after its escrow is locked: nothing settles it
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    {FLOW_NAME}()
'''
FEE = Decimal("0.01")
FUNDED = Decimal("100")


@pytest.fixture
def payer(topo):
    return topo.new_agent("payer", fund=str(FUNDED))


@pytest.fixture
def worker(topo):
    return topo.new_agent("worker")


class Orchestrator:
    """Drives the flow task by task on the topology, as Argo or Dagster do: ``init --run-id R``,
    then one ``step`` process per task, with the run id and task ids it chose."""

    def __init__(self, topo, cwd: Path, run_id: str, key: str, **parameters: object) -> None:
        from distributed.services import process_env

        flow = cwd / "orch_paid_flow.py"
        flow.write_text(FLOW)
        self.cwd, self.run_id = cwd, run_id
        self.top = [sys.executable, str(flow), "--no-pylint", "--quiet", "--metadata", "service",
                    "--datastore", "s3", "--datastore-root", topo.sysroot, "--environment", "local"]
        # Orchestrators hand parameter values to `init` as METAFLOW_INIT_<NAME>.
        self.env = process_env(topo, key, **{f"METAFLOW_INIT_{k.upper()}": str(v) for k, v in parameters.items()})

    def _call(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.top + list(args), cwd=self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=300)

    def init(self, task_id: str) -> subprocess.CompletedProcess:
        return self._call("init", "--run-id", self.run_id, "--task-id", task_id)

    def step(self, name: str, task_id: str, input_paths: str, split_index: int | None = None
             ) -> subprocess.CompletedProcess:
        args = ["step", name, "--run-id", self.run_id, "--task-id", task_id, "--input-paths", input_paths,
                "--retry-count", "0", "--max-user-code-retries", "0"]
        if split_index is not None:
            args += ["--split-index", str(split_index)]
        return self._call(*args)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _ledger(topo, cwd: Path, pathspec: str) -> dict:
    from distributed.services import pf_cli

    return json.loads(_ok(pf_cli(topo, cwd, "ledger", pathspec, "--json")).stdout)


def _by_task(ledger: dict) -> dict[str, dict]:
    return {f"{e['step']}/{e['task']}": e for e in ledger["entries"]}


@distributed
@pytest.mark.parametrize("ids", ["integer", "argo"])
def test_an_orchestrated_run_the_service_did_not_register_is_read_whole_and_its_killed_task_reconciled(
        topo, tmp_path, payer, worker, ids):
    from distributed.services import pf_cli, service_get
    from pf_metaflow.sandbox.engine import SandboxEngine

    run_id = "argo-" + uuid.uuid4().hex[:10]
    pathspec = f"{FLOW_NAME}/{run_id}"
    o = Orchestrator(topo, tmp_path, run_id, payer.api_key, agent_wallet=worker.agent_id, kill_item=1)
    count = iter(range(1, 100))
    task_ids = {name: (str(next(count)) if ids == "integer" else f"t-{uuid.uuid4().hex[:8]}")
                for name in ("params", "start", "work0", "work1", "work2")}

    init = o.init(task_ids["params"])
    if ids == "argo" and init.returncode != 0 and "failed (code 500)" in init.stdout + init.stderr:
        pytest.xfail("metaflow-local-service 0.2.0 answers 500 to registering a task whose id is not a "
                     "number in a run it did not register: Argo and Step Functions tasks cannot start on it")
    _ok(init)
    _ok(o.step("start", task_ids["start"], f"{run_id}/_parameters/{task_ids['params']}"))
    for index in range(3):
        shard = o.step("work", task_ids[f"work{index}"], f"{run_id}/start/{task_ids['start']}", split_index=index)
        assert shard.returncode == (-9 if index == 1 else 0), shard.stdout + shard.stderr
    # The killed shard stops the run there, as an orchestrator would: join and end never start.

    # The gap: the service keeps no run under the orchestrator's id, so Metaflow's client cannot open it...
    status, _ = service_get(topo, f"flows/{FLOW_NAME}/runs/{run_id}")
    assert status == 404
    client = subprocess.run(
        [sys.executable, "-c", f"from metaflow import Run, namespace; namespace(None); Run({pathspec!r})"],
        cwd=tmp_path, env=o.env, capture_output=True, text=True, timeout=120)
    assert client.returncode != 0 and "does not exist" in client.stderr, client.stdout + client.stderr

    # ...yet the ledger lists every paid task, and says where it read them from.
    ledger = _ledger(topo, tmp_path, pathspec)
    assert ledger["complete"] is True and ledger["unseen"] == [], ledger["unseen"]
    start, (w0, w1, w2) = task_ids["start"], (task_ids[f"work{i}"] for i in range(3))
    assert {k: (e["amount_usdc"], e["status"]) for k, e in _by_task(ledger).items()} == {
        f"start/{start}": ("0.250000", "released"),
        f"work/{w0}": ("1.000000", "released"),
        f"work/{w1}": ("1.000000", "locked"),
        f"work/{w2}": ("1.000000", "released"),
    }
    assert {e["shard"] for e in ledger["entries"] if e["step"] == "work"} == {"work[0]", "work[1]", "work[2]"}
    assert {e["recipient"] for e in ledger["entries"]} == {worker.agent_id}
    source = ledger["source"]
    assert f"not registered with the metadata service at {topo.service_url}" in source, source
    assert f"s3://{topo.bucket}/metaflow/{FLOW_NAME}/{run_id}" in source, source
    table = _ok(pf_cli(topo, tmp_path, "ledger", pathspec))
    for entry in ledger["entries"]:
        assert entry["escrow_id"] in table.stdout, table.stdout

    # The escrow service's own word: three released, the killed shard's still held.
    engine = SandboxEngine(topo.escrow_db)
    killed = _by_task(ledger)[f"work/{w1}"]["escrow_id"]
    assert {engine.get(e["escrow_id"])["status"] for e in ledger["entries"] if e["escrow_id"] != killed} == {
        "released"}
    assert engine.get(killed)["status"] == "funded"
    paid = sum((Decimal(a) * (1 - FEE) for a in ("0.25", "1.00", "1.00")), Decimal(0))
    assert topo.wallet(payer) == {"usdc": FUNDED - Decimal("3.25"), "locked": Decimal("1.00")}
    assert topo.wallet(worker)["usdc"] == paid

    # reconcile settles the killed task's escrow, through the service's task metadata.
    done = pf_cli(topo, tmp_path, "reconcile", pathspec, key=payer.api_key)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{killed} (work/{w1} attempt 0, 1.000000 USDC) locked -> refunded" in done.stdout, done.stdout
    assert f"Read from: {pathspec}: not registered with the metadata service" in done.stdout, done.stdout
    assert engine.get(killed)["status"] == "refunded"
    assert topo.wallet(payer) == {"usdc": FUNDED - Decimal("2.25"), "locked": Decimal(0)}
    assert topo.wallet(worker)["usdc"] == paid
    after = _ledger(topo, tmp_path, pathspec)
    assert after["complete"] is True and _by_task(after)[f"work/{w1}"]["status"] == "refunded"

    # A second reconcile finds nothing left to do and moves nothing.
    before = topo.balances()
    again = pf_cli(topo, tmp_path, "reconcile", pathspec, key=payer.api_key)
    assert again.returncode == 0 and "every escrow is settled; nothing to do" in again.stdout, again.stdout
    assert topo.balances() == before
    assert engine.get(killed)["status"] == "refunded"
    topo.check_conservation()


@distributed
def test_a_run_neither_registered_nor_in_the_datastore_is_a_usage_error_that_says_where_it_looked(topo, tmp_path):
    from distributed.services import pf_cli

    pathspec = f"{FLOW_NAME}/argo-{uuid.uuid4().hex[:10]}"
    for command in ("ledger", "reconcile"):
        proc = pf_cli(topo, tmp_path, command, pathspec)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert f"it is not registered with the metadata service at {topo.service_url}" in proc.stderr, proc.stderr
        assert f"nor has any task in the datastore s3://{topo.bucket}/metaflow/{pathspec}" in proc.stderr, proc.stderr
