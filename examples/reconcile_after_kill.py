"""Settle the escrow a killed run left locked, with `pf-metaflow reconcile`.

    python examples/reconcile_after_kill.py

Starts `long_job.py`, waits until its paid step has locked its escrow, kills the
whole run (SIGKILL, as a lost machine or an OOM kill would), then runs what you
would run by hand:

    pf-metaflow ledger LongJobFlow                 # the escrow: still locked
    pf-metaflow reconcile LongJobFlow --dry-run    # what would be settled
    pf-metaflow reconcile LongJobFlow              # refund it
    pf-metaflow ledger LongJobFlow                 # refunded, with the reason

Nothing in a killed run is left to release or refund its escrow, but its id was
written to the task's metadata before the step began, which is where reconcile
finds it. On the live service (no refund call) reconcile marks it
`refund_pending`: it comes back by itself after its timeout, less 1%. A killed
*attempt* of a step with `@retry` or `@catch` needs none of this: the next attempt
settles it before locking anything new.
"""

import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

LONG_JOB = Path(__file__).with_name("long_job.py")


def pf_metaflow(*args: str, show: bool = True) -> subprocess.CompletedProcess:
    if show:
        print(f"$ pf-metaflow {' '.join(args)}", flush=True)
    out = subprocess.run([sys.executable, "-m", "pf_metaflow", *args], capture_output=True, text=True)
    if show:
        print(out.stdout + out.stderr, flush=True)
    return out


def locked() -> Decimal:
    """USDC the sandbox payer has locked in escrow right now (none before the first run
    has created the sandbox database: `sandbox balance` refuses a database that does not exist)."""
    out = pf_metaflow("sandbox", "balance", "--json", show=False)
    if out.returncode != 0 and "no sandbox database" in out.stderr:
        return Decimal(0)
    balances = json.loads(out.stdout)
    return Decimal(balances["agents"].get("ag_sandbox_payer", {}).get("locked", "0"))


def main() -> None:
    before = locked()
    run = subprocess.Popen([sys.executable, str(LONG_JOB), "run", "--seconds", "120"],
                           start_new_session=True)  # its own process group, killed whole below
    try:
        deadline = time.monotonic() + 120
        while locked() == before:
            if run.poll() is not None or time.monotonic() > deadline:
                sys.exit("the run ended before its escrow was locked")
            time.sleep(0.5)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    print(f"\nrun killed with {locked() - before} USDC locked in escrow\n", flush=True)

    pf_metaflow("ledger", "LongJobFlow")
    pf_metaflow("reconcile", "LongJobFlow", "--dry-run")
    pf_metaflow("reconcile", "LongJobFlow")
    pf_metaflow("ledger", "LongJobFlow")
    print(f"locked in escrow now: {locked() - before} USDC")


if __name__ == "__main__":
    main()
