"""Running flows for real in tests: one subprocess per run, in an isolated directory.

Each test gets its own working directory (so ``.metaflow/`` and the sandbox
database don't leak between tests) and its own environment: ``METAFLOW_USER``
set (CI runs as root), no ``PF_*`` variables unless the test gives them, and its
own temporary directory (``TMPDIR``): a Metaflow task keeps its rate-limit windows
in a file under the temp dir named by the escrow URL and key, and a server that
another test starts later (in this process or another ``pytest -n`` worker) can be
given the same port, hence the same file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
FLOWS = REPO / "flows"


@dataclass
class FlowRun:
    returncode: int
    stdout: str
    stderr: str
    run_id: Optional[str]
    flow_name: Optional[str]

    @property
    def pathspec(self) -> str:
        assert self.flow_name and self.run_id, f"no run id in output:\n{self.output}"
        return f"{self.flow_name}/{self.run_id}"

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr


class Workspace:
    """A directory to run flows in, with its own sandbox escrow database."""

    def __init__(self, path: Path, extra_env: Optional[dict] = None) -> None:
        self.path = path
        self.db = path / "escrow.db"
        # Beside the workspace, not in it: tests create the workspace directory themselves.
        self.tmp = path.parent / f"{path.name}.tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "METAFLOW_"))}
        self.env.update(
            METAFLOW_USER="pf-tester",
            PF_SANDBOX_DB=str(self.db),
            PYTHONUNBUFFERED="1",
            TMPDIR=str(self.tmp),
            # Metaflow tasks print through its logger; keep the output plain.
            METAFLOW_DEFAULT_METADATA="local",
            METAFLOW_DEFAULT_DATASTORE="local",
        )
        self.env.update(extra_env or {})

    def run_flow(self, flow_file: str | Path, *args: str, command: str = "run", timeout: float = 600,
                 env: Optional[dict] = None) -> FlowRun:
        flow_path = Path(flow_file)
        if not flow_path.is_absolute():
            flow_path = FLOWS / flow_path
        run_id_file = self.path / f".run-id-{os.getpid()}-{len(list(self.path.glob('.run-id-*')))}"
        cmd = [sys.executable, str(flow_path), "--no-pylint", command, "--run-id-file", str(run_id_file), *args]
        proc = subprocess.run(cmd, cwd=self.path, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        run_id = run_id_file.read_text().strip() if run_id_file.exists() else None
        flow_name = _flow_name(proc.stdout + proc.stderr)
        return FlowRun(proc.returncode, proc.stdout, proc.stderr, run_id, flow_name)

    def cli(self, *args: str, timeout: float = 120, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pf_metaflow", *args], cwd=self.path,
                              env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout)

    def cli_json(self, *args: str, env: Optional[dict] = None) -> Any:
        proc = self.cli(*args, "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def balances(self) -> dict:
        """``pf-metaflow sandbox balance --json``, amounts as Decimal."""
        data = self.cli_json("sandbox", "balance")
        return {
            "agents": {a: {k: Decimal(v) for k, v in b.items()} for a, b in data["agents"].items()},
            "house_fees": Decimal(data["house_fees"]),
            "minted": Decimal(data["minted"]),
        }

    def ledger(self, pathspec: str) -> dict:
        return self.cli_json("ledger", pathspec)

    def engine(self):
        from pf_metaflow.sandbox.engine import SandboxEngine

        return SandboxEngine(self.db)

    def client_run(self, pathspec: str):
        """The run through the Metaflow client, pointed at this workspace's .metaflow."""
        from metaflow import Run, metadata, namespace

        metadata(f"local@{self.path}")
        namespace(None)
        return Run(pathspec)


def _flow_name(output: str) -> Optional[str]:
    marker = "executing "
    for line in output.splitlines():
        if marker in line and " for user:" in line:
            return line.split(marker, 1)[1].split(" for user:", 1)[0].strip()
    return None


def write_flow(directory: Path, name: str, source: str) -> Path:
    path = directory / name
    path.write_text(source)
    return path


# A one-step flow whose `start` carries @pf_escrow_step({args}): for graph-time checks.
DECORATED_START_FLOW = '''
from metaflow import FlowSpec, step
from pf_metaflow import pf_escrow_step

class BadDecoratorFlow(FlowSpec):
    @pf_escrow_step({args})
    @step
    def start(self):
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    BadDecoratorFlow()
'''
