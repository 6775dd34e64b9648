"""The payment ledger: one entry per escrow (one per billable task), merging, totals, tables.

An entry is a plain dict (so a run's ``pf_ledger`` artifact reads back with the
Metaflow client even where pf_metaflow is not installed). Amounts are decimal
strings with 6 places. Every change of state bumps ``seq``; when the same entry
arrives by two roads (a join's two inputs, an artifact and a metadata record,
a later ``reconcile``), the one with the higher ``seq`` wins.

A task's attempts share its entry (``ref`` is ``Flow/run/step/task``): ``attempt`` is the
attempt that created the escrow, ``settled_by`` the attempt (or ``"reconcile"``) that
released or refunded it. ``fee_usdc``, ``net_usdc`` and ``referral_usdc`` are the
service's own figures (``referral_usdc`` is None when the service did not say).

Statuses: ``locked`` (funds held), ``released`` (paid to the agent),
``refunded`` (back to the payer), ``refund_pending`` (coming back by itself at
``expected_at``; the live service has no refund call), ``unknown`` (a create
whose outcome could not be learned; ``reason`` says how to check), ``not_created`` (the
service refused the create, or the rate limit's wait ran past ``PF_ESCROW_MAX_WAIT``: no
escrow exists and nothing is locked, so the task's paid work did not run and nobody was
paid; ``reason`` says why). A ``not_created`` entry moves no money: it counts in
``totals()["not_created"]`` / ``["not_created_count"]`` (work not paid), never in what
was locked, paid or refunded, and ``reconcile`` has nothing to settle for it. A later
attempt of the same task that does lock an escrow supersedes it (same ``ref``).
"""

from __future__ import annotations

import datetime as _dt
from decimal import Decimal
from typing import Any, Iterable, Mapping, Optional

from .money import ZERO, usdc_str

# A create that never took effect (refused by the service, or never sent because the rate
# limit's wait ran past PF_ESCROW_MAX_WAIT): no escrow exists, nothing is locked, the task's
# paid work went unpaid. Shown in every ledger, so an unpaid task is never silent.
NOT_CREATED = "not_created"
VOID = NOT_CREATED  # its former name, kept for callers
_LEGACY_VOID = "void"  # what runs recorded before not_created existed (hidden then)

STATUSES = ("locked", "released", "refunded", "refund_pending", "unknown", NOT_CREATED)
OPEN_STATUSES = frozenset({"locked", "unknown", "refund_pending"})
TOTAL_KEYS = ("locked", "released", "refunded", "refund_pending", "unknown", NOT_CREATED, "fees",
              "net_paid")

Entry = dict[str, Any]


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_entry(
    *,
    ref: str,
    run: str,
    step: str,
    task: str,
    attempt: int,
    recipient: str,
    amount_usdc: Decimal,
    description: str,
    label: str = "",
    shard: str | None = None,
    idempotency_key: str | None = None,
    timeout_hours: int | None = None,
    referral_code: str | None = None,
) -> Entry:
    """The record written before an escrow is created (status ``unknown`` until it is)."""
    return {
        "ref": ref,
        "escrow_id": None,
        "run": run,
        "step": step,
        "task": str(task),
        "attempt": int(attempt),
        "shard": shard,
        "label": label,
        "recipient": recipient,
        "amount_usdc": usdc_str(amount_usdc),
        "fee_usdc": usdc_str(ZERO),
        "net_usdc": usdc_str(ZERO),
        "status": "unknown",
        "created_at": utcnow(),
        "settled_at": None,
        "expected_at": None,
        "reason": "create sent; outcome not yet recorded",
        "description": description,
        "idempotency_key": idempotency_key,
        "timeout_hours": timeout_hours,
        "referral_code": referral_code,
        "referral_usdc": None,
        "creator_id": None,
        "settled_by": None,
        "seq": 0,
    }


def advance(entry: Mapping[str, Any], **changes: Any) -> Entry:
    """A copy of ``entry`` in its next state."""
    nxt = dict(entry)
    nxt.update(changes)
    nxt["seq"] = int(entry.get("seq", 0)) + 1
    return nxt


def merge(*ledgers: Iterable[Mapping[str, Any]] | None) -> list[Entry]:
    """Union of ledgers: one entry per ``ref``, the most advanced state wins.

    Sorted by creation time, so a merged ledger reads in the order money moved.
    """
    best: dict[str, Entry] = {}
    for ledger in ledgers:
        for entry in ledger or ():
            if entry.get("status") == _LEGACY_VOID:
                entry = {**entry, "status": NOT_CREATED}
            ref = entry["ref"]
            if ref not in best or _precedence(entry) > _precedence(best[ref]):
                best[ref] = dict(entry)
    # An agent's create the service refused is a tool call answered with an error (the agent
    # saw it), not paid work left undone: it moves nothing and stays off the ledger.
    kept = [e for e in best.values() if not (e.get("status") == NOT_CREATED and "/agent/" in e["ref"])]
    return sorted(kept, key=lambda e: (e.get("created_at") or "", e["ref"]))


def unpaid(entries: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Entries of tasks whose escrow was never created: their paid work did not run, unpaid."""
    return [e for e in entries if e.get("status") == NOT_CREATED]


# Two writers may record the same seq (a task and a forced reconcile both settling what they
# saw): the later state wins, then the more settled one, then the one that names who settled.
_SETTLEDNESS = {"unknown": 0, "locked": 1, "refund_pending": 2, NOT_CREATED: 3, "refunded": 4,
                "released": 5}


def _precedence(entry: Mapping[str, Any]) -> tuple:
    return (int(entry.get("seq", 0)), _SETTLEDNESS.get(entry.get("status"), 0),
            entry.get("settled_by") is not None)


def totals(entries: Iterable[Mapping[str, Any]]) -> dict[str, Decimal]:
    """Sums by outcome. ``fees`` counts commissions charged or due; ``net_paid`` what agents got.

    ``not_created`` is the amount of paid work that went unpaid because its escrow was never
    created (nothing was locked: it is not money moved), and ``not_created_count`` how many
    tasks that was (a whole number, as a Decimal).
    """
    out = {k: ZERO for k in TOTAL_KEYS}
    out["not_created_count"] = ZERO
    for e in entries:
        status = e.get("status")
        amount = Decimal(e["amount_usdc"])
        if status in out:
            out[status] += amount
        if status == NOT_CREATED:
            out["not_created_count"] += 1
        out["fees"] += Decimal(e.get("fee_usdc") or "0")
        out["net_paid"] += Decimal(e.get("net_usdc") or "0")
    return out


def escrow_key(step: str, foreach_indices: Iterable[int] = ()) -> str:
    """The ``pf_escrows`` key of a task: ``train``, or ``score[3]`` inside a foreach."""
    return step + "".join(f"[{i}]" for i in foreach_indices)


def escrow_map(entries: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """``pf_escrows``: step (or step[index]) to the escrow id of its latest attempt."""
    out: dict[str, tuple[int, str]] = {}
    for e in entries:
        if not e.get("escrow_id"):
            continue
        key = e.get("shard") or e["step"]
        if key not in out or e["attempt"] >= out[key][0]:
            out[key] = (e["attempt"], e["escrow_id"])
    return {k: v for k, (_, v) in sorted(out.items())}


def to_json(run: str, entries: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``pf-metaflow ledger --json`` document."""
    t = totals(entries)
    return {
        "run": run,
        "entries": [dict(e) for e in entries],
        "totals": {**{k: usdc_str(t[k]) for k in TOTAL_KEYS},
                   "not_created_count": int(t["not_created_count"])},
    }


_COLUMNS = (
    ("step", "step"),
    ("task", "task"),
    ("attempt", "try"),
    ("escrow_id", "escrow"),
    ("recipient", "agent"),
    ("amount_usdc", "amount"),
    ("fee_usdc", "fee"),
    ("net_usdc", "net"),
    ("status", "status"),
    ("reason", "reason"),
)


def rows(entries: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    """Table rows (strings) for people: the CLI table and the card share them."""
    out = []
    for e in entries:
        row = []
        for key, _ in _COLUMNS:
            value = e.get(key)
            if key == "step" and e.get("shard"):
                value = e["shard"]
            if key == "reason" and e.get("status") == "released":
                value = ""
            row.append("" if value is None else str(value))
        out.append(row)
    return out


def headers() -> list[str]:
    return [title for _, title in _COLUMNS]


def total_lines(entries: list[Mapping[str, Any]]) -> list[tuple[str, str]]:
    t = totals(entries)
    lines = [
        ("released (paid)", usdc_str(t["released"])),
        ("refunded", usdc_str(t["refunded"])),
        ("refund pending", usdc_str(t["refund_pending"])),
        ("still locked", usdc_str(t["locked"])),
        ("unknown", usdc_str(t["unknown"])),
        ("fees", usdc_str(t["fees"])),
        ("net to agents", usdc_str(t["net_paid"])),
    ]
    count = int(t["not_created_count"])
    if count:
        lines.append((f"not paid, no escrow created ({count} task{'s' if count != 1 else ''})",
                      usdc_str(t[NOT_CREATED])))
    return lines


def unpaid_warning(entries: Iterable[Mapping[str, Any]]) -> Optional[str]:
    """Lines naming the tasks whose paid work went unpaid (no escrow created) and why, or None."""
    missing = unpaid(entries)
    if not missing:
        return None
    n = len(missing)
    why: dict[str, list[str]] = {}
    for e in missing:
        why.setdefault(str(e.get("reason") or "no reason recorded"), []).append(
            str(e.get("shard") or e.get("step")))
    lines = [f"WARNING: {n} paid task{'s' if n != 1 else ''} went unpaid: "
             f"{', '.join(t for ts in why.values() for t in ts)}: no escrow could be created, so "
             f"nothing was locked and {'their steps' if n != 1 else 'its step'} did not run"]
    lines.extend(f"why ({', '.join(tasks)}): {reason}" for reason, tasks in why.items())
    return "\n".join(lines)


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in "…" when it was cut."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _shard_order(entry: Mapping[str, Any]) -> tuple:
    shard = entry.get("shard") or ""
    index = shard.rsplit("[", 1)[1].rstrip("]") if "[" in shard else ""
    return (entry.get("step") or "", int(index) if index.isdigit() else -1, str(entry.get("attempt") or ""))


def ordered(entries: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Entries in run order, foreach shards by index (``score[2]`` before ``score[10]``)."""
    entries = list(entries)
    first = {}
    for i, e in enumerate(entries):
        first.setdefault(e.get("step"), i)
    return sorted(entries, key=lambda e: (first[e.get("step")],) + _shard_order(e))


def format_table(entries: list[Mapping[str, Any]], *, title: str = "") -> str:
    """A plain-text table with totals, for terminals and logs."""
    head = headers()
    body = rows(ordered(entries))
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(head)]
    widths[-1] = min(widths[-1], 60)

    def line(cells: list[str]) -> str:
        return "  ".join(shorten(c, w).ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [title] if title else []
    out.append(line(head))
    out.append(line(["-" * w for w in widths]))
    out.extend(line(r) for r in body)
    if not body:
        out.append("(no escrows)")
    out.append("")
    # Left-aligned: Metaflow strips leading spaces from task log lines.
    out.extend(f"{name}: {amount} USDC" for name, amount in total_lines(entries))
    warning = unpaid_warning(entries)
    if warning:
        out.append(warning)
    return "\n".join(out)
