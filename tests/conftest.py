"""Shared fixtures.

Every test runs in its own temporary working directory with ``PF_SANDBOX_DB`` pointing
into it and no ``PF_ESCROW_URL`` / ``PF_API_KEY`` / ``PF_REFERRAL_CODE`` from the
developer's shell, so no sandbox file leaks into the repo and no test can reach the
live service by accident.

Sandbox fixtures:

- ``engine``: a :class:`SandboxEngine` on a fresh database file.
- ``clock`` / ``clocked_engine``: a fake clock (``clock.advance(hours=25)``) and an
  engine on it, to make escrows time out.
- ``start_sandbox_server``: a factory, ``start_sandbox_server(db, "--no-refund", ...)``
  -> :class:`SandboxServer` (``.url``, ``.db``) running ``python -m pf_metaflow sandbox
  serve --port 0`` as a subprocess, terminated at the end of the test.
- ``sandbox_server``: one such server per test module (its own database).
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from pf_metaflow.sandbox.engine import SandboxEngine

# The distributed tier's fixtures (``topo``: one running topology per module).
pytest_plugins = ["distributed.fixtures"]

_PF_ENV = ("PF_ESCROW_URL", "PF_API_KEY", "PF_REFERRAL_CODE")


class _FaultMatrixTables:
    """Prints tests/test_fault_matrix.py's tables at the end of a run that ran any of its cells.

    Registered here rather than by that module: under ``pytest -n`` the cells run in worker
    processes, whose terminal summary nobody sees, while the controller that prints the summary
    receives every cell's report (with its ``paid`` property) but imports no test module.
    """

    def __init__(self) -> None:
        self._report = None

    def pytest_runtest_logreport(self, report) -> None:
        if "test_fault_matrix.py::test_cell[" not in report.nodeid:
            return
        if self._report is None:
            from test_fault_matrix import MatrixReport

            self._report = MatrixReport()
        self._report.pytest_runtest_logreport(report)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self._report is not None:
            self._report.pytest_terminal_summary(terminalreporter)


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # not a pytest-xdist worker
        config.pluginmanager.register(_FaultMatrixTables(), "pf_fault_matrix")


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PF_SANDBOX_DB", str(tmp_path / ".pf_sandbox" / "escrow.db"))
    for name in _PF_ENV:
        monkeypatch.delenv(name, raising=False)
    # Rate-limit windows learned by one test's clients never pace another test's.
    monkeypatch.setenv("PF_ESCROW_PACING_DIR", str(tmp_path / ".pf_pacing"))
    return tmp_path


@pytest.fixture
def engine(tmp_path: Path) -> SandboxEngine:
    return SandboxEngine(tmp_path / "escrow.db")


class FakeClock:
    """Seconds since the epoch that only move when a test says so."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, *, hours: float = 0, seconds: float = 0) -> None:
        self.now += hours * 3600 + seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked_engine(tmp_path: Path, clock: FakeClock) -> SandboxEngine:
    return SandboxEngine(tmp_path / "clocked.db", clock=clock)


@dataclass
class SandboxServer:
    url: str
    db: Path
    process: subprocess.Popen


def _server_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _PF_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextmanager
def running_sandbox_server(
    db: Path, *flags: str, command: list[str] | None = None, timeout: float = 30.0
) -> Iterator[SandboxServer]:
    """``pf-metaflow sandbox serve --port 0 --db DB FLAGS`` until the block ends.

    ``command`` replaces the whole command line (it must print the "serving on URL" line).
    """
    db = Path(db)
    db.parent.mkdir(parents=True, exist_ok=True)
    cmd = command or [sys.executable, "-m", "pf_metaflow", "sandbox", "serve", "--port", "0",
                      "--db", str(db), *flags]
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True,
            cwd=str(db.parent), env=_server_env(),
        )
        try:
            url = _read_url(process, timeout)
            if url is None:
                stderr.seek(0)
                raise RuntimeError(
                    f"sandbox server did not start: {' '.join(cmd)}\n{stderr.read()}"
                )
            yield SandboxServer(url=url, db=db, process=process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


def _read_url(process: subprocess.Popen, timeout: float) -> str | None:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not selector.select(timeout=deadline - time.monotonic()):
                continue
            line = process.stdout.readline()
            if not line:  # exited
                return None
            if "serving on " in line:
                return line.split("serving on ", 1)[1].split()[0]
        return None
    finally:
        selector.close()


@pytest.fixture
def start_sandbox_server():
    """A factory: ``start_sandbox_server(db, *flags) -> SandboxServer``; all stopped after."""
    stack = []

    def start(db: Path, *flags: str, command: list[str] | None = None) -> SandboxServer:
        manager = running_sandbox_server(db, *flags, command=command)
        server = manager.__enter__()
        stack.append(manager)
        return server

    yield start
    while stack:
        stack.pop().__exit__(None, None, None)


@pytest.fixture(scope="module")
def sandbox_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    """One sandbox server (all extensions on) for a whole test module."""
    db = tmp_path_factory.mktemp("sandbox_server") / "escrow.db"
    with running_sandbox_server(db) as server:
        yield server
