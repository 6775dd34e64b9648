"""pf-metaflow: pay the agents that do a Metaflow flow's work through Purple Flea escrow.

    from pf_metaflow import pf_escrow_step, plan_budget, allot_shards, ledger_of
    from pf_metaflow import pf_create, pf_release, pf_refund, EscrowClient

Names are imported lazily: Metaflow loads ``pf_metaflow.decorator`` while it is
itself still importing (through its extension mechanism), so this package must
not pull in the Metaflow client at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "pf_escrow_step": "pf_metaflow.decorator",
    "PfEscrowStepDecorator": "pf_metaflow.decorator",
    "pf_create": "pf_metaflow.api",
    "pf_release": "pf_metaflow.api",
    "pf_refund": "pf_metaflow.api",
    "pf_get": "pf_metaflow.api",
    "EscrowClient": "pf_metaflow.client",
    "Escrow": "pf_metaflow.client",
    "Settlement": "pf_metaflow.client",
    "default_client": "pf_metaflow.client",
    "plan_budget": "pf_metaflow.budget",
    "allot_shards": "pf_metaflow.budget",
    "budget_for": "pf_metaflow.budget",
    "sandbox_or_required_agent": "pf_metaflow.params",
    "ledger_of": "pf_metaflow.runs",
    "read_run": "pf_metaflow.runs",
    "preflight": "pf_metaflow.preflight",
    "PreflightError": "pf_metaflow.preflight",
    "USDC": "pf_metaflow.params",
    "end_summary": "pf_metaflow.card",
    "append_ledger_card": "pf_metaflow.card",
    "reconcile": "pf_metaflow.runs",
    "ledger_card": "pf_metaflow.card",
    "format_table": "pf_metaflow.ledger",
    "totals": "pf_metaflow.ledger",
    "parse_usdc": "pf_metaflow.money",
    "check_agent_id": "pf_metaflow.ids",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pf_metaflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
