"""Benchmark: ``flows/batch_shards.py`` under a live-like create limit, against its floor.

Starts ``pf-metaflow sandbox serve --live --create-rate LIMIT/WINDOW`` (no Retry-After,
live's fixed window) on a fresh database, runs ``batch_shards.py --num_shards N`` against it
for real (Metaflow, local runtime, ``--max-workers``), and reads the money back from the
sandbox. Then runs the same flow *without escrow* (the same file with ``@pf_escrow_step``
taken out, so the same steps, shards and workload) to measure Metaflow's own time.

Prints: shards paid / unpaid, escrows created on the sandbox, wall times, and the ratio

    wall(with escrow, rate limited) / (floor + wall(without escrow))

where floor = (ceil(N / LIMIT) - 1) * WINDOW is the least time the limit allows. Issue 10's
target is a ratio within 1.3. Not a test: nothing here is timed by CI.

    python tests/benchmarks/rate_limited_shards.py                   # 24 shards, 5 per 6 s, 16 workers
    python tests/benchmarks/rate_limited_shards.py --shards 48 --rate 10/6 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import requests
from pacing import serve_live  # the live-like sandbox server, started the same way as there

REPO = Path(__file__).resolve().parents[2]
FLOWS = REPO / "flows"
PAYER_KEY = "pf_sandbox_payer_key"  # the sandbox's built-in test payer (test money)
DECORATOR_LINE = '    @pf_escrow_step(agent_wallet="agent_wallet")\n'


def without_escrow(workdir: Path) -> Path:
    """batch_shards.py with @pf_escrow_step removed (and an empty ledger, which the decorator
    would otherwise provide): the same flow, shards and work, no escrow at all."""
    source = (FLOWS / "batch_shards.py").read_text()
    assert source.count(DECORATOR_LINE) == 1, "batch_shards.py changed: update this benchmark"
    source = source.replace(DECORATOR_LINE, "")
    marker = "        self.shards = list(range(self.num_shards))\n"
    assert source.count(marker) == 1, "batch_shards.py changed: update this benchmark"
    source = source.replace(marker, marker + "        self.pf_ledger = []\n")
    marker = "        shards = list(inputs)\n"  # a join sees no artifact its inputs did not merge
    assert source.count(marker) == 1, "batch_shards.py changed: update this benchmark"
    source = source.replace(marker, marker + "        self.pf_ledger = []\n")
    path = workdir / "batch_shards_no_escrow.py"
    path.write_text(source)
    return path


def run_flow(flow: Path, workdir: Path, shards: int, workers: int, rows: int,
             env_extra: dict) -> tuple[float, subprocess.CompletedProcess, str]:
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    run_id_file = run_dir / "run-id"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "METAFLOW_"))}
    env.update(METAFLOW_USER="pf-bench", METAFLOW_DEFAULT_METADATA="local",
               METAFLOW_DEFAULT_DATASTORE="local", PYTHONUNBUFFERED="1",
               PF_SANDBOX_DB=str(run_dir / "embedded.db"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(FLOWS), os.environ.get("PYTHONPATH")])),
               **env_extra)
    cmd = [sys.executable, str(flow), "--no-pylint", "run", "--run-id-file", str(run_id_file),
           "--num_shards", str(shards), "--total_budget_usdc", f"{shards}.00", "--rows_per_shard", str(rows),
           "--max-workers", str(workers)]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - started
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else ""
    return wall, proc, f"{run_dir}::{run_id}"


def ledger_of(where: str, url: str) -> dict:
    run_dir, run_id = where.split("::")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "METAFLOW_"))}
    env.update(METAFLOW_USER="pf-bench", PF_ESCROW_URL=url, PF_API_KEY=PAYER_KEY)
    out = subprocess.run([sys.executable, "-m", "pf_metaflow", "ledger", f"BatchShardsFlow/{run_id}", "--json"],
                         cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise SystemExit(f"pf-metaflow ledger failed: {out.stderr}")
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--rate", default="5/6", help="LIMIT/WINDOW_SECONDS of the live-like create limiter")
    parser.add_argument("--workers", type=int, default=16, help="Metaflow --max-workers")
    parser.add_argument("--rows", type=int, default=250, help="--rows_per_shard (the shards' own work)")
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs; medians are reported")
    args = parser.parse_args()
    limit, window = int(args.rate.split("/")[0]), float(args.rate.split("/")[1])
    floor = (math.ceil(args.shards / limit) - 1) * window

    workdir = Path(tempfile.mkdtemp(prefix="pf-ratelimit-bench-"))
    plain = without_escrow(workdir)
    with_walls, plain_walls, failures = [], [], 0
    try:
        for n in range(args.repeat):
            process, url = serve_live(workdir / f"escrow{n}.db", args.rate)
            try:
                wall, proc, where = run_flow(FLOWS / "batch_shards.py", workdir, args.shards, args.workers,
                                             args.rows, {"PF_ESCROW_URL": url, "PF_API_KEY": PAYER_KEY})
                if proc.returncode:
                    failures += 1
                    print(f"run {n}: the paid run exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                          f"{proc.stderr[-3000:]}")
                ledger = ledger_of(where, url)
                stats = requests.get(f"{url}/escrow/stats", timeout=10).json()
                payer = requests.get(f"{url}/sandbox/balances", timeout=10).json()["agents"]["ag_sandbox_payer"]
            finally:
                process.terminate()
                process.wait(timeout=10)
            statuses = [e["status"] for e in ledger["entries"]]
            waits = len(re.findall(r"waiting for the escrow service's rate limit", proc.stdout + proc.stderr))
            print(f"run {n}: {statuses.count('released')} of {args.shards} shards paid, "
                  f"{statuses.count('not_created')} unpaid, {stats['total_created']} escrows created; "
                  f"released {ledger['totals']['released']} USDC; payer locked {Decimal(payer['locked'])} USDC; "
                  f"{waits} 'waiting for the rate limit' lines; wall {wall:.1f} s")
            with_walls.append(wall)
            wall_plain, proc_plain, _ = run_flow(plain, workdir, args.shards, args.workers, args.rows, {})
            if proc_plain.returncode:
                raise SystemExit(f"the run without escrow failed:\n{proc_plain.stderr[-3000:]}")
            print(f"run {n}: same flow without escrow: wall {wall_plain:.1f} s")
            plain_walls.append(wall_plain)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    w, p = statistics.median(with_walls), statistics.median(plain_walls)
    print()
    print(f"batch_shards.py, {args.shards} shards, --max-workers {args.workers}, {args.rows} rows per shard; "
          f"sandbox serve --live --create-rate {args.rate} (no Retry-After)")
    print(f"floor: (ceil({args.shards}/{limit}) - 1) x {window:g} s = {floor:.1f} s")
    print(f"with escrow, rate limited:   {w:.1f} s (median of {len(with_walls)})")
    print(f"without escrow (Metaflow):   {p:.1f} s (median of {len(plain_walls)})")
    print(f"ratio wall / (floor + Metaflow's own) = {w:.1f} / ({floor:.1f} + {p:.1f}) = {w / (floor + p):.3f}"
          f"  (target <= 1.3: {'met' if w / (floor + p) <= 1.3 else 'NOT met'})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
