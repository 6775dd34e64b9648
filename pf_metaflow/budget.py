"""Run budgets: a total, split exactly into per-step budgets and per-shard allowances.

A budget is a plain dict artifact, ``self.pf_budget``::

    {"total_usdc": "12.000000",
     "steps":  {"ingest": "1.800000", "train": "6.000000", ...},
     "shards": {"score": ["0.600000", "0.600000", ...]}}

``@pf_escrow_step`` with no ``amount_usdc`` locks the step's budget, or inside a
foreach, the shard's allowance. Everything is validated when the plan is made,
before any escrow exists, and the parts always add up to at most the total.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, Iterable, Mapping

from .errors import BudgetError, InvalidAmount
from .money import MIN_ESCROW_USDC, AmountLike, parse_usdc, split_by_weights, split_even, usdc_str

Budget = dict[str, Any]


def parse_weights(step_weights: Any) -> dict[str, Any]:
    """Accept a dict (Metaflow's JSONType already parsed it) or a JSON object string."""
    if isinstance(step_weights, str):
        try:
            step_weights = json.loads(step_weights)
        except json.JSONDecodeError as exc:
            raise BudgetError(f"step_weights is not valid JSON ({exc.msg}): {step_weights!r}") from None
    if not isinstance(step_weights, Mapping):
        raise BudgetError(
            f"step_weights must be a JSON object mapping step names to fractions, got {step_weights!r}"
        )
    return dict(step_weights)


def plan_budget(
    total_usdc: AmountLike,
    step_weights: Any,
    *,
    steps: Iterable[str] | None = None,
    flow: Any = None,
) -> Budget:
    """Split ``total_usdc`` over steps by ``step_weights`` (non-negative, summing to at most 1).

    ``steps`` (or a running ``flow``, whose graph is used) lists the real step
    names; a weight for any other name is an error. Every step given a weight
    above zero must receive at least the 0.10 USDC escrow minimum.
    """
    try:
        total = parse_usdc(total_usdc, name="total_budget_usdc")
    except InvalidAmount as exc:
        raise BudgetError(exc.message) from None
    weights = parse_weights(step_weights)
    known = _step_names(steps, flow)
    if known is not None:
        unknown = sorted(set(weights) - known)
        if unknown:
            raise BudgetError(
                f"step_weights names {', '.join(map(repr, unknown))}, which "
                f"{'is not a step' if len(unknown) == 1 else 'are not steps'} of this flow "
                f"(steps: {', '.join(sorted(known))})"
            )
    try:
        parts = split_by_weights(total, weights)
    except InvalidAmount as exc:
        raise BudgetError(f"step_weights: {exc.message}") from None
    for name, amount in parts.items():
        if amount and amount < MIN_ESCROW_USDC:
            raise BudgetError(
                f"step {name!r} would get {usdc_str(amount)} USDC of the {usdc_str(total)} budget, "
                f"below the {usdc_str(MIN_ESCROW_USDC)} USDC escrow minimum: raise "
                "total_budget_usdc or its weight"
            )
    return {"total_usdc": usdc_str(total), "steps": {k: usdc_str(v) for k, v in parts.items()}, "shards": {}}


def allot_shards(budget: Mapping[str, Any], step: str, count: int) -> Budget:
    """Split ``step``'s budget into ``count`` exact shard allowances, before the foreach fans out."""
    if step not in budget.get("steps", {}):
        raise BudgetError(f"the budget has no entry for step {step!r}: give it a weight first")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise BudgetError(f"cannot split step {step!r}'s budget over {count!r} shards")
    shares = split_even(Decimal(budget["steps"][step]), count)
    if shares[-1] < MIN_ESCROW_USDC:
        raise BudgetError(
            f"step {step!r}'s budget of {budget['steps'][step]} USDC over {count} shards gives "
            f"{usdc_str(shares[-1])} USDC each, below the {usdc_str(MIN_ESCROW_USDC)} USDC minimum"
        )
    out = {**budget, "shards": {**budget.get("shards", {}), step: [usdc_str(s) for s in shares]}}
    return out


def budget_for(budget: Mapping[str, Any], key: str, shard_index: int | None = None) -> Decimal:
    """The amount ``key`` may lock: its shard allowance inside a foreach, else its step budget."""
    shards = budget.get("shards", {}).get(key)
    if shard_index is not None:
        if shards is None:
            raise BudgetError(
                f"step {key!r} runs inside a foreach but its budget was not split per shard: "
                f"call allot_shards(self.pf_budget, {key!r}, n) before fanning out"
            )
        if not 0 <= shard_index < len(shards):
            raise BudgetError(
                f"shard {shard_index} of step {key!r} has no allowance "
                f"(the budget was split over {len(shards)} shards)"
            )
        return Decimal(shards[shard_index])
    if key not in budget.get("steps", {}):
        raise BudgetError(
            f"the budget has no entry for {key!r} (budgeted: {', '.join(sorted(budget.get('steps', {}))) or 'none'})"
        )
    return Decimal(budget["steps"][key])


def _step_names(steps: Iterable[str] | None, flow: Any) -> set[str] | None:
    if steps is not None:
        return set(steps)
    graph = getattr(flow, "_graph", None)
    if graph is not None:
        return {node.name for node in graph}
    return None
