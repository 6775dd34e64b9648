"""Reading runs where Metaflow cannot tell who the user is (root, no ``$METAFLOW_USER``).

The quickstart runs the pipeline with ``METAFLOW_USER=quickstart`` inline, then
``pf-metaflow ledger FLOW``: as root in a fresh shell that second command has no user name,
and every Metaflow client object resolves the default namespace ``user:<name>`` first, so
it failed, even for a run named by its pathspec.
"""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from mfrun import Workspace

PAYER = "ag_sandbox_payer"
WORKER = "ag_sandbox_worker"


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def _nameless_env(ws: Workspace) -> dict:
    """The workspace's environment as root with no name Metaflow accepts (it skips "root")."""
    env = {k: v for k, v in ws.env.items() if k not in ("METAFLOW_USER", "SUDO_USER", "USERNAME", "LOGNAME")}
    env["USER"] = "root"
    return env


def _cli(ws: Workspace, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pf_metaflow", *args], cwd=ws.path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_ledger_and_reconcile_read_a_run_when_metaflow_cannot_tell_who_you_are(ws):
    result = ws.run_flow(Path(__file__).parent / "flows" / "pay_flow.py")  # as METAFLOW_USER=pf-tester
    assert result.returncode == 0, result.output
    env = _nameless_env(ws)
    probe = subprocess.run(
        [sys.executable, "-c", "from metaflow import get_namespace; get_namespace()"],
        cwd=ws.path, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and "MetaflowUnknownUser" in probe.stderr  # the case under test

    named = _cli(ws, env, "ledger", result.pathspec, "--json")
    assert named.returncode == 0, named.stderr
    by_pathspec = json.loads(named.stdout)
    [entry] = by_pathspec["entries"]
    assert by_pathspec["run"] == result.pathspec and by_pathspec["complete"] is True
    assert (entry["step"], entry["status"], Decimal(entry["amount_usdc"])) == ("work", "released", Decimal("2.50"))
    # What the ledger says was paid is what the sandbox holds.
    balances = ws.balances()["agents"]
    assert balances[WORKER]["usdc"] == Decimal(entry["net_usdc"]) == Decimal("2.475")
    assert balances[PAYER]["locked"] == 0

    latest = _cli(ws, env, "ledger", "PayFlow", "--json")
    assert latest.returncode == 0, latest.stderr
    assert json.loads(latest.stdout) == by_pathspec
    assert "Metaflow cannot tell who you are" in latest.stderr and result.pathspec in latest.stderr

    settle = _cli(ws, env, "reconcile", "PayFlow", "--dry-run")
    assert settle.returncode == 0, settle.stderr
    assert f"{result.pathspec}: every escrow is settled; nothing to do" in settle.stdout

    missing = _cli(ws, env, "ledger", "NoSuchFlow")
    assert missing.returncode == 2 and "NoSuchFlow" in missing.stderr
