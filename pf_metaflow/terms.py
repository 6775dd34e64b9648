"""The decorator's terms: its arguments, checked once when Metaflow checks the flow.

Literal values are validated here; names of flow attributes (Parameters,
artifacts) are kept and read when the task runs. Nothing here imports Metaflow:
mistakes raise :class:`TermsError`, which the decorator turns into Metaflow's own
graph-time error.
"""

from __future__ import annotations

import json
import operator
import re
from typing import Any, Callable, NamedTuple, Optional

from .errors import InvalidAgentId
from .ids import AGENT_ID_RE, check_agent_id
from .money import parse_usdc


class TermsError(ValueError):
    """A mistake in ``@pf_escrow_step``'s arguments, or a flow attribute they name that is missing."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GATE = re.compile(
    r"^\s*(?P<left>[A-Za-z_][A-Za-z0-9_]*)\s*(?:(?P<op>>=|<=|==|!=|>|<)\s*(?P<right>[^\s].*?))?\s*$"
)
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq,
    "!=": operator.ne, ">": operator.gt, "<": operator.lt,
}


# NamedTuples, not dataclasses: every process that loads a paid flow (each of its tasks)
# defines them, and a dataclass costs ~0.5 ms to define (issue 13).
class Value(NamedTuple):
    """A literal, or the name of a flow attribute (Parameter or artifact) read at run time."""

    literal: Any = None
    attribute: Optional[str] = None

    def resolve(self, flow: Any, what: str) -> Any:
        if self.attribute is None:
            return self.literal
        if not hasattr(flow, self.attribute):
            raise TermsError(
                f"{what} names the flow attribute {self.attribute!r}, but the flow has no "
                "Parameter or artifact of that name at this step"
            )
        return getattr(flow, self.attribute)


def payee_value(raw: Any) -> Value:
    if raw is None:
        return Value(attribute="agent_wallet")
    if isinstance(raw, str) and AGENT_ID_RE.match(raw):
        return Value(literal=raw)
    if isinstance(raw, str) and _IDENTIFIER.match(raw) and not raw.startswith("ag_"):
        return Value(attribute=raw)
    check_agent_id(raw)  # raises with the precise complaint
    raise InvalidAgentId(f"agent_wallet {raw!r} is neither an agent id nor a flow attribute name")


def amount_value(raw: Any) -> Optional[Value]:
    if raw is None:
        return None  # from the run's budget
    if isinstance(raw, str) and _IDENTIFIER.match(raw.strip()) and raw.strip().lower() not in (
        "nan", "inf", "infinity", "snan",
    ):
        return Value(attribute=raw.strip())
    return Value(literal=parse_usdc(raw, name="amount_usdc"))


class Gate(NamedTuple):
    text: str
    left: str
    op: Optional[str] = None
    right: Optional[Value] = None

    def check(self, flow: Any) -> tuple[bool, str]:
        if not hasattr(flow, self.left):
            return False, f"release gate {self.text!r}: the step did not set {self.left!r}"
        left = getattr(flow, self.left)
        if self.op is None:
            return bool(left), f"release gate {self.text!r}: {self.left} is {left!r}"
        right = self.right.resolve(flow, "release_if")
        try:
            ok = _OPS[self.op](left, right)
        except TypeError:
            return False, f"release gate {self.text!r}: cannot compare {left!r} with {right!r}"
        verdict = "holds" if ok else "does not hold"
        limit = self.right.attribute or "limit"
        return ok, f"release gate {self.text!r} {verdict}: {self.left}={_shown(left)}, {limit}={_shown(right)}"


def _shown(value: Any) -> str:
    """A gate's value for people: floats to 4 significant digits (0.8123456789 -> 0.8123)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return repr(value)


def parse_gate(raw: Any) -> Any:
    if raw is None or callable(raw):
        return raw
    match = _GATE.match(str(raw))
    if not match:
        raise TermsError(
            f"release_if {raw!r} is not a gate: use an attribute name ('model_ok') or a comparison "
            "('accuracy >= min_accuracy', 'null_rate <= 0.05')"
        )
    right = None
    if match.group("op"):
        text = match.group("right").strip()
        if _IDENTIFIER.match(text):
            right = Value(attribute=text)
        else:
            try:
                right = Value(literal=json.loads(text))
            except json.JSONDecodeError:
                raise TermsError(
                    f"release_if {raw!r}: the right side must be an attribute name or a number"
                ) from None
    return Gate(text=str(raw).strip(), left=match.group("left"), op=match.group("op"), right=right)


def steps_filter(raw: Any) -> Optional[frozenset[str]]:
    if raw is None:
        return None
    names = raw if isinstance(raw, (list, tuple, set, frozenset)) else str(raw).replace("+", ",").split(",")
    return frozenset(n.strip() for n in names if n and n.strip())


def timeout_hours(raw: Any) -> Optional[int]:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, str)) or not str(raw).isdigit() \
            or not 1 <= int(raw) <= 720:
        raise TermsError(f"timeout_hours must be a whole number from 1 to 720, got {raw!r}")
    return int(raw)
