"""Many processes on one sandbox file, as Metaflow tasks are: no lock errors, no lost money."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal

from pf_metaflow.money import fee_for
from pf_metaflow.sandbox.engine import SandboxEngine

D = Decimal
PROCESSES = 16
LOOPS = 30
AMOUNT = D("1.23")
WORKER = "ag_sandbox_worker"

# One Metaflow-task-like process: its own agent, create/release/refund loops, plus one
# create with an idempotency key every process shares (only one escrow may come of it).
TASK = """
import json, sys
from decimal import Decimal
from pf_metaflow.sandbox.engine import SandboxEngine

db, index, loops, amount = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Decimal(sys.argv[4])
engine = SandboxEngine(db)
agent = engine.register(f"task {index}")["agent_id"]
if loops:
    engine.claim(agent, amount * loops)
released = refunded = 0
for i in range(loops):
    record, _ = engine.create(agent, amount_usd=amount, description=f"task {index} step {i}",
                              counterparty_agent_id="ag_sandbox_worker")
    if i % 3 == 2:
        engine.refund(agent, record["escrow_id"])
        refunded += 1
    else:
        engine.release(agent, record["escrow_id"])
        released += 1
shared, replayed = engine.create(
    "ag_sandbox_payer", amount_usd=Decimal("5"), description="shared step",
    counterparty_agent_id="ag_sandbox_worker", idempotency_key="one-key-for-all",
)
print(json.dumps({"agent": agent, "released": released, "refunded": refunded,
                  "shared": shared["escrow_id"], "replayed": replayed}))
"""


def run_tasks(db, count: int, loops: int = LOOPS) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PF_")}
    tasks = [
        subprocess.Popen(
            [sys.executable, "-c", TASK, str(db), str(i), str(loops), str(AMOUNT)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i in range(count)
    ]
    results = []
    for task in tasks:
        out, err = task.communicate(timeout=120)
        assert task.returncode == 0, err
        assert "locked" not in err and "Error" not in err, err
        results.append(json.loads(out))
    return results


def test_sixteen_processes_on_a_new_file_lose_no_money_and_never_see_a_lock_error(tmp_path):
    db = tmp_path / "shared" / "escrow.db"  # does not exist yet: they race to create it
    results = run_tasks(db, PROCESSES)
    engine = SandboxEngine(db)
    engine.check_invariant()

    released = sum(r["released"] for r in results)
    assert released + sum(r["refunded"] for r in results) == PROCESSES * LOOPS
    fee = fee_for(AMOUNT)
    for r in results:
        assert engine.balance(r["agent"]) == {
            "agent_id": r["agent"], "usdc": AMOUNT * r["refunded"], "locked": D(0)}
    assert engine.balance(WORKER)["usdc"] == fee.net * released
    assert engine.balances()["house_fees"] == fee.commission * released
    assert engine.stats()["total_created"] == PROCESSES * LOOPS + 1


def test_a_create_with_one_idempotency_key_raced_by_sixteen_processes_happens_once(tmp_path):
    db = tmp_path / "escrow.db"
    results = run_tasks(db, PROCESSES, loops=0)
    assert len({r["shared"] for r in results}) == 1
    assert sorted(r["replayed"] for r in results) == [False] + [True] * (PROCESSES - 1)
    engine = SandboxEngine(db)
    assert engine.balance("ag_sandbox_payer")["locked"] == D("5")
    engine.check_invariant()


def test_forked_children_can_keep_using_the_parents_engine(tmp_path):
    engine = SandboxEngine(tmp_path / "escrow.db")
    engine.check_invariant()  # the parent's connection is open before the fork
    children = []
    for _ in range(PROCESSES):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for _ in range(10):
                    record, _ = engine.create("ag_sandbox_payer", amount_usd=AMOUNT,
                                              description="forked task",
                                              counterparty_agent_id=WORKER)
                    engine.release("ag_sandbox_payer", record["escrow_id"])
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    for pid in children:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    engine.check_invariant()
    assert engine.balance(WORKER)["usdc"] == fee_for(AMOUNT).net * PROCESSES * 10
