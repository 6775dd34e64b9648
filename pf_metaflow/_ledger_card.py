"""The ``pf_ledger`` card type: ``--with card:type=pf_ledger`` shows the task's payment ledger.

Metaflow imports every card type whenever it is imported itself (in every Metaflow command
and task, paid or not), so this module imports nothing but Metaflow's card base class; the
ledger, money and card-component code (:mod:`pf_metaflow.card`) load when a card renders.
"""

from __future__ import annotations

from typing import Any, Optional

from metaflow.plugins.cards.card_modules.card import MetaflowCard

CARD_TYPE = "pf_ledger"


class PfLedgerCard(MetaflowCard):
    """``--with card:type=pf_ledger``: the task's ``pf_ledger`` artifact as a card."""

    type = CARD_TYPE
    ALLOW_USER_COMPONENTS = True

    def __init__(self, options: Optional[dict] = None, components: Optional[list] = None,
                 graph: Any = None, **kwargs: Any) -> None:
        self._options = options or {}
        self._components = components or []
        self._graph = graph

    def render(self, task: Any) -> str:
        from metaflow.plugins.cards.card_modules.basic import BlankCard

        from .card import ledger_card

        entries = task["pf_ledger"].data if "pf_ledger" in task else []
        comps = ledger_card(entries)
        if not entries:
            from metaflow.cards import Markdown

            comps.insert(1, Markdown(f"_Task {task.pathspec} has no `pf_ledger` artifact: "
                                     "put this card on a step after the paid ones, e.g. `end`._"))
        return BlankCard(options={"title": "Purple Flea payments"}, components=self._components,
                         graph=self._graph).render(task, components=comps)
