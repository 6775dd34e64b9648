"""Benchmark: N shards' creates against a live-like limiter, client and pacing alone.

Starts ``pf-metaflow sandbox serve --live --create-rate LIMIT/WINDOW`` (no Retry-After,
live's fixed window) on a fresh database, then runs ``--shards`` creates from
``--processes`` worker processes at once (each shard a fresh EscrowClient, as each
Metaflow task makes its own; the processes share the run's window through
pf_metaflow.pacing's file). Prints failed creates, 429s (total, per process, beyond one
per process), wall time against the limit's floor ``(ceil(N / LIMIT) - 1) * WINDOW`` and
the money locked (read back from the sandbox). Not a test: nothing here is timed by CI.

    python tests/benchmarks/pacing.py                      # 500 shards, 20 per 1 s, 25 processes
    python tests/benchmarks/pacing.py --shards 100 --rate 20/2 --processes 10
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from decimal import Decimal

AMOUNT = Decimal("1.5")
PAYER_KEY = "pf_sandbox_payer_key"  # the sandbox's built-in test payer (test money)
WORKER = "ag_sandbox_worker"


def _worker(url: str, shards: list, max_wait: float, out) -> None:
    import requests

    from pf_metaflow.client import EscrowClient
    from pf_metaflow.errors import PurpleFleaError

    results = []
    for shard in shards:
        statuses: list = []
        session = requests.Session()
        session.hooks["response"].append(lambda r, *a, _seen=statuses, **k: _seen.append(r.status_code))
        client = EscrowClient(url, PAYER_KEY, max_wait=max_wait, session=session)
        try:
            client.create(AMOUNT, counterparty_agent_id=WORKER, description=f"bench shard {shard}")
            outcome = "paid"
        except PurpleFleaError as exc:
            outcome = f"{type(exc).__name__}: {exc.message}"
        session.close()
        results.append((shard, outcome, statuses.count(429), time.time()))
    out.put((os.getpid(), results))


def serve_live(db, rate: str) -> tuple[subprocess.Popen, str]:
    """`pf-metaflow sandbox serve --live --create-rate RATE` on a free port: (process, URL)."""
    cmd = [sys.executable, "-m", "pf_metaflow", "sandbox", "serve", "--live", "--create-rate", rate,
           "--port", "0", "--db", str(db)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PF_")}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, text=True, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if "serving on " in line:
            return process, line.split("serving on ", 1)[1].split()[0]
    process.kill()
    raise SystemExit("the sandbox server did not start")


def main() -> int:
    import logging

    import requests  # noqa: F401 - loaded once before the fork, as Metaflow's runtime would not need

    import pf_metaflow.client  # noqa: F401

    logging.getLogger("pf_metaflow").setLevel(logging.ERROR)  # the one "waiting" line per shard
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=500)
    parser.add_argument("--rate", default="20/1", help="LIMIT/WINDOW_SECONDS of the live-like limiter")
    parser.add_argument("--processes", type=int, default=25, help="worker processes running at once")
    parser.add_argument("--max-wait", type=float, default=600.0, help="each create's PF_ESCROW_MAX_WAIT")
    args = parser.parse_args()
    limit, window = int(args.rate.split("/")[0]), float(args.rate.split("/")[1])

    workdir = tempfile.mkdtemp(prefix="pf-pacing-bench-")
    os.environ["PF_ESCROW_PACING_DIR"] = os.path.join(workdir, "pacing")  # a fresh shared window
    process, url = serve_live(os.path.join(workdir, "escrow.db"), args.rate)
    try:
        shards = list(range(args.shards))
        chunks = [shards[i::args.processes] for i in range(args.processes)]
        context = multiprocessing.get_context("fork")
        out = context.Queue()
        workers = [context.Process(target=_worker, args=(url, chunk, args.max_wait, out))
                   for chunk in chunks if chunk]
        started = time.time()
        for worker in workers:
            worker.start()
        results = dict(out.get(timeout=args.max_wait + 120) for _ in workers)
        for worker in workers:
            worker.join(timeout=30)
        wall = max(t for rs in results.values() for *_, t in rs) - started

        import requests

        balances = requests.get(f"{url}/sandbox/balances", timeout=10).json()["agents"]
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)

    outcomes = Counter("paid" if o == "paid" else "failed" for rs in results.values() for _, o, _, _ in rs)
    failures = [o for rs in results.values() for _, o, _, _ in rs if o != "paid"]
    refused = {pid: sum(n for *_, n, _ in rs) for pid, rs in results.items()}
    windows = math.ceil(args.shards / limit)
    floor = (windows - 1) * window
    beyond_one = sum(max(n - 1, 0) for n in refused.values())
    locked = Decimal(balances["ag_sandbox_payer"]["locked"])

    print(f"shards {args.shards}, limiter {limit} per {window:g} s (live-like: no Retry-After), "
          f"{len(workers)} worker processes, fresh client per shard")
    print(f"paid {outcomes['paid']}, failed creates {outcomes['failed']}")
    for failure in failures[:5]:
        print(f"  failed: {failure}")
    print(f"429s seen: {sum(refused.values())} in all; per process max {max(refused.values())}; "
          f"beyond one per process: {beyond_one}; budget 'one per window per process': "
          f"{windows * len(workers)}")
    print(f"wall {wall:.2f} s; floor (ceil({args.shards}/{limit}) - 1) x {window:g} s = {floor:.2f} s; "
          f"ratio {wall / floor if floor else float('nan'):.3f}")
    print(f"locked on the sandbox: {locked} USDC = {args.shards} x {AMOUNT}: "
          f"{locked == AMOUNT * outcomes['paid']}")
    return 0 if outcomes["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
