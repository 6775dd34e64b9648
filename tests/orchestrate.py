"""Driving a flow task by task, the way an orchestrator does (metaflow-dagster, Argo).

An orchestrator does not use ``flow.py run``: it initialises the run's parameters task
(``flow.py init --run-id R --task-id T``), then starts one process per task,
``flow.py step NAME --run-id R --task-id ID --input-paths ... --retry-count N
--max-user-code-retries M``, choosing the task ids itself (plain integers here, which
Metaflow's local metadata registers no ``_self.json`` for, so its client never lists those
tasks) and retrying a failed task by starting it again with the next ``--retry-count``,
as many times as the step's ``@retry`` and ``@catch`` allow (Argo's ``retryStrategy``).

Only linear flows (``start`` -> ... -> ``end``) are driven here; enough for the fault matrix.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from mfrun import Workspace


@dataclass
class TaskRun:
    step: str
    task_id: str
    attempts: list[subprocess.CompletedProcess] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].returncode == 0


@dataclass
class OrchestratedRun:
    """What the orchestrator did: like :class:`mfrun.FlowRun` (returncode, output, pathspec)."""

    flow_name: str
    run_id: str
    tasks: list[TaskRun]

    @property
    def pathspec(self) -> str:
        return f"{self.flow_name}/{self.run_id}"

    @property
    def returncode(self) -> int:
        """0 when every task it started finished (the run reached its end), else the last code."""
        for task in self.tasks:
            if not task.ok:
                return task.attempts[-1].returncode or 1
        return 0

    @property
    def output(self) -> str:
        out = []
        for task in self.tasks:
            for n, done in enumerate(task.attempts):
                out.append(f"--- {task.step}/{task.task_id} attempt {n} (exit {done.returncode})\n"
                           f"{done.stdout}{done.stderr}")
        return "\n".join(out)


class Orchestrator:
    """Runs ``flow`` in ``ws`` task by task under local metadata and datastore, with the
    task ids and run id it is given. ``decospecs`` are passed as top-level ``--with``
    (how orchestrators add decorators at deploy time); ``env`` is added to every process."""

    def __init__(self, ws: Workspace, flow: Path, flow_name: str, run_id: str, *,
                 decospecs: Sequence[str] = (), env: Optional[dict] = None, timeout: float = 300) -> None:
        self.ws, self.flow, self.flow_name, self.run_id = ws, Path(flow), flow_name, run_id
        self.decospecs = list(decospecs)
        self.env = {**ws.env, **(env or {})}
        self.timeout = timeout
        (ws.path / ".metaflow").mkdir(exist_ok=True)

    def _top(self) -> list[str]:
        top = [sys.executable, str(self.flow), "--no-pylint", "--quiet", "--metadata", "local",
               "--datastore", "local", "--datastore-root", str(self.ws.path / ".metaflow"),
               "--environment", "local", "--event-logger", "nullSidecarLogger",
               "--monitor", "nullSidecarMonitor"]
        for spec in self.decospecs:
            top += ["--with", spec]
        return top

    def _call(self, args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(self._top() + args, cwd=self.ws.path, env=self.env, capture_output=True,
                              text=True, timeout=self.timeout)

    def init(self, task_id: str) -> str:
        """The parameters task; returns its input path for ``start``."""
        done = self._call(["init", "--run-id", self.run_id, "--task-id", task_id])
        if done.returncode != 0:
            raise RuntimeError(f"init failed:\n{done.stdout}{done.stderr}")
        return f"{self.run_id}/_parameters/{task_id}"

    def task(self, step: str, task_id: str, input_paths: str, *, user_retries: int = 0,
             fallback_retries: int = 0) -> TaskRun:
        """Run one task, retrying it while attempts are left (``--retry-count`` 0, 1, ...)."""
        run = TaskRun(step, task_id)
        for attempt in range(user_retries + fallback_retries + 1):
            done = self._call(["step", step, "--run-id", self.run_id, "--task-id", task_id,
                               "--input-paths", input_paths, "--retry-count", str(attempt),
                               "--max-user-code-retries", str(user_retries)])
            run.attempts.append(done)
            if done.returncode == 0:
                break
        return run

    def linear(self, steps: Sequence[str], *, first_task_id: int = 1, user_retries: int = 0,
               fallback_retries: int = 0) -> OrchestratedRun:
        """init, then each step in turn with integer task ids; stops at the first task that
        finally failed (its successors never start)."""
        task_id = first_task_id
        inputs = self.init(str(task_id))
        tasks: list[TaskRun] = []
        for step in steps:
            task_id += 1
            run = self.task(step, str(task_id), inputs, user_retries=user_retries,
                            fallback_retries=fallback_retries)
            tasks.append(run)
            if not run.ok:
                break
            inputs = f"{self.run_id}/{step}/{task_id}"
        return OrchestratedRun(self.flow_name, self.run_id, tasks)
