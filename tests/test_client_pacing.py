"""Creates paced to a live-like rate limit: ``pf-metaflow sandbox serve --live``.

Live's limiter (docs/design.md, "Rate limits"): a fixed window opening with the first request,
counting every request, 429 ``{"error": "rate_limited", "message": "Too many requests.
Limit: N per Ss"}`` and no ``Retry-After``. The client waits for the window the message
names (:mod:`pf_metaflow.retries`), and the processes sharing a URL and key share one
window through a small locked file (:mod:`pf_metaflow.pacing`), so a burst costs about one
429 per process (the one that teaches the limit) and ``ceil(N / limit) - 1`` windows.

Every request goes to 127.0.0.1, windows are 1 to 2 s, and every loop is bounded.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import threading
import time
from decimal import Decimal

import pytest
import requests

from pf_metaflow.client import EscrowClient
from pf_metaflow.errors import RateLimited
from pf_metaflow.pacing import Pacer, parse_limit
from pf_metaflow.sandbox.engine import PAYER_KEY, SandboxEngine

D = Decimal
AMOUNT = D("1.5")
PAYER = "ag_sandbox_payer"
WORKER = "ag_sandbox_worker"
MINTED = D("1000000")


@pytest.fixture(autouse=True)
def _own_pacing_dir(monkeypatch, tmp_path) -> str:
    directory = str(tmp_path / "pacing")
    monkeypatch.setenv("PF_ESCROW_PACING_DIR", directory)
    return directory


@pytest.fixture
def live(start_sandbox_server, tmp_path):
    count = iter(range(100))

    def start(*flags: str):
        return start_sandbox_server(tmp_path / f"live{next(count)}.db", "--live", *flags)

    return start


def counting_session() -> tuple[requests.Session, list]:
    """A session that records every status code it receives."""
    statuses: list = []
    session = requests.Session()
    session.hooks["response"].append(lambda response, *a, **k: statuses.append(response.status_code))
    return session, statuses


def assert_locked(server, escrows: int) -> None:
    """Only ``escrows`` creates locked money: a 429 or a create never sent moved nothing."""
    balances = requests.get(f"{server.url}/sandbox/balances", timeout=10).json()
    locked = AMOUNT * escrows
    assert balances["agents"][PAYER] == {"usdc": f"{MINTED - locked:.6f}", "locked": f"{locked:.6f}"}
    SandboxEngine(server.db).check_invariant()


def _shards(url: str, shards: int, max_wait: float, out) -> None:
    """One worker process: ``shards`` tasks one after another, each with its own client
    (as each Metaflow task makes its own), sharing the run's window with the others."""
    results = []
    for n in range(shards):
        session, statuses = counting_session()
        client = EscrowClient(url, PAYER_KEY, max_wait=max_wait, session=session)
        try:
            client.create(AMOUNT, counterparty_agent_id=WORKER, description=f"shard {os.getpid()}-{n}")
            outcome = "paid"
        except RateLimited as exc:
            outcome = exc.message
        results.append((outcome, statuses.count(429), time.time()))
    out.put((os.getpid(), results))


def burst(url: str, processes: int, per_process: int, max_wait: float = 60.0):
    """``processes`` worker processes at once; their results and the wall time."""
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    workers = [context.Process(target=_shards, args=(url, per_process, max_wait, out))
               for _ in range(processes)]
    started = time.time()
    for worker in workers:
        worker.start()
    results = dict(out.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    return results, max(t for rs in results.values() for _, _, t in rs) - started


# --------------------------------------------------------------------------- a burst of shards


def test_a_burst_from_several_processes_is_paid_in_full_near_the_floor(live):
    limit, window = 5, 2.0
    server = live("--create-rate", f"{limit}/{window:g}")
    processes, per_process = 4, 5
    creates = processes * per_process
    results, wall = burst(server.url, processes, per_process)

    outcomes = [outcome for rs in results.values() for outcome, _, _ in rs]
    assert outcomes == ["paid"] * creates
    windows = math.ceil(creates / limit)
    floor = (windows - 1) * window
    refused = {pid: sum(n for _, n, _ in rs) for pid, rs in results.items()}
    # At most about one 429 per window per process; in practice one per process, in the
    # first window (it teaches the limit), and none after.
    assert sum(refused.values()) <= processes * windows
    assert all(n <= windows for n in refused.values())
    assert floor - 0.5 <= wall <= floor * 1.3 + 2.5, (wall, floor)
    assert_locked(server, creates)


def test_after_the_first_429_teaches_the_limit_the_file_paces_without_another(live, _own_pacing_dir):
    server = live("--create-rate", "3/1.5")
    session, statuses = counting_session()
    client = EscrowClient(server.url, PAYER_KEY, max_wait=30, session=session)
    started = time.time()
    for n in range(9):
        client.create(AMOUNT, counterparty_agent_id=WORKER, description=f"seq {n}")
    wall = time.time() - started
    assert statuses.count(429) == 1  # the 4th create learnt "3 per 1.5s"; none after
    assert 2 * 1.5 - 0.3 <= wall <= 2 * 1.5 * 1.3 + 1.5
    # The shared file holds the learnt limit and never the key (nor the URL).
    files = os.listdir(_own_pacing_dir)
    assert len(files) == 1
    text = open(os.path.join(_own_pacing_dir, files[0])).read()
    state = json.loads(text)
    assert (state["limit"], state["window"]) == (3, 1.5)
    assert PAYER_KEY not in text and PAYER_KEY not in files[0] and server.url not in text
    assert_locked(server, 9)


# --------------------------------------------------------------------------- the wait bound


def test_a_wait_beyond_max_wait_raises_rate_limited_and_locks_nothing(live):
    server = live("--create-rate", "2/30")
    client = EscrowClient(server.url, PAYER_KEY, max_wait=2)
    for n in range(2):
        client.create(AMOUNT, counterparty_agent_id=WORKER, description=f"ok {n}")
    started = time.time()
    with pytest.raises(RateLimited) as refused:
        client.create(AMOUNT, counterparty_agent_id=WORKER, description="one too many")
    message = refused.value.message
    assert "2 per 30 s" in message and "PF_ESCROW_MAX_WAIT (2 s)" in message
    assert "refused with HTTP 429, so it was never processed" in message
    assert "nothing was created and nothing is locked" in message
    assert PAYER_KEY not in message and PAYER_KEY not in repr(refused.value)
    # A second task sharing the window does not even send: it knows the window is full.
    session, statuses = counting_session()
    other = EscrowClient(server.url, PAYER_KEY, max_wait=2, session=session)
    with pytest.raises(RateLimited) as unsent:
        other.create(AMOUNT, counterparty_agent_id=WORKER, description="another")
    assert "it was not sent, so it was never processed" in unsent.value.message
    assert statuses == []
    assert time.time() - started < 2
    assert_locked(server, 2)


# --------------------------------------------------------------------------- one log line


def test_a_task_waiting_several_windows_logs_one_line(live, caplog):
    server = live("--create-rate", "1/1")
    caplog.set_level(logging.INFO, logger="pf_metaflow")
    errors: list = []

    def task(n: int) -> None:
        try:
            EscrowClient(server.url, PAYER_KEY, max_wait=30).create(
                AMOUNT, counterparty_agent_id=WORKER, description=f"thread {n}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=task, args=(n,), name=f"task{n}") for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    waiting = [r for r in caplog.records if "rate limit" in r.getMessage()]
    by_thread: dict = {}
    for record in waiting:
        by_thread[record.threadName] = by_thread.get(record.threadName, 0) + 1
    assert 1 <= len(by_thread) <= 4 and set(by_thread.values()) == {1}  # one line per task
    assert all("until" in r.getMessage() and "PF_ESCROW_MAX_WAIT" in r.getMessage()
               for r in waiting)
    assert not [r for r in caplog.records if "attempt" in r.getMessage()]  # no per-attempt lines
    assert_locked(server, 4)


# --------------------------------------------------------------------------- unit


def test_the_limit_is_read_from_lives_message():
    assert parse_limit("Too many requests. Limit: 20 per 60s") == (20, 60.0)
    assert parse_limit("Too many requests. Limit: 5 per 2.5s") == (5, 2.5)
    assert parse_limit("slow down") == (None, None)
    assert parse_limit(None) == (None, None)


def test_the_shared_file_is_named_by_a_hash_and_a_full_window_makes_others_wait(tmp_path):
    key = "pf_live_secretKEY_0123456789"
    pacer = Pacer("https://escrow.purpleflea.com", key, directory=str(tmp_path))
    assert key not in pacer.path and key not in repr(pacer)
    now = 1000.0
    assert pacer.reserve(now)[0] is None  # limit unknown: send
    pacer.refused(now + 0.1, "Too many requests. Limit: 1 per 10s")
    until, limit, window = pacer.reserve(now + 0.2)
    assert (limit, window) == (1, 10.0) and 10 <= until - now <= 10.5
    assert pacer.reserve(until)[0] is None  # the next window
    assert pacer.reserve(until + 0.01)[0] is not None  # ... and it is full again
    other = Pacer("https://escrow.purpleflea.com", "pf_live_otherKEY_0123456789", directory=str(tmp_path))
    assert other.reserve(until + 0.01)[0] is None  # another key: another window
