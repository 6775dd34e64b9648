"""Card components that show a run's payments, for steps with ``@card``::

    @card
    @step
    def end(self):
        for component in ledger_card(self.pf_ledger):
            current.card.append(component)
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from . import ledger as ledger_mod


def ledger_card(entries: Iterable[Mapping[str, Any]], *, title: str = "Purple Flea payments") -> list:
    """A heading, the ledger as a table, and its totals."""
    from metaflow.cards import Markdown, Table

    entries = list(entries)
    components = [Markdown(f"## {title}")]
    if entries:
        components.append(Table(data=ledger_mod.rows(entries), headers=ledger_mod.headers()))
    else:
        components.append(Markdown("_No escrows in this run._"))
    components.append(
        Table(data=[[name, f"{amount} USDC"] for name, amount in ledger_mod.total_lines(entries)],
              headers=["total", "amount"])
    )
    return components
