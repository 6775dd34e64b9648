"""Regression guard on what a paid task does, by counts (never times): issue 13.

A probe (``tests/benchmarks/probe/sitecustomize.py``) is loaded into every process
of a real flow run and counts calls in each task process. A paid task must open the
sandbox database once (one ``sqlite3.connect``, one schema check), build one escrow
client, write each escrow state and each lease state in one ``register_metadata``
call, and add no more ``register_metadata`` calls than those to what a plain task
makes. A retried attempt (a new process) does the same, no more.
"""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "benchmarks"))

import probing  # noqa: E402
from mfrun import Workspace, write_flow  # noqa: E402

PAID = '''
from metaflow import FlowSpec, current, retry, step
from pf_metaflow import pf_escrow_step


class CountedFlow(FlowSpec):
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="0.10")
    @step
    def start(self):
        self.next(self.flaky)

    @retry(times=1, minutes_between_retries=0)
    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="0.10")
    @step
    def flaky(self):
        if current.retry_count == 0:
            raise RuntimeError("first attempt fails on purpose")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CountedFlow()
'''

PLAIN = PAID.replace('    @pf_escrow_step(agent_wallet="ag_sandbox_worker", amount_usdc="0.10")\n', "") \
            .replace("from pf_metaflow import pf_escrow_step\n", "")


def _run(tmp_path: Path, name: str, source: str) -> list[dict]:
    space = tmp_path / name
    space.mkdir()
    (space / ".metaflow").mkdir()
    flow = write_flow(space, "counted_flow.py", source)
    out = tmp_path / f"probe_{name}"
    result = Workspace(space).run_flow(flow, env=probing.probe_env(out))
    assert result.returncode == 0, result.output
    tasks = probing.tasks(probing.read(out))
    assert tasks, "the probe saw no task process (is tests/benchmarks/probe on PYTHONPATH?)"
    return tasks


@pytest.fixture(scope="module")
def counted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("overhead_counts")
    return {"paid": _run(tmp, "paid", PAID), "plain": _run(tmp, "plain", PLAIN)}


def _by_step(tasks: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for task in tasks:
        out.setdefault(task["task"], []).append(task)
    return out


def test_every_paid_attempt_opens_the_database_once_and_builds_one_client(counted):
    paid = _by_step(counted["paid"])
    assert len(paid["flaky"]) == 2, "the retried step should run as two processes"
    for task in paid["start"] + paid["flaky"]:
        assert probing.count(task, "engine.open") == 1, task["stats"]
        assert probing.count(task, "sqlite3.connect") == 1, task["stats"]
        assert probing.count(task, "engine.schema_check") <= 1, task["stats"]
        assert probing.count(task, "client.construct") == 1, task["stats"]


def test_each_escrow_state_is_one_metadata_call(counted):
    paid = _by_step(counted["paid"])
    (start,) = paid["start"]
    # intent, locked, released: one record each; lease: running, ended.
    assert probing.count(start, "metadata.escrow_record") == 3, start["stats"]
    assert probing.count(start, "metadata.lease_record") == 2, start["stats"]
    assert probing.count(start, "engine.create") == 1
    assert probing.count(start, "engine.release") == 1
    first, second = sorted(paid["flaky"], key=lambda t: t["argv"][t["argv"].index("--retry-count") + 1]
                           if "--retry-count" in t["argv"] else "0")
    # The failed attempt: intent, locked, held for the next attempt (3); the retry adopts
    # the escrow (no second create) and releases it (1 today). Bounded, not exact.
    for task in (first, second):
        assert probing.count(task, "metadata.escrow_record") <= 3, task["stats"]
        assert probing.count(task, "metadata.lease_record") <= 2, task["stats"]
    assert probing.count(first, "engine.create") + probing.count(second, "engine.create") == 1


def test_a_paid_task_adds_only_its_own_records_to_metaflows_metadata_calls(counted):
    paid, plain = _by_step(counted["paid"]), _by_step(counted["plain"])
    for step in ("start", "flaky", "end"):
        p, q = paid[step][-1], plain[step][-1]
        assert probing.count(q, "metadata.register_metadata") > 0, "the probe did not see Metaflow's calls"
        ours = probing.count(p, "metadata.escrow_record") + probing.count(p, "metadata.lease_record")
        assert (probing.count(p, "metadata.register_metadata")
                <= probing.count(q, "metadata.register_metadata") + ours), (p["stats"], q["stats"])
    # An unpaid step of a paid flow touches neither the database nor the client.
    (end,) = paid["end"]
    for name in ("engine.open", "sqlite3.connect", "client.construct", "metadata.escrow_record",
                 "metadata.lease_record"):
        assert probing.count(end, name) == 0, (name, end["stats"])


def test_default_client_is_built_once_and_its_engine_opened_once(tmp_path, monkeypatch):
    from pf_metaflow import client as client_mod
    from pf_metaflow.sandbox.engine import SandboxEngine

    monkeypatch.setattr(client_mod, "_default_clients", {})
    opened = []
    real_open = SandboxEngine._open
    monkeypatch.setattr(SandboxEngine, "_open", lambda self: opened.append(1) or real_open(self))
    first = client_mod.default_client()
    for _ in range(5):
        assert client_mod.default_client() is first
        escrow = first.create(Decimal("0.10"), counterparty_agent_id="ag_sandbox_worker", description="count")
        first.release(escrow.escrow_id)
    assert len(opened) == 1
