"""Read what ``tests/benchmarks/probe/sitecustomize.py`` wrote: one JSON file per process.

Used by ``run.py`` (the per-hook breakdown of a paid task) and by
``tests/test_overhead_counts.py`` (counts, not times).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Optional

PROBE_DIR = Path(__file__).resolve().parent / "probe"

# Rows of the breakdown, in the order a task meets them. Hook times are inclusive.
ROWS = [
    ("hook.step_init", "step_init (graph checks; every process that loads the flow)"),
    ("hook.task_pre_step", "task_pre_step (imports settle/client/lease, lease start)"),
    ("hook.task_decorate/lock", "task_decorate lock (intent record, create, locked record)"),
    ("hook.task_post_step", "task_post_step (release, released record)"),
    ("hook.task_finished", "task_finished (lease end record)"),
    ("import.pf_metaflow", "  of which imports of pf_metaflow modules (all, incl. base)"),
    ("client.construct", "  of which EscrowClient construction"),
    ("engine.open", "  of which engine open (connect, pragmas, schema check)"),
    ("engine.schema_check", "    of which schema check"),
    ("engine.create", "  of which engine create (SQLite transaction)"),
    ("engine.release", "  of which engine release (SQLite transaction)"),
    ("metadata.escrow_record", "  of which escrow metadata records"),
    ("metadata.lease_record", "  of which lease metadata records"),
    ("ledger.artifacts", "  of which ledger artifacts (merge + publish)"),
]


def probe_env(out_dir: Path, base: Optional[dict] = None) -> dict:
    """Environment that turns the probe on for every Python process started with it."""
    path = (base or os.environ).get("PYTHONPATH", "")
    return {"PYTHONPATH": str(PROBE_DIR) + (os.pathsep + path if path else ""),
            "PF_BENCH_PROBE": str(out_dir)}


def read(out_dir: Path) -> list[dict]:
    """Every process's record; ``task`` is the step name for Metaflow task processes."""
    records = []
    for path in sorted(Path(out_dir).glob("*.json")):
        data = json.loads(path.read_text())
        argv = data.get("argv", [])
        data["task"] = argv[argv.index("step") + 1] if "step" in argv else None
        records.append(data)
    return records


def tasks(records: list[dict]) -> list[dict]:
    return [r for r in records if r["task"]]


def count(record: dict, name: str) -> int:
    return record["stats"].get(name, [0, 0.0, 0.0])[0]


def per_task_ms(records: list[dict], name: str) -> tuple[float, float, float]:
    """(median calls, median CPU ms, median wall ms) per task process."""
    rows = [r["stats"].get(name, [0, 0.0, 0.0]) for r in tasks(records)]
    if not rows:
        return 0.0, 0.0, 0.0
    return (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows) * 1000,
            statistics.median(r[2] for r in rows) * 1000)


def cpu_after_metaflow(record: dict) -> float:
    """CPU seconds of a process after ``import metaflow`` returned (which loads pf-metaflow's
    extension): everything a paid task does that a plain one does not happens after it."""
    return record["cpu"] - record.get("cpu_at", {}).get("metaflow_imported", 0.0)

