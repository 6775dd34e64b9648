"""USDC amounts: strict parsing, the release fee, and budget splits that add up exactly."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pf_metaflow.errors import InvalidAmount, InvalidRequest
from pf_metaflow.money import (
    MIN_ESCROW_USDC,
    USDC_QUANTUM,
    fee_for,
    parse_usdc,
    quantize,
    split_by_weights,
    split_even,
    usdc_str,
)

D = Decimal

# -- parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.10", D("0.100000")),
        ("1", D("1.000000")),
        (" 2.5 ", D("2.500000")),
        ("1.000001", D("1.000001")),
        ("1.0000010", D("1.000001")),  # a trailing zero is not a 7th place
        (3, D("3.000000")),
        (D("12.34"), D("12.340000")),
        (0.1, D("0.100000")),  # through repr: what the user typed, not 0.1000000000000000055
        (2.675, D("2.675000")),
        (1e3, D("1000.000000")),
    ],
)
def test_parse_usdc_accepts_exact_amounts(value, expected):
    parsed = parse_usdc(value)
    assert parsed == expected
    assert parsed.as_tuple().exponent == -6


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("NaN", "finite"),
        ("nan", "finite"),
        ("sNaN", "finite"),
        (float("nan"), "finite"),
        ("inf", "finite"),
        ("-Infinity", "finite"),
        (float("inf"), "finite"),
        ("-1", "negative"),
        (-0.5, "negative"),
        ("1.0000001", "more than 6 decimal places"),
        (0.1234567, "more than 6 decimal places"),
        ("0.09", "below the Purple Flea escrow minimum"),
        ("0", "below the Purple Flea escrow minimum"),
        (0, "below the Purple Flea escrow minimum"),
        ("0.099999", "below the Purple Flea escrow minimum"),
        (True, "must be a number"),
        (False, "must be a number"),
        (None, "must be a number"),
        ([1], "must be a number"),
        ("", "not a number"),
        ("ten", "not a number"),
        ("1,5", "not a number"),
        ("$5", "not a number"),
        ("0x10", "not a number"),
    ],
)
def test_parse_usdc_rejects_bad_input_with_a_message_naming_it(value, fragment):
    with pytest.raises(InvalidAmount) as caught:
        parse_usdc(value, name="amount_usdc")
    assert fragment in caught.value.message
    assert "amount_usdc" in caught.value.message
    assert caught.value.code == "invalid_amount"
    assert caught.value.status == 400


def test_invalid_amount_is_both_an_invalid_request_and_a_value_error():
    with pytest.raises(InvalidRequest):
        parse_usdc("-1")
    with pytest.raises(ValueError):
        parse_usdc("-1")


def test_parse_usdc_minimum_none_allows_zero():
    assert parse_usdc("0", minimum=None) == D("0.000000")


def test_parse_usdc_minimum_is_the_service_minimum():
    assert MIN_ESCROW_USDC == D("0.10")
    assert parse_usdc("0.1") == D("0.100000")


@given(st.integers(min_value=100_000, max_value=10**15))
def test_parse_usdc_round_trips_its_canonical_text(micro):
    amount = D(micro).scaleb(-6)
    assert parse_usdc(usdc_str(amount)) == amount


@given(st.integers(min_value=100_000, max_value=10**14))
def test_parse_usdc_of_a_float_is_the_decimal_it_prints_as(micro):
    as_float = micro / 1_000_000
    assert parse_usdc(as_float) == D(repr(as_float)).quantize(USDC_QUANTUM)


# -- formatting and fees -------------------------------------------------------------


def test_usdc_str_has_six_places_and_no_exponent():
    assert usdc_str(D("0")) == "0.000000"
    assert usdc_str(D("1E+3")) == "1000.000000"
    assert usdc_str(D("0E-6")) == "0.000000"


@pytest.mark.parametrize(
    ("amount", "commission", "net"),
    [
        ("100", "1.000000", "99.000000"),
        ("0.10", "0.001000", "0.099000"),
        ("1.5", "0.015000", "1.485000"),
        ("0.123456", "0.001235", "0.122221"),  # 0.00123456 rounds half-up
        ("0.150050", "0.001501", "0.148549"),  # 0.0015005: exactly half, rounds up
        ("0.150049", "0.001500", "0.148549"),
    ],
)
def test_fee_is_one_percent_rounded_half_up_and_payee_gets_the_rest(amount, commission, net):
    fee = fee_for(parse_usdc(amount))
    assert fee.commission == D(commission)
    assert fee.net == D(net)
    assert fee.referral == D("0")
    assert fee.net + fee.commission == fee.amount


@pytest.mark.parametrize(
    ("amount", "referral"),
    [("100", "0.150000"), ("1.5", "0.002250"), ("0.10", "0.000150"), ("0.123456", "0.000185")],
)
def test_referrer_gets_fifteen_percent_of_the_fee(amount, referral):
    fee = fee_for(parse_usdc(amount), referred=True)
    assert fee.referral == D(referral)
    assert fee.referral <= fee.commission


def test_quantize_rounds_half_up():
    assert quantize(D("0.0000005")) == D("0.000001")
    assert quantize(D("0.00000049")) == D("0.000000")


@given(st.integers(min_value=100_000, max_value=10**13), st.booleans())
def test_fee_parts_never_invent_or_lose_a_micro_usdc(micro, referred):
    amount = D(micro).scaleb(-6).quantize(USDC_QUANTUM)
    fee = fee_for(amount, referred=referred)
    assert fee.net + fee.commission == amount
    assert 0 <= fee.referral <= fee.commission
    assert abs(fee.commission - amount * D("0.01")) <= D("0.0000005")
    for part in (fee.commission, fee.referral, fee.net):
        assert part == part.quantize(USDC_QUANTUM)


# -- splits ------------------------------------------------------------------------


def test_split_by_weights_adds_up_to_the_total_when_weights_sum_to_one():
    parts = split_by_weights(D("12.00"), {"ingest": 0.15, "train": 0.5, "evaluate": 0.2,
                                          "deploy": 0.15})
    assert parts == {"ingest": D("1.800000"), "train": D("6.000000"),
                     "evaluate": D("2.400000"), "deploy": D("1.800000")}
    assert sum(parts.values()) == D("12.00")


def test_split_by_weights_gives_a_tied_leftover_micro_usdc_to_the_earlier_step():
    parts = split_by_weights(D("1.000001"), {"a": "0.5", "b": "0.5"})
    assert parts == {"a": D("0.500001"), "b": D("0.500000")}


def test_split_by_weights_below_one_allocates_that_share_rounded_down():
    parts = split_by_weights(D("10.000001"), {"a": "0.25", "b": "0.25"})
    assert sum(parts.values()) == D("5.000000")


def test_split_by_weights_rejects_weights_over_one():
    with pytest.raises(InvalidAmount, match="more than 1"):
        split_by_weights(D("10"), {"a": 0.7, "b": 0.4})


@pytest.mark.parametrize("weight", [-0.1, float("nan"), "abc", True, None])
def test_split_by_weights_rejects_bad_weights(weight):
    with pytest.raises(InvalidAmount):
        split_by_weights(D("10"), {"a": weight})


def test_split_even_spreads_the_remainder_over_the_first_parts():
    assert split_even(D("1.000000"), 3) == [D("0.333334"), D("0.333333"), D("0.333333")]


@pytest.mark.parametrize("parts", [0, -1, 1.5, True])
def test_split_even_needs_a_whole_number_of_parts(parts):
    with pytest.raises(ValueError):
        split_even(D("1"), parts)


_micro_totals = st.integers(min_value=0, max_value=10**13)
# Weights in thousandths summing to at most 1 (exact as Decimals).
_weights = st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=12).filter(
    lambda ws: 0 < sum(ws) <= 1000
)


@settings(max_examples=200, deadline=None)
@given(_micro_totals, _weights)
def test_split_by_weights_parts_add_up_exactly_and_each_is_within_a_micro_of_its_share(
    micro, thousandths
):
    total = D(micro).scaleb(-6).quantize(USDC_QUANTUM)
    weights = {f"step{i}": D(w) / 1000 for i, w in enumerate(thousandths)}
    weight_sum = sum(weights.values())
    parts = split_by_weights(total, weights)
    allocated = (total * weight_sum).quantize(USDC_QUANTUM, rounding="ROUND_DOWN")
    assert sum(parts.values()) == allocated
    if weight_sum == 1:
        assert allocated == total
    for name, part in parts.items():
        exact_share = allocated * weights[name] / weight_sum
        assert abs(part - exact_share) < USDC_QUANTUM
        assert part >= 0
        assert part == part.quantize(USDC_QUANTUM)


@settings(max_examples=200, deadline=None)
@given(_micro_totals, st.integers(min_value=1, max_value=600))
def test_split_even_parts_add_up_exactly_and_each_is_within_a_micro_of_its_share(micro, n):
    total = D(micro).scaleb(-6).quantize(USDC_QUANTUM)
    parts = split_even(total, n)
    assert len(parts) == n
    assert sum(parts) == total
    exact_share = total / n
    for part in parts:
        assert abs(part - exact_share) < USDC_QUANTUM
    assert max(parts) - min(parts) <= USDC_QUANTUM
