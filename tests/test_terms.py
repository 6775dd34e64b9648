"""The decorator's terms on their own: gates and their reasons."""

from types import SimpleNamespace

import pytest

from pf_metaflow import terms


def test_gate_reason_shows_floats_with_sensible_digits():
    ok, why = terms.parse_gate("accuracy >= min_accuracy").check(
        SimpleNamespace(accuracy=0.8123456789, min_accuracy=0.85))
    assert not ok
    assert why == "release gate 'accuracy >= min_accuracy' does not hold: accuracy=0.8123, min_accuracy=0.85"


def test_gate_on_a_literal_names_the_limit():
    ok, why = terms.parse_gate("null_rate <= 0.05").check(SimpleNamespace(null_rate=0.2))
    assert not ok and "null_rate=0.2, limit=0.05" in why


def test_gate_missing_attribute_does_not_hold():
    ok, why = terms.parse_gate("model_ok").check(SimpleNamespace())
    assert not ok and "did not set 'model_ok'" in why


@pytest.mark.parametrize("raw", ["accuracy >>= 3", "1accuracy", "a >= b c d"])
def test_malformed_gates_are_refused(raw):
    with pytest.raises(terms.TermsError):
        terms.parse_gate(raw)
