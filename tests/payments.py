"""Checking what a flow run paid, three ways: the ledger, the sandbox balances, the Metaflow client.

Used by the end-to-end tests of the shipped flows and examples. Each workspace has
a fresh sandbox, so before a run the payer holds exactly what was minted for it and
the worker holds nothing: every balance afterwards is the run's doing.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Mapping, Optional

from mfrun import FlowRun, Workspace

PAYER, WORKER = "ag_sandbox_payer", "ag_sandbox_worker"
MINTED = Decimal("1000000")
MICRO = Decimal("0.000001")


def fee(amount: Decimal) -> Decimal:
    """Purple Flea's release fee, computed here independently: 1% rounded half-up to 6 places."""
    return (amount * Decimal("0.01")).quantize(MICRO, rounding=ROUND_HALF_UP)


def ran(ws: Workspace, flow: str, *args: str) -> FlowRun:
    run = ws.run_flow(flow, *args)
    assert run.returncode == 0, run.output
    return run


def by_key(ledger: Mapping) -> dict[str, dict]:
    """Ledger entries keyed by step, or ``step[i]`` inside a foreach."""
    entries = {e["shard"] or e["step"]: e for e in ledger["entries"]}
    assert len(entries) == len(ledger["entries"]), "one escrow per step or shard"
    return entries


def assert_paid_exactly(ws: Workspace, run: FlowRun, released: Mapping[str, str],
                        refunded: Optional[Mapping[str, str]] = None) -> dict:
    """The run's escrows are exactly ``released`` and ``refunded`` (key -> USDC), and the
    sandbox balances moved by exactly the released amounts. Returns the ledger JSON."""
    released = {k: Decimal(v) for k, v in released.items()}
    refunded = {k: Decimal(v) for k, v in (refunded or {}).items()}
    ledger = ws.ledger(run.pathspec)
    entries = by_key(ledger)

    assert {k: e["status"] for k, e in entries.items()} == {
        **{k: "released" for k in released}, **{k: "refunded" for k in refunded}}
    for key, amount in {**released, **refunded}.items():
        assert Decimal(entries[key]["amount_usdc"]) == amount, key
        assert entries[key]["escrow_id"].startswith("esc_")
    for key, amount in released.items():
        assert Decimal(entries[key]["fee_usdc"]) == fee(amount), key
        assert Decimal(entries[key]["net_usdc"]) == amount - fee(amount), key
    for key in refunded:
        assert Decimal(entries[key]["fee_usdc"]) == 0 and Decimal(entries[key]["net_usdc"]) == 0, key

    paid = sum(released.values(), Decimal(0))
    fees = sum((fee(a) for a in released.values()), Decimal(0))
    totals = {k: Decimal(v) for k, v in ledger["totals"].items()}
    assert totals["released"] == paid and totals["refunded"] == sum(refunded.values(), Decimal(0))
    assert totals["fees"] == fees and totals["net_paid"] == paid - fees
    assert totals["locked"] == totals["refund_pending"] == totals["unknown"] == 0

    balances = ws.balances()
    agents = balances["agents"]
    payer = agents.get(PAYER, {"usdc": MINTED, "locked": Decimal(0)})
    assert payer["usdc"] == MINTED - paid, "refunds net to zero; only releases leave the payer"
    assert payer["locked"] == 0
    assert agents.get(WORKER, {"usdc": Decimal(0)})["usdc"] == paid - fees
    assert balances["house_fees"] == fees
    ws.engine().check_invariant()
    return ledger


def assert_client_agrees(ws: Workspace, run: FlowRun, ledger: Mapping):
    """The run's artifacts (read with the Metaflow client) hold the same escrows as the ledger."""
    client_run = ws.client_run(run.pathspec)
    assert client_run.successful
    artifact = {e["shard"] or e["step"]: (e["escrow_id"], e["status"]) for e in client_run.data.pf_ledger}
    assert artifact == {k: (e["escrow_id"], e["status"]) for k, e in by_key(ledger).items()}
    assert client_run.data.pf_escrows == {k: e["escrow_id"] for k, e in by_key(ledger).items()}
    return client_run


def assert_summary_printed(run: FlowRun, ledger: Mapping) -> None:
    """``end`` printed what was paid, refunded and charged in fees."""
    for label, key in (("released (paid)", "released"), ("refunded", "refunded"), ("fees", "fees")):
        assert f"{label}: {ledger['totals'][key]} USDC" in run.output, label
