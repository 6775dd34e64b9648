"""Reading a finished (or failed, or killed) run's payments, and settling what it left open."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional, Union

from . import ledger as ledger_mod
from . import settle
from .decorator import LEDGER_ARTIFACT, METADATA_TYPE, escrow_metadatum

RunLike = Union[str, Any]


def _run(run: RunLike):
    from metaflow import Run, namespace

    if isinstance(run, str):
        namespace(None)  # a pathspec names one run, whoever started it
        return Run(run)
    return run


def ledger_of(run: RunLike) -> list[dict]:
    """Every escrow of a run: a Metaflow ``Run`` or ``"Flow/123"``.

    Gathered from each task's metadata (written before and after every escrow
    call, so tasks that died without artifacts still show) and from the
    ``pf_ledger`` artifacts (which also carry entries cloned by ``resume``).
    """
    return ledger_mod.merge(*(_records(task) for task in _tasks(_run(run))), _artifact_ledger(_run(run)))


def _tasks(run):
    for step in run:
        yield from step


def _records(task) -> list[dict]:
    return [json.loads(m.value) for m in task.metadata if m.type == METADATA_TYPE]


def _artifact_ledger(run) -> list[dict]:
    # The end step's ledger holds the whole run's when the run got that far;
    # otherwise each task's ledger holds what reached it.
    end = run.end_task if run.finished else None
    tasks = [end] if end is not None else list(_tasks(run))
    out: list[dict] = []
    for task in tasks:
        if LEDGER_ARTIFACT in task:
            out.extend(task[LEDGER_ARTIFACT].data or [])
    return out


@dataclass(frozen=True)
class Action:
    before: dict
    after: dict

    @property
    def changed(self) -> bool:
        return self.before.get("status") != self.after.get("status")

    def describe(self, *, dry_run: bool = False) -> str:
        b, a = self.before, self.after
        name = a.get("escrow_id") or a.get("description")
        where = f"{name} ({a['step']}/{a['task']} attempt {a['attempt']}, {a['amount_usdc']} USDC)"
        if dry_run:
            return f"{where} is {b['status']}: would look it up and refund what is still held"
        what = f"{b['status']} -> {a['status']}" if self.changed else f"still {a['status']}"
        why = f": {a['reason']}" if a.get("reason") and a["status"] != "released" else ""
        return f"{where} {what}{why}"


def reconcile(run: RunLike, *, dry_run: bool = False, client=None) -> list[Action]:
    """Settle every escrow of ``run`` still open: look it up, refund what is still held.

    Only entries whose own run is ``run`` are touched (entries a ``resume``
    carried over belong to the run that created them). Each new state is written
    to the task's metadata, so a second reconcile finds nothing left to do.
    """
    r = _run(run)
    open_entries = [
        e for e in ledger_of(r)
        if e["status"] in ledger_mod.OPEN_STATUSES and e["run"] == r.pathspec
    ]
    if dry_run or not open_entries:
        return [Action(e, e) for e in open_entries]
    if client is None:
        from .client import default_client

        client = default_client()
    writer = _MetadataWriter(r.pathspec.split("/")[0])
    actions = []
    for entry in open_entries:
        after = settle.resolve(client, entry, "reconciled: its task ended without settling it", writer.record)
        actions.append(Action(entry, after))
    return actions


class _MetadataWriter:
    """Appends escrow records to a task's metadata, from outside any run."""

    def __init__(self, flow_name: str) -> None:
        from metaflow import get_metadata
        from metaflow.client import core
        from metaflow.metaflow_environment import MetaflowEnvironment

        get_metadata()  # makes the client pick its configured provider
        flow = SimpleNamespace(name=flow_name)
        self._provider = core.current_metadata(MetaflowEnvironment(flow), flow, None, None)

    def record(self, entry: dict) -> None:
        _, run_id, step, task_id, _ = entry["ref"].split("/")
        self._provider.register_metadata(run_id, step, task_id, [escrow_metadatum(entry)])


def latest_run(flow_name: str) -> Optional[str]:
    from metaflow import Flow, namespace

    namespace(None)
    run = Flow(flow_name).latest_run
    return run.pathspec if run is not None else None
