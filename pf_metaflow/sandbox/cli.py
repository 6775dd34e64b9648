"""``pf-metaflow sandbox …``: run and inspect the local sandbox escrow.

Commands: ``serve``, ``register NAME``, ``faucet AGENT``, ``balance``, ``check``. Each
reads the same database the flows use: ``--db PATH``, else ``$PF_SANDBOX_DB``, else the
path in ``PF_ESCROW_URL=sandbox:///PATH``, else ``./.pf_sandbox/escrow.db``; it says
which (on stderr) and returns an exit code. The read commands (``balance``, ``check``)
refuse a database that does not exist rather than create an empty one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from ..errors import PurpleFleaError
from ..money import usdc_str
from .engine import SandboxEngine


def _rate(text: str) -> tuple[int, float]:
    """``N/SECONDS`` (e.g. ``20/60``) -> (20, 60.0)."""
    count, sep, seconds = text.partition("/")
    try:
        rate = (int(count), float(seconds if sep else "60"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected N/SECONDS such as 20/60, got {text!r}"
        ) from None
    if rate[0] < 1 or not rate[1] > 0:
        raise argparse.ArgumentTypeError(f"expected N >= 1 and SECONDS > 0, got {text!r}")
    return rate


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {text!r}")
    return port


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return number


def add_sandbox_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``sandbox`` and its subcommands; each sets ``func(args) -> int``."""
    db_option = argparse.ArgumentParser(add_help=False)
    db_option.add_argument(
        "--db", metavar="PATH",
        help="sandbox database file (default: $PF_SANDBOX_DB, else the path in "
             "PF_ESCROW_URL=sandbox:///PATH, else ./.pf_sandbox/escrow.db)",
    )
    sandbox = subparsers.add_parser(
        "sandbox", help="run and inspect the local sandbox escrow",
        description="The local sandbox escrow: Purple Flea's rules on a SQLite file, test money.",
    )
    sandbox.set_defaults(func=lambda args: _usage(sandbox))
    commands = sandbox.add_subparsers(dest="sandbox_command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve", parents=[db_option], help="serve the sandbox escrow over HTTP",
        description="Serve the live escrow wire protocol plus sandbox extensions on HOST:PORT "
                    "(with --live: like the live service, extensions and rate limits included).",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8765,
                       help="default 8765; 0 picks a free port (printed)")
    serve.add_argument(
        "--live", action="store_true",
        help="behave like the live service: --no-refund --no-idempotency plus live's rate "
             "limits (fixed windows keyed on the path and the first X-Forwarded-For, else "
             "X-Real-IP, else one shared bucket; creates 20/60 per client, release and "
             "complete 30/60 and dispute 10/60 per escrow; 429 without Retry-After)")
    serve.add_argument("--no-idempotency", action="store_true",
                       help="ignore Idempotency-Key headers, as the live service does")
    serve.add_argument("--no-refund", action="store_true",
                       help="no POST /escrow/refund/{id}, as the live service")
    serve.add_argument("--create-rate", type=_rate, metavar="N/SECONDS",
                       help="limit creates per client address (live: 20/60, the default "
                            "with --live)")
    serve.add_argument("--release-rate", type=_rate, metavar="N/SECONDS",
                       help="limit releases and refunds per client address; with --live, "
                            "release and complete per escrow path (live: 30/60)")
    serve.add_argument("--dispute-rate", type=_rate, metavar="N/SECONDS",
                       help="limit disputes per client address; with --live, per escrow "
                            "path (live: 10/60)")
    serve.add_argument("--max-connections", type=_positive, default=256, metavar="N",
                       help="open connections at once; more are answered 503 (default 256)")
    serve.add_argument("--workers", type=_positive, default=8, metavar="N",
                       help="threads running escrow operations (default 8)")
    serve.add_argument("--request-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="seconds a request's headers, and then its body, may take to "
                            "arrive; slower clients get 408 and are closed (default 10)")
    serve.set_defaults(func=cmd_serve)

    register = commands.add_parser(
        "register", parents=[db_option], help="register an agent and print its sandbox key",
    )
    register.add_argument("name")
    register.add_argument("--json", action="store_true", help="print JSON")
    register.set_defaults(func=cmd_register)

    faucet = commands.add_parser(
        "faucet", parents=[db_option], help="give an agent free test USDC",
    )
    faucet.add_argument("agent", metavar="AGENT")
    faucet.add_argument("--amount", help="USDC to claim (default 100)")
    faucet.set_defaults(func=cmd_faucet)

    balance = commands.add_parser(
        "balance", parents=[db_option], help="every agent's balance, locked funds, house fees",
    )
    balance.add_argument("--json", action="store_true", help="print JSON (amounts as strings)")
    balance.set_defaults(func=cmd_balance)

    check = commands.add_parser(
        "check", parents=[db_option], help="verify minted == balances + locked + house fees",
    )
    check.set_defaults(func=cmd_check)
    return sandbox


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


class NoDatabase(Exception):
    """A read command was pointed at a sandbox database that does not exist."""


def database(args: argparse.Namespace) -> tuple[Path, str]:
    """The sandbox database and where its name came from, in the order the user overrides."""
    if args.db:
        return Path(args.db).expanduser().absolute(), "--db"
    if os.environ.get("PF_SANDBOX_DB"):
        return Path(os.environ["PF_SANDBOX_DB"]).expanduser().absolute(), "PF_SANDBOX_DB"
    url = os.environ.get("PF_ESCROW_URL", "").strip()
    if url.lower().startswith("sandbox:") and url[len("sandbox:"):].strip("/"):
        from .._embedded import sandbox_path

        return Path(sandbox_path(url)), "PF_ESCROW_URL"
    return Path(SandboxEngine.default_path()).absolute(), "default"


def _engine(args: argparse.Namespace, *, read: bool = False) -> SandboxEngine:
    path, source = database(args)
    if read and not path.exists():
        raise NoDatabase(
            f"no sandbox database at {path} (from {source}): nothing has run against it; check "
            "the path, or create it with a flow run or `pf-metaflow sandbox faucet ag_sandbox_payer`"
        )
    print(f"sandbox database: {path} (from {source})", file=sys.stderr)
    return SandboxEngine(path)


def cmd_serve(args: argparse.Namespace) -> int:
    from .hosting import Limits
    from .server import serve

    if not args.request_timeout > 0:
        print("pf-metaflow sandbox serve: --request-timeout must be more than 0", file=sys.stderr)
        return 2
    path, source = database(args)
    print(f"sandbox database: {path} (from {source})", file=sys.stderr)
    serve(
        args.host, args.port, str(path),
        idempotency=not (args.no_idempotency or args.live),
        refunds=not (args.no_refund or args.live),
        create_rate=args.create_rate,
        release_rate=args.release_rate,
        dispute_rate=args.dispute_rate,
        live=args.live,
        limits=Limits(max_connections=args.max_connections, workers=args.workers,
                      header_timeout=args.request_timeout, body_timeout=args.request_timeout),
    )
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    try:
        agent = _engine(args).register(args.name)
    except PurpleFleaError as exc:
        print(f"pf-metaflow sandbox register: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(agent))
    else:
        print(f"agent_id:      {agent['agent_id']}")
        print(f"api_key:       {agent['api_key']}   (sandbox key: local test money only)")
        print(f"referral_code: {agent['referral_code']}")
    return 0


def cmd_faucet(args: argparse.Namespace) -> int:
    try:
        claim = _engine(args).claim(args.agent, args.amount)
    except PurpleFleaError as exc:
        print(f"pf-metaflow sandbox faucet: {exc.message}", file=sys.stderr)
        return 1
    print(f"{claim['agent_id']}: claimed {usdc_str(claim['claimed'])} USDC, "
          f"balance {usdc_str(claim['balance'])} USDC")
    return 0


def cmd_balance(args: argparse.Namespace) -> int:
    from .server import balances_json

    try:
        engine = _engine(args, read=True)
    except NoDatabase as exc:
        print(f"pf-metaflow sandbox balance: {exc}", file=sys.stderr)
        return 1
    balances = balances_json(engine.balances())
    if args.json:
        print(json.dumps(balances, indent=2))
        return 0
    width = max([len(a) for a in balances["agents"]] + [5])
    print(f"{'agent':<{width}}  {'usdc':>20}  {'locked':>20}")
    for agent, b in balances["agents"].items():
        print(f"{agent:<{width}}  {b['usdc']:>20}  {b['locked']:>20}")
    print(f"house fees: {balances['house_fees']} USDC   minted: {balances['minted']} USDC")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        engine = _engine(args, read=True)
    except NoDatabase as exc:
        print(f"pf-metaflow sandbox check: {exc}", file=sys.stderr)
        return 1
    try:
        engine.check_invariant()
    except AssertionError as exc:
        print(f"pf-metaflow sandbox check: {exc}", file=sys.stderr)
        return 1
    totals = engine.balances()
    print(f"ok: minted {usdc_str(totals['minted'])} USDC all accounted for "
          f"(house fees {usdc_str(totals['house_fees'])} USDC) in {engine.path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m pf_metaflow.sandbox.cli``: the sandbox commands alone."""
    parser = argparse.ArgumentParser(prog="pf-metaflow")
    add_sandbox_commands(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
