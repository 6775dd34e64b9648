"""``pf-metaflow``: read run ledgers, reconcile runs, drive the sandbox escrow.

    pf-metaflow ledger FLOW/RUN [--json]     what a run paid, refunded and owes
    pf-metaflow ledger FLOW [--json]         the same for the flow's latest run
    pf-metaflow reconcile FLOW/RUN [--dry-run]
    pf-metaflow sandbox serve|register|faucet|balance|check ...
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .errors import PurpleFleaError


def _resolve_run(spec: str) -> str:
    from .runs import latest_run

    if "/" in spec:
        return spec
    latest = latest_run(spec)
    if latest is None:
        raise LookupError(f"flow {spec!r} has no runs here")
    return latest


def cmd_ledger(args: argparse.Namespace) -> int:
    from . import ledger as ledger_mod
    from .runs import ledger_of

    run = _resolve_run(args.run)
    entries = ledger_of(run)
    if args.json:
        print(json.dumps(ledger_mod.to_json(run, entries), indent=2))
    else:
        print(ledger_mod.format_table(entries, title=f"Ledger of {run}"))
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from .runs import reconcile

    run = _resolve_run(args.run)
    actions = reconcile(run, dry_run=args.dry_run)
    if not actions:
        print(f"{run}: every escrow is settled; nothing to do")
        return 0
    verb = "would settle" if args.dry_run else "settled"
    for action in actions:
        print(action.describe(dry_run=args.dry_run))
    still_open = [a for a in actions if a.after["status"] in ("locked", "unknown")]
    print(f"{run}: {verb} {len(actions)} escrow(s)"
          + (f"; {len(still_open)} still need attention" if still_open and not args.dry_run else ""))
    return 1 if still_open and not args.dry_run else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pf-metaflow",
        description="Purple Flea escrow for Metaflow: ledgers, reconcile, and the sandbox escrow.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("ledger", help="show a run's payments (entries and totals)")
    p.add_argument("run", metavar="FLOW/RUN", help="a run pathspec, or a flow name for its latest run")
    p.add_argument("--json", action="store_true", help="print JSON (amounts as decimal strings)")
    p.set_defaults(func=cmd_ledger)

    p = sub.add_parser("reconcile", help="settle escrows a run left open (killed tasks, aborted runs)")
    p.add_argument("run", metavar="FLOW/RUN", help="a run pathspec, or a flow name for its latest run")
    p.add_argument("--dry-run", action="store_true", help="only say what would be settled")
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
        return 2
    except LookupError as exc:
        print(f"pf-metaflow: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # metaflow client errors (unknown run, ...) are user errors here
        if type(exc).__module__.startswith("metaflow"):
            print(f"pf-metaflow: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
