"""A run's payments for people: the end-of-run summary, card components and a card type.

In a flow's end step::

    @card
    @step
    def end(self):
        print(end_summary(self.pf_ledger, {"train": self.train_error}, outcome="..."))
        append_ledger_card(current.card, self.pf_ledger)

For a flow that never imports pf_metaflow, the same card is a card type:
``python flow.py run --with card:type=pf_ledger`` (on the steps that have a ledger,
usually ``end``; registered by ``metaflow_extensions/pf_metaflow/plugins/cards``, defined
in ``_ledger_card`` so that Metaflow's import of it stays light).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional

from metaflow.exception import MetaflowException

from . import ledger as ledger_mod
from ._ledger_card import CARD_TYPE, PfLedgerCard  # noqa: F401 - the card type, importable from here too
from .ledger import ordered, shorten  # noqa: F401 - part of this module's API too
from .money import usdc_str

REASON_CHARS = 160  # the full reason is in the ledger; the card keeps it to a line or two
# Fewer columns than the terminal table, so the card fits a 1200 px window (Metaflow's
# card page keeps ~800 px for content): fees are in the totals, reasons listed below.
_CARD_COLUMNS = (("step", "step"), ("attempt", "try"), ("status", "status"), ("amount_usdc", "amount"),
                 ("net_usdc", "net"), ("escrow_id", "escrow"))


_LONG_FLOAT = re.compile(r"(?<![\w.])(\d+\.\d{5,})(?![\w.])")


def readable(reason: str) -> str:
    """A reason for people: measured floats (``accuracy=0.8123456789``) to 4 decimals.
    Six-place USDC amounts are left alone: they are exact money, not measurements."""
    def four(m: re.Match) -> str:
        text = m.group(1)
        return text if len(text.split(".")[1]) == 6 else f"{float(text):.4f}"
    return _LONG_FLOAT.sub(four, reason)


def card_rows(entries: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    out = []
    for e in ordered(entries):
        row = []
        for key, _ in _CARD_COLUMNS:
            value = e.get(key)
            if key == "step" and e.get("shard"):
                value = e["shard"]
            row.append("" if value is None else str(value))
        out.append(row)
    return out


def ledger_card(entries: Iterable[Mapping[str, Any]], *, title: str = "Purple Flea payments",
                summary: Optional[str] = None) -> list:
    """Card components: a heading, the run's outcome, the ledger as a table, and its totals."""
    from metaflow.cards import Markdown, Table

    entries = list(entries)
    components = [Markdown(f"## {title}")]
    if summary:
        components.append(Markdown("\n\n".join(summary.splitlines())))
    if entries:
        warning = ledger_mod.unpaid_warning(entries)
        if warning:
            components.append(Markdown(f"**{warning.splitlines()[0]}**"))
        components.append(Table(data=card_rows(entries), headers=[t for _, t in _CARD_COLUMNS]))
        reasons = [f"- **{e.get('shard') or e.get('step')}** {e.get('status')}: "
                   f"{shorten(readable(str(e.get('reason') or '')), REASON_CHARS)}"
                   for e in ordered(entries) if e.get("status") != "released" and e.get("reason")]
        if reasons:
            components.append(Markdown("**Not paid, and why**\n\n" + "\n".join(reasons)))
    else:
        components.append(Markdown("_No escrows in this run._"))
    components.append(
        Table(data=[[name, f"{amount} USDC"] for name, amount in ledger_mod.total_lines(entries)],
              headers=["total", "amount"])
    )
    return components


def append_ledger_card(card: Any, entries: Iterable[Mapping[str, Any]], **kwargs: Any) -> None:
    """Add :func:`ledger_card`'s components to ``current.card`` (a step with ``@card``)."""
    for component in ledger_card(entries, **kwargs):
        card.append(component)


def _error_text(error: Any) -> str:
    """One line from what ``@catch`` stored: the exception's type and message."""
    kind = str(getattr(error, "type", "") or type(error).__name__).rsplit(".", 1)[-1]
    message = str(getattr(error, "exception", None) or error).strip().splitlines()
    return readable(f"{kind}: {message[-1] if message else ''}".strip())


def end_summary(entries: Iterable[Mapping[str, Any]], errors: Optional[Mapping[str, Any]] = None, *,
                outcome: str = "") -> str:
    """The last lines of a paying run: what failed and why, what went unpaid and why, what was
    paid, refunded, left pending.

    ``errors`` maps a stage to what ``@catch`` stored (None when it succeeded). A task whose
    escrow was never created (``not_created``: refused, or the rate limit's wait ran past
    ``PF_ESCROW_MAX_WAIT``) is listed ``UNPAID`` with the reason, a ``WARNING`` line names
    them all, and the last line is ``RESULT: UNPAID: …``. The last line starts
    ``RESULT: OK`` only when no paid work failed or went unpaid and nothing is pending.
    """
    entries = ordered(entries)
    errors = dict(errors or {})
    lines = [outcome] if outcome else []
    failed: list = []
    unpaid = [e for e in entries if e.get("status") == ledger_mod.NOT_CREATED]
    for stage, error in errors.items():
        if error is not None:
            status = next((e.get("status") for e in reversed(entries) if e.get("step") == stage), None)
            if status == ledger_mod.NOT_CREATED:
                continue  # listed below, with the reason, as unpaid
            failed.append(stage)
            money = f"its escrow was {status}" if status else "no escrow was locked for it"
            lines.append(f"  FAILED {stage}: {_error_text(error)} ({money})")
    for e in entries:
        status = e.get("status")
        if status == ledger_mod.NOT_CREATED:
            lines.append(f"  UNPAID {_name(e)}: no escrow was created, nothing was locked and the step "
                         f"did not run: {shorten(readable(str(e.get('reason') or '')), 400)}")
        elif status != "released" and e.get("step") not in failed:
            failed.append(_name(e))
            lines.append(f"  NOT PAID {_name(e)}: {status}: "
                         f"{shorten(readable(str(e.get('reason') or '')), 200)}")
    t = ledger_mod.totals(entries)
    pending = t["refund_pending"] + t["locked"] + t["unknown"]
    lines.append(
        f"Paid {usdc_str(t['released'])} USDC ({usdc_str(t['net_paid'])} to agents after "
        f"{usdc_str(t['fees'])} fees), refunded {usdc_str(t['refunded'])} USDC, "
        f"left pending {usdc_str(pending)} USDC"
        + (" (run `pf-metaflow reconcile FLOW/RUN`)" if pending else "")
        + (f", not paid (no escrow created) {usdc_str(t[ledger_mod.NOT_CREATED])} USDC" if unpaid else "")
    )
    if unpaid:
        names = ", ".join(_name(e) for e in unpaid)
        n = len(unpaid)
        lines.append(
            f"WARNING: paid work went unpaid: {n} task{'s' if n != 1 else ''} ({names}) did not run "
            f"because no escrow could be created for {'them' if n != 1 else 'it'}"
            + (" (the escrow service's rate limit)" if any(_rate_limited(e) for e in unpaid) else "")
            + "; nothing was locked for them. Run them again (a new run), with a larger "
              "PF_ESCROW_MAX_WAIT or fewer shards at once (--max-workers)"
        )
        also = f"; paid work also did not succeed in {', '.join(dict.fromkeys(failed))}" if failed else ""
        lines.append(f"RESULT: UNPAID: no escrow could be created for {names}{also}")
    elif failed:
        lines.append(f"RESULT: FAILED: paid work did not succeed in {', '.join(dict.fromkeys(failed))}")
    elif pending:
        lines.append("RESULT: INCOMPLETE: escrows are still pending")
    else:
        lines.append("RESULT: OK: all paid work succeeded and was paid")
    return "\n".join(lines)


def _name(entry: Mapping[str, Any]) -> str:
    return str(entry.get("shard") or entry.get("step"))


def _rate_limited(entry: Mapping[str, Any]) -> bool:
    return "rate limit" in str(entry.get("reason") or "").lower()


class PfUnpaidWork(MetaflowException):
    headline = "Paid work went unpaid"


def fail_if_unpaid(entries: Iterable[Mapping[str, Any]]) -> None:
    """Fail the step (so the run exits non-zero and ``Run.successful`` is False) when a paid
    task went unpaid because its escrow was never created. Call it last in ``end``, after
    printing :func:`end_summary`: the summary, the ``pf_ledger`` artifact and
    ``pf-metaflow ledger`` keep the details."""
    missing = ledger_mod.unpaid(ordered(entries))
    if missing:
        names = ", ".join(_name(e) for e in missing)
        raise PfUnpaidWork(
            f"{len(missing)} paid task{'s' if len(missing) != 1 else ''} went unpaid ({names}): no "
            "escrow could be created, so nothing was locked and the work did not run. The summary "
            "above says why; `pf-metaflow ledger FLOW/RUN` lists them")
