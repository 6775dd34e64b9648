"""``pf-metaflow``: read run ledgers, reconcile runs, drive the sandbox escrow.

    pf-metaflow ledger FLOW/RUN [--json]     what a run paid, refunded and owes
    pf-metaflow ledger FLOW [--json]         the same for the flow's latest run (your namespace)
    pf-metaflow reconcile FLOW/RUN [--dry-run] [--force]
    pf-metaflow reconcile FLOW [...]          the flow's latest run in your namespace
    pf-metaflow sandbox serve|register|faucet|balance|check ...
"""

from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal
from typing import Optional, Sequence

from .errors import PurpleFleaError


# `pf-metaflow reconcile` exit codes (also in its --help).
EXIT_SETTLED = 0  # every escrow of the run was seen, and none is still held
EXIT_OPEN = 1  # escrows are still held: skipped (task may be running), unknown, or not settled
EXIT_USAGE = 2  # usage error, unknown flow or run, configuration error
EXIT_INCOMPLETE = 3  # reading could not prove it saw every paid task: never an all-clear

RECONCILE_EXIT_CODES = f"""\
exit codes:
  {EXIT_SETTLED}  every escrow of the run was seen and is settled (released, refunded,
     or refund_pending: coming back by itself, reported)
  {EXIT_OPEN}  escrows are still held: a task that may still be running was skipped
     (reconcile again once it has ended, or --force), or an escrow could not be
     settled (unknown outcome, disputed, service unreachable); --dry-run: there
     is something to settle
  {EXIT_USAGE}  usage error, unknown flow or run, or a configuration error
  {EXIT_INCOMPLETE}  reading the run could not prove it saw every paid task (listed):
     escrow may be locked in a task this reader cannot see
"""


def _resolve_run(spec: str) -> str:
    """``FLOW/RUN`` names one run, whoever started it; ``FLOW`` alone is its latest run in
    the current namespace (the user's own), as ``Flow(FLOW).latest_run`` resolves it."""
    from .runs import latest_run, readable_namespace

    if "/" in spec:
        return spec
    where = readable_namespace()  # None: Metaflow cannot tell who you are, so anyone's runs
    latest = latest_run(spec)
    if latest is None:
        where = f"namespace {where!r}" if where is not None else "any namespace"
        raise LookupError(f"flow {spec!r} has no runs in {where}; "
                          f"name a run as {spec}/RUN_ID to read one someone else started")
    if where is None:
        print(f"pf-metaflow: Metaflow cannot tell who you are ($METAFLOW_USER is unset, and "
              f"\"root\" is not a user name to it), so this is {spec}'s latest run by anyone: "
              f"{latest}. Set METAFLOW_USER to the name your runs were started with to read only "
              "yours.", file=sys.stderr)
    return latest


def _incomplete_warning(reading) -> str:
    lines = [f"WARNING: could not prove every paid task of {reading.run} was seen; escrow may be "
             "locked in a task this reader cannot see:"]
    lines.extend(f"  - {what}" for what in reading.unseen)
    return "\n".join(lines)


def cmd_ledger(args: argparse.Namespace) -> int:
    from . import ledger as ledger_mod
    from .runs import read_run

    run = _resolve_run(args.run)
    reading = read_run(run)
    if args.json:
        print(json.dumps(reading.to_json(), indent=2))
        if not reading.complete:
            print(_incomplete_warning(reading), file=sys.stderr)
    else:
        print(ledger_mod.format_table(reading.entries, title=f"Ledger of {run}"))
        if reading.found_beyond_client:
            print(f"Read from: {reading.source}")
        if not reading.complete:
            print("\n" + _incomplete_warning(reading))
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from .money import usdc_str
    from .runs import reconcile

    run = _resolve_run(args.run)
    done = reconcile(run, dry_run=args.dry_run, force=args.force)
    if done.reading.found_beyond_client:
        print(f"Read from: {done.reading.source}")
    for action in done.actions:
        print(action.describe(dry_run=args.dry_run))
    for skipped in done.skipped:
        print(skipped.describe())
    acted = {a.after["ref"] for a in done.actions if not args.dry_run}
    for entry in done.refund_pending:
        if entry["ref"] not in acted:
            print(f"{entry.get('escrow_id')} ({entry['step']}/{entry['task']}, {entry['amount_usdc']} USDC) "
                  f"is refund_pending: it comes back to the payer by itself at {entry.get('expected_at')}")
    for entry in done.carried_open:
        print(f"{entry.get('escrow_id') or entry.get('description')} is {entry['status']} but belongs to "
              f"{entry['run']} (carried over by resume): reconcile that run")
    if not done.complete:
        print(_incomplete_warning(done.reading))

    if args.dry_run:
        counted = f"would settle {len(done.actions)} escrow(s)"
    else:
        changed = sum(1 for a in done.actions if a.changed)
        counted = f"settled {changed} escrow(s)"
        if changed < len(done.actions):
            counted += f", {len(done.actions) - changed} unchanged"
    if done.skipped:
        counted += f", skipped {len(done.skipped)} whose task may still be running"
    if done.refund_pending:
        pending = sum((Decimal(e["amount_usdc"]) for e in done.refund_pending), Decimal(0))
        counted += f"; {usdc_str(pending)} USDC refund_pending"
    if not done.complete:
        print(f"{run}: {counted}; NOT settled: {len(done.reading.unseen)} thing(s) could not be seen "
              f"(exit {EXIT_INCOMPLETE})")
        return EXIT_INCOMPLETE
    if done.still_open:
        print(f"{run}: {counted}; {len(done.still_open)} still need attention")
        return EXIT_OPEN
    if not done.actions and not done.refund_pending:
        print(f"{run}: every escrow is settled; nothing to do")
    else:
        print(f"{run}: {counted}; every escrow of the run is settled")
    return EXIT_SETTLED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pf-metaflow",
        description="Purple Flea escrow for Metaflow: ledgers, reconcile, and the sandbox escrow.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("ledger", help="show a run's payments (entries and totals)")
    p.add_argument("run", metavar="FLOW/RUN",
                   help="a run pathspec (any user's run), or a flow name for its latest run in the "
                        "current namespace (your own runs)")
    p.add_argument("--json", action="store_true",
                   help="print JSON (amounts as decimal strings; 'complete' and 'unseen' say whether "
                        "every paid task was seen)")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser(
        "reconcile", help="settle escrows a run left open (killed tasks, aborted runs)",
        description="Settle the escrows a run left open: each is looked up on the service and what\n"
                    "is still held is refunded (refund_pending where the service has no refund).\n"
                    "Escrows of tasks that may still be running (their lease is live) are skipped.",
        epilog=RECONCILE_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="FLOW/RUN",
                   help="a run pathspec (any user's run), or a flow name for its latest run in the "
                        "current namespace (your own runs)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be settled")
    p.add_argument("--force", action="store_true",
                   help="also settle escrows of tasks that may still be running (their step's release "
                        "will then fail): for operators who know the task is gone")
    p.set_defaults(func=cmd_reconcile)

    try:
        from .sandbox.cli import add_sandbox_commands
    except ImportError:  # pragma: no cover - the sandbox ships with the package
        pass
    else:
        add_sandbox_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `pf-metaflow ledger X | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except PurpleFleaError as exc:
        print(f"pf-metaflow: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except LookupError as exc:
        print(f"pf-metaflow: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # metaflow client errors (unknown run, ...) are user errors here
        if type(exc).__module__.startswith("metaflow"):
            print(f"pf-metaflow: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
