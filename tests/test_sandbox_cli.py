"""``pf-metaflow sandbox …`` through real subprocesses (``python -m pf_metaflow``)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from pf_metaflow.sandbox.engine import SandboxEngine

D = Decimal


def pf(*args: str, cwd: Path, env_db: Path | None = None, exe: list[str] | None = None,
       env_url: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PF_")}
    if env_db is not None:
        env["PF_SANDBOX_DB"] = str(env_db)
    if env_url is not None:
        env["PF_ESCROW_URL"] = env_url
    return subprocess.run(
        [*(exe or [sys.executable, "-m", "pf_metaflow"]), "sandbox", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )


def sandbox_at(path: Path) -> Path:
    """A sandbox database as a first flow run leaves it (payer funded, nothing escrowed)."""
    SandboxEngine(path).check_invariant()
    return path


def test_balance_json_of_a_new_sandbox_under_the_working_directory(tmp_path):
    sandbox_at(tmp_path / ".pf_sandbox" / "escrow.db")
    result = pf("balance", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data == {
        "agents": {"ag_sandbox_payer": {"usdc": "1000000.000000", "locked": "0.000000"},
                   "ag_sandbox_worker": {"usdc": "0.000000", "locked": "0.000000"}},
        "house_fees": "0.000000",
        "minted": "1000000.000000",
    }
    assert (tmp_path / ".pf_sandbox" / "escrow.db").exists()


def test_pf_sandbox_db_chooses_the_file_and_db_overrides_it(tmp_path):
    env_db, flag_db = sandbox_at(tmp_path / "env.db"), sandbox_at(tmp_path / "flag.db")
    chosen = pf("check", cwd=tmp_path, env_db=env_db)
    assert chosen.returncode == 0 and f"sandbox database: {env_db} (from PF_SANDBOX_DB)" in chosen.stderr
    flagged = pf("check", "--db", str(flag_db), cwd=tmp_path, env_db=env_db)
    assert flagged.returncode == 0 and f"sandbox database: {flag_db} (from --db)" in flagged.stderr
    assert not (tmp_path / ".pf_sandbox").exists()


def test_balance_reads_the_database_the_flows_use_from_pf_escrow_url(tmp_path):
    db = tmp_path / "flows.db"
    SandboxEngine(db).claim("ag_sandbox_worker", "7")
    result = pf("balance", "--json", cwd=tmp_path, env_url=f"sandbox://{db}")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["agents"]["ag_sandbox_worker"]["usdc"] == "7.000000"
    assert f"sandbox database: {db} (from PF_ESCROW_URL)" in result.stderr


def test_pf_sandbox_db_and_db_still_override_pf_escrow_url(tmp_path):
    url_db, env_db = sandbox_at(tmp_path / "url.db"), sandbox_at(tmp_path / "env.db")
    result = pf("check", cwd=tmp_path, env_db=env_db, env_url=f"sandbox://{url_db}")
    assert f"sandbox database: {env_db} (from PF_SANDBOX_DB)" in result.stderr
    result = pf("check", "--db", str(url_db), cwd=tmp_path, env_db=env_db, env_url="sandbox:///elsewhere.db")
    assert f"sandbox database: {url_db} (from --db)" in result.stderr


@pytest.mark.parametrize("command", ["balance", "check"])
def test_read_commands_refuse_a_database_that_does_not_exist_and_create_none(tmp_path, command):
    typo = tmp_path / "escrwo.db"
    result = pf(command, "--db", str(typo), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"pf-metaflow sandbox {command}: no sandbox database at {typo} (from --db): nothing has run "
        "against it; check the path, or create it with a flow run or `pf-metaflow sandbox faucet "
        "ag_sandbox_payer`")
    assert not typo.exists() and not (tmp_path / ".pf_sandbox").exists()


def test_register_then_faucet_then_balance(tmp_path):
    db = tmp_path / "escrow.db"
    registered = pf("register", "labeler", "--json", "--db", str(db), cwd=tmp_path)
    assert registered.returncode == 0, registered.stderr
    agent = json.loads(registered.stdout)
    assert SandboxEngine(db).agent_for_key(agent["api_key"]) == agent["agent_id"]

    claimed = pf("faucet", agent["agent_id"], "--amount", "12.5", "--db", str(db), cwd=tmp_path)
    assert claimed.returncode == 0, claimed.stderr
    assert "claimed 12.500000 USDC, balance 12.500000 USDC" in claimed.stdout

    shown = json.loads(pf("balance", "--json", "--db", str(db), cwd=tmp_path).stdout)
    assert shown["agents"][agent["agent_id"]] == {"usdc": "12.500000", "locked": "0.000000"}
    assert shown["minted"] == "1000012.500000"


def test_register_prints_the_key_for_a_person(tmp_path):
    result = pf("register", "labeler", cwd=tmp_path)
    assert result.returncode == 0
    assert "agent_id:      ag_labeler_" in result.stdout
    assert "api_key:       pf_sandbox_" in result.stdout


def test_balance_table_lists_agents_and_totals(tmp_path):
    sandbox_at(tmp_path / ".pf_sandbox" / "escrow.db")
    result = pf("balance", cwd=tmp_path)
    assert result.returncode == 0
    assert "ag_sandbox_payer" in result.stdout
    assert "1000000.000000" in result.stdout
    assert "house fees: 0.000000 USDC" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("faucet", "ag_nobody"), "agent ag_nobody not found"),
    (("faucet", "ag_sandbox_worker", "--amount", "-3"), "must not be negative"),
])
def test_faucet_refusals_exit_1_with_the_reason(tmp_path, args, message):
    result = pf(*args, cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr


def test_check_passes_on_a_healthy_sandbox(tmp_path):
    sandbox_at(tmp_path / ".pf_sandbox" / "escrow.db")
    result = pf("check", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("ok: minted 1000000.000000 USDC all accounted for")


def test_check_fails_with_the_discrepancy_when_money_appeared_from_nowhere(tmp_path):
    db = tmp_path / "escrow.db"
    SandboxEngine(db).check_invariant()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE agents SET usdc = usdc + 5000000 WHERE agent_id = 'ag_sandbox_worker'")
    result = pf("check", "--db", str(db), cwd=tmp_path)
    assert result.returncode == 1
    assert "invariant broken" in result.stderr
    assert "off by -5.000000" in result.stderr


@pytest.mark.parametrize("rate", ["fast", "0/60", "5/0", "5/x"])
def test_serve_refuses_a_malformed_rate(tmp_path, rate):
    result = pf("serve", "--create-rate", rate, cwd=tmp_path)
    assert result.returncode == 2
    assert "N/SECONDS" in result.stderr or "N >= 1" in result.stderr


@pytest.mark.parametrize("flag", ["--create-rate", "--release-rate", "--dispute-rate"])
def test_serve_live_refuses_a_malformed_rate_for_each_limit(tmp_path, flag):
    result = pf("serve", "--live", flag, "20/-1", cwd=tmp_path)
    assert result.returncode == 2
    assert "N >= 1 and SECONDS > 0" in result.stderr


def test_serve_help_describes_live_mode(tmp_path):
    result = pf("serve", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "--live" in result.stdout and "--dispute-rate" in result.stdout
    assert "Retry-After" in result.stdout


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_serve_refuses_a_port_out_of_range(tmp_path, port):
    result = pf("serve", "--port", port, cwd=tmp_path)
    assert result.returncode == 2
    assert "a port is a number from 0 to 65535" in result.stderr


def test_sandbox_without_a_command_shows_usage_and_exits_2(tmp_path):
    result = pf(cwd=tmp_path)
    assert result.returncode == 2
    assert "serve" in result.stderr and "balance" in result.stderr


def test_the_pf_metaflow_console_script_runs_sandbox_commands(tmp_path):
    script = Path(sys.executable).with_name("pf-metaflow")
    if not script.exists():
        pytest.skip("pf-metaflow console script is not installed next to this python")
    sandbox_at(tmp_path / ".pf_sandbox" / "escrow.db")
    result = pf("balance", "--json", cwd=tmp_path, exe=[str(script)])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["minted"] == "1000000.000000"
