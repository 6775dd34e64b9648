"""The examples in ``examples/`` do what they say, run as a user runs them."""

from __future__ import annotations

import ast
import difflib
import os
import socket
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from mfrun import REPO, Workspace
from payments import MINTED, PAYER, WORKER, assert_paid_exactly, ran

EXAMPLES = REPO / "examples"


def code_lines(path: Path) -> list[str]:
    """The file's lines without its module docstring."""
    source = path.read_text()
    docstring = ast.parse(source).body[0]
    return source.splitlines()[docstring.end_lineno:]


def run_example(ws: Workspace, *cmd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an example script in the workspace, with the venv's `python` and `pf-metaflow` on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), ws.env.get("PATH", "")])
    proc = subprocess.run(list(cmd), cwd=ws.path, env={**ws.env, "PATH": path, **(env or {})},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_adding_escrow_to_an_existing_flow_adds_an_import_a_parameter_and_a_decorator_only():
    diff = list(difflib.ndiff(code_lines(EXAMPLES / "existing_flow.py"),
                              code_lines(EXAMPLES / "existing_flow_paid.py")))
    added = [line[2:].strip() for line in diff if line.startswith("+ ") and line[2:].strip()]
    removed = [line for line in diff if line.startswith("- ")]
    assert removed == []
    assert added[0].startswith("from pf_metaflow import ")
    assert added[1].startswith('agent_wallet = Parameter("agent_wallet"') and added[2].startswith("help=")
    assert added[3].startswith("@pf_escrow_step(") and len(added) == 4


def test_the_step_is_paid_the_same_with_the_decorator_in_code_or_added_with_with(tmp_path):
    in_code = Workspace(tmp_path / "decorator")
    in_code.path.mkdir()
    run = ran(in_code, EXAMPLES / "existing_flow_paid.py")
    assert_paid_exactly(in_code, run, released={"summarize": "0.50"})

    with_with = Workspace(tmp_path / "with")
    with_with.path.mkdir()
    script = run_example(with_with, "sh", str(EXAMPLES / "paid_with_with.sh"))
    [entry] = with_with.ledger("ReportFlow")["entries"]
    assert entry["step"] == "summarize" and entry["status"] == "released"
    assert entry["escrow_id"] in script.stdout and "released (paid): 0.500000 USDC" in script.stdout
    assert with_with.balances()["agents"][WORKER]["usdc"] == Decimal("0.495")

    # ...and the Metaflow client example reads the first run back.
    read = run_example(in_code, sys.executable, str(EXAMPLES / "read_ledger.py"), run.pathspec)
    escrow_id = in_code.ledger(run.pathspec)["entries"][0]["escrow_id"]
    assert f"summarize    {escrow_id}" in read.stdout
    assert "paid 0.500000 USDC (0.495000 to agents, 0.005000 in fees), refunded 0.000000 USDC" in read.stdout


@pytest.mark.slow
def test_reconcile_after_kill_returns_the_escrow_the_killed_run_left_locked(tmp_path):
    ws = Workspace(tmp_path)
    out = run_example(ws, sys.executable, str(EXAMPLES / "reconcile_after_kill.py")).stdout
    assert "run killed with 4.000000 USDC locked in escrow" in out
    assert "locked -> refunded: reconciled" in out
    assert out.rstrip().endswith("locked in escrow now: 0.000000 USDC")
    [entry] = ws.ledger("LongJobFlow")["entries"]
    assert entry["status"] == "refunded"
    payer = ws.balances()["agents"][PAYER]
    assert payer["usdc"] == MINTED and payer["locked"] == 0
    ws.engine().check_invariant()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_flows_run_unchanged_against_a_sandbox_server(tmp_path):
    ws = Workspace(tmp_path)
    out = run_example(ws, "sh", str(EXAMPLES / "sandbox_server.sh"), env={"PORT": str(free_port())}).stdout
    assert "refunded: 3.000000 USDC" in out
    runs = sorted(p.name for p in (ws.path / ".metaflow" / "TrainingBountyFlow").iterdir() if p.name.isdigit())
    statuses = [ws.ledger(f"TrainingBountyFlow/{r}")["entries"][0]["status"] for r in runs]
    assert statuses == ["released", "refunded"]
    balances = ws.balances()["agents"]
    assert balances[PAYER]["usdc"] == MINTED - 3 and balances[WORKER]["usdc"] == Decimal("2.97")


def test_sandbox_server_example_refuses_a_port_another_process_holds(tmp_path):
    ws = Workspace(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = os.pathsep.join([str(Path(sys.executable).parent), ws.env.get("PATH", "")])
        proc = subprocess.run(["sh", str(EXAMPLES / "sandbox_server.sh")], cwd=ws.path,
                              env={**ws.env, "PATH": path, "PORT": str(port)},
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"port {port} is taken by another process" in proc.stderr
    assert not (ws.path / ".metaflow").exists() and not ws.db.exists()


def test_examples_refer_to_files_that_exist():
    for path in EXAMPLES.glob("*.py"):
        for name in __import__("re").findall(r"`([\w./-]+\.(?:py|sh))`", path.read_text()):
            assert (EXAMPLES / name).exists() or (REPO / name).exists(), f"{path.name} refers to {name}"
