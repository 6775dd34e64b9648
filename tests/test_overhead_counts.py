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
        assert probing.count(task, "metadata.task_records") == 1, task["stats"]


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


def test_the_flow_wide_graph_checks_run_once_per_process(counted):
    # Metaflow calls every paid step's step_init in every process that loads the flow; the
    # checks that look at every step (budget keys, join mergers) run once, not once per step.
    for task in counted["paid"]:
        assert probing.count(task, "hook.step_init") == 2, task["stats"]  # the two paid steps
        assert probing.count(task, "graph.flow_checks") == 1, task["stats"]


# What Metaflow's extension loads in every process: the decorator classes and the card type.
EXTENSION_MODULES = {"pf_metaflow", "pf_metaflow._step_decorator", "pf_metaflow._ledger_card"}
# What an embedded paid task has no use for: HTTP transport, retry policy and pacing, cards,
# reading runs, the CLI, the sandbox server, the MCP toolkit.
NOT_ON_THE_EMBEDDED_PATH = {"tenacity", "pf_metaflow._http", "pf_metaflow.pacing",
                            "pf_metaflow.card", "pf_metaflow.runs", "pf_metaflow.cli", "pf_metaflow.api",
                            "pf_metaflow.sandbox.server", "pf_metaflow.sandbox.hosting",
                            "pf_metaflow.mcp.toolkit", "pf_metaflow.preflight"}


def test_tasks_load_only_the_modules_they_use(counted):
    for task in counted["plain"]:  # no paid step: not even decimal
        assert set(task["modules"]) == EXTENSION_MODULES, (task["task"], task["modules"])
    for task in counted["paid"]:
        assert EXTENSION_MODULES <= set(task["modules"])
        assert not set(task["modules"]) & NOT_ON_THE_EMBEDDED_PATH, (task["task"], task["modules"])


def test_the_runtime_keeps_the_sandbox_log_for_the_tasks_after_the_first(counted):
    # Metaflow's runtime holds the embedded sandbox's database open once it exists, so a task's
    # exit is never the last connection's close (which checkpoints and deletes the WAL, two
    # fsyncs) and the next task finds the WAL there instead of making it again.
    paid = _by_step(counted["paid"])
    (start,) = paid["start"]
    assert probing.count(start, "engine.open_found_log") == 0  # the run's first task made the file
    for task in paid["flaky"]:
        assert probing.count(task, "engine.open_found_log") == 1, task["stats"]
