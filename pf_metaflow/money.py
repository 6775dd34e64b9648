"""USDC amounts: exact decimals at 6 places, strict parsing, fees and budget splits.

Every amount in pf-metaflow is a :class:`decimal.Decimal` quantized to USDC's own
precision (6 places). Floats never hold money: a float reaching :func:`parse_usdc`
is converted through its shortest ``repr`` ("0.1", not 0.1000000000000000055...),
which is what the user typed on the command line or in source.
"""

from __future__ import annotations

import math
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Mapping, NamedTuple, Sequence, Union

from .errors import InvalidAmount

USDC_PLACES = 6
USDC_QUANTUM = Decimal("0.000001")
MIN_ESCROW_USDC = Decimal("0.10")
FEE_RATE = Decimal("0.01")
REFERRAL_SHARE = Decimal("0.15")
ZERO = Decimal("0.000000")

AmountLike = Union[Decimal, str, int, float]


def parse_usdc(
    value: AmountLike,
    *,
    name: str = "amount_usdc",
    minimum: Decimal | None = MIN_ESCROW_USDC,
) -> Decimal:
    """Parse user input into an exact USDC amount, or raise :class:`InvalidAmount`.

    Rejects booleans, NaN, infinities, negatives, more than 6 decimal places and
    (unless ``minimum`` is None) amounts below the service minimum of 0.10 USDC.
    The error message names the parameter and repeats the bad value.
    """
    if isinstance(value, bool) or not isinstance(value, (Decimal, str, int, float)):
        raise InvalidAmount(f"{name} must be a number of USDC, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidAmount(f"{name} must be a finite amount, got {value!r}")
        text = repr(value)
    else:
        text = str(value).strip()
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise InvalidAmount(f"{name} is not a number: {value!r}") from None
    if not amount.is_finite():
        raise InvalidAmount(f"{name} must be a finite amount, got {value!r}")
    if amount < 0:
        raise InvalidAmount(f"{name} must not be negative, got {value!r}")
    try:
        exact = amount.quantize(USDC_QUANTUM, rounding=ROUND_DOWN)
    except InvalidOperation:  # more digits than a Decimal holds at 6 places: no real amount
        raise InvalidAmount(f"{name} is too large to be an amount of USDC: {value!r}") from None
    if amount != exact:
        raise InvalidAmount(
            f"{name} has more than {USDC_PLACES} decimal places (USDC's precision): {value!r}"
        )
    if minimum is not None and amount < minimum:
        raise InvalidAmount(
            f"{name} is below the Purple Flea escrow minimum of {usdc_str(minimum)} USDC: {value!r}"
        )
    return amount.quantize(USDC_QUANTUM)


def quantize(amount: Decimal) -> Decimal:
    """Round a computed amount (a fee, a share) half-up to 6 places."""
    return amount.quantize(USDC_QUANTUM, rounding=ROUND_HALF_UP)


def usdc_str(amount: Decimal) -> str:
    """The canonical text of an amount: always 6 places, never exponent notation."""
    return f"{amount.quantize(USDC_QUANTUM):f}"


# A NamedTuple, not a dataclass: every paid task is a new process that defines it, and a
# dataclass costs ~0.5 ms to define there (issue 13).
class Fee(NamedTuple):
    """What a release of ``amount`` pays out."""

    amount: Decimal
    commission: Decimal  # 1% of the amount, to the house (less the referral share)
    referral: Decimal  # 15% of the commission, to the referrer if there is one
    net: Decimal  # what the payee receives: amount - commission


def fee_for(amount: Decimal, *, referred: bool = False) -> Fee:
    """The release fee: 1% of the escrowed amount, 15% of that to a referrer."""
    commission = quantize(amount * FEE_RATE)
    referral = quantize(commission * REFERRAL_SHARE) if referred else ZERO
    return Fee(amount=amount, commission=commission, referral=referral, net=amount - commission)


def _parse_weight(name: str, weight: AmountLike) -> Decimal:
    if isinstance(weight, bool) or not isinstance(weight, (Decimal, str, int, float)):
        raise InvalidAmount(f"weight for {name!r} must be a number, got {weight!r}")
    try:
        parsed = Decimal(repr(weight) if isinstance(weight, float) else str(weight))
    except InvalidOperation:
        raise InvalidAmount(f"weight for {name!r} is not a number: {weight!r}") from None
    if not parsed.is_finite() or parsed < 0:
        raise InvalidAmount(f"weight for {name!r} must be a finite number >= 0, got {weight!r}")
    return parsed


def split_by_weights(total: Decimal, weights: Mapping[str, AmountLike]) -> dict[str, Decimal]:
    """Split ``total`` by non-negative weights summing to at most 1.

    The parts add up exactly to ``total * sum(weights)`` (rounded down to 6 places;
    exactly ``total`` when the weights sum to 1), using largest-remainder rounding
    so no micro-USDC is lost or invented.
    """
    parsed = {name: _parse_weight(name, w) for name, w in weights.items()}
    weight_sum = sum(parsed.values(), Decimal(0))
    if weight_sum > 1:
        raise InvalidAmount(f"weights add up to {weight_sum}, more than 1: {dict(weights)!r}")
    if not parsed:
        return {}
    if weight_sum == 0:
        return {name: ZERO for name in parsed}
    allocated = (total * weight_sum).quantize(USDC_QUANTUM, rounding=ROUND_DOWN)
    return _largest_remainder(allocated, parsed, weight_sum)


def split_even(total: Decimal, parts: int) -> list[Decimal]:
    """Split ``total`` into ``parts`` near-equal amounts that add up exactly to it."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"cannot split into {parts!r} parts: need a whole number >= 1")
    shares = _largest_remainder(total, {i: Decimal(1) for i in range(parts)}, Decimal(parts))
    return [shares[i] for i in range(parts)]


def _largest_remainder(total: Decimal, weights: Mapping, weight_sum: Decimal) -> dict:
    """Apportion ``total`` (whole micro-USDC) by ``weights``; ties go to the earlier key."""
    units = int(total.scaleb(USDC_PLACES))
    exact = {k: Decimal(units) * w / weight_sum for k, w in weights.items()}
    floors = {k: int(v) for k, v in exact.items()}
    leftover = units - sum(floors.values())
    order: Sequence = sorted(exact, key=lambda k: exact[k] - floors[k], reverse=True)
    for k in order[:leftover]:
        floors[k] += 1
    return {k: Decimal(n).scaleb(-USDC_PLACES).quantize(USDC_QUANTUM) for k, n in floors.items()}
