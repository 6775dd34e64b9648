"""What the escrow service's answers mean: the one place that reads them.

The transports (:mod:`pf_metaflow._http`, :mod:`pf_metaflow._embedded`) hand over the
service's JSON objects as they came; this module turns them into our values
(:class:`Escrow`, :class:`Settlement`, :class:`Capabilities`) and decides what a state
or a failure means for the money:

- :func:`settlement_of`: what an escrow's state, as a ``GET`` shows it, says has moved
  (released, refunded in full, refunded by timeout with the commission kept);
- :func:`create_outcome_unknown`: whether a failed create may still have locked funds.

Everything above (the client, settlement, the ledger) reasons about these values only.
Amounts are the server's own numbers, never recomputed where the server gave them: it
computes in floating point and rounds, so its 6-place figures are what moved.
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping, NamedTuple, Optional

from .errors import AmbiguousOutcome, ProtocolError, PurpleFleaError, ServerError
from .ids import ESCROW_ID_RE
from .money import ZERO, fee_for, quantize, usdc_str

__all__ = [
    "Escrow",
    "Settlement",
    "Capabilities",
    "OPEN_STATUSES",
    "parse_escrow",
    "parse_release",
    "parse_refund",
    "parse_balance",
    "parse_capabilities",
    "parse_money",
    "settlement_of",
    "refund_pending",
    "create_outcome_unknown",
]

# An escrow in one of these still holds its funds and can be released or refunded.
OPEN_STATUSES = ("funded", "completed")

# The answer types are NamedTuples, not dataclasses: every paid task is a new process that
# defines them, and `dataclasses` plus a dataclass cost it ~2 ms (issue 13).


class Escrow(NamedTuple):
    """An escrow as the service describes it (``GET /escrow/{id}`` or a create answer)."""

    escrow_id: str
    status: str
    amount_usd: Decimal
    commission_usd: Optional[Decimal]
    net_to_counterparty: Optional[Decimal]
    description: Optional[str]
    creator_id: Optional[str]
    counterparty_id: Optional[str]
    timeout_hours: Optional[int]
    created_at: Optional[str]
    auto_release_at: Optional[str]
    replayed: bool = False  # the answer is a replay of an earlier create (same Idempotency-Key)
    refunded_at: Optional[str] = None  # the sandbox says when; the live service does not
    # A create sent with an idempotency key: True if the server honours keys, False if it
    # ignores them (the key did nothing), None if no key was sent or nobody could tell.
    idempotency_honoured: Optional[bool] = None

    def __str__(self) -> str:
        return self.escrow_id


class Settlement(NamedTuple):
    """What a release or refund did, or (``refund_pending``) will do by itself."""

    escrow_id: str
    status: str  # "released" | "refunded" | "refund_pending"
    amount_usd: Decimal  # amount released, refunded, or coming back (gross, before any fee)
    commission_usd: Decimal  # fee the service kept (0 for a full refund)
    # The referrer's share of the commission; None when unknown (an escrow read back with
    # GET, which does not carry it), never a guessed 0.
    referral_commission_usd: Optional[Decimal]
    net_usd: Decimal  # to the payee (release) / back to the payer (refund)
    expected_at: Optional[str] = None  # refund_pending: when the money comes back
    detail: str = ""  # human sentence on what happened


class Capabilities(NamedTuple):
    """What a server offers beyond the live protocol, as it advertises it."""

    sandbox: bool  # the server says it is a pf-metaflow sandbox (test money only)
    extensions: frozenset[str]  # "refund", "idempotency", "faucet", "balance"


LIVE = Capabilities(sandbox=False, extensions=frozenset())


# --------------------------------------------------------------------------- fields


def parse_money(record: Mapping[str, Any], field: str, *, required: bool = True) -> Optional[Decimal]:
    """``record[field]`` as USDC at 6 places (a JSON number, read without a float)."""
    value = record.get(field)
    if value is None:
        if required:
            raise ProtocolError(f"the escrow service's answer has no {field!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, (Decimal, int, float, str)):
        raise ProtocolError(f"the escrow service's answer has a non-numeric {field!r}: {value!r}")
    try:
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise ProtocolError(f"the escrow service's answer has a non-numeric {field!r}") from None
    if not amount.is_finite():
        raise ProtocolError(f"the escrow service's answer has a non-finite {field!r}")
    return quantize(amount)


def _required_money(record: Mapping[str, Any], field: str) -> Decimal:
    amount = parse_money(record, field)
    assert amount is not None  # required=True raised otherwise
    return amount


def _text(record: Mapping[str, Any], field: str) -> Optional[str]:
    value = record.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"the escrow service's answer has a non-text {field!r}")
    return value


def _escrow_id(record: Mapping[str, Any]) -> str:
    value = record.get("escrow_id")
    # The id goes back into URL paths, so an odd one is a protocol error, not just data.
    if not isinstance(value, str) or not ESCROW_ID_RE.match(value):
        raise ProtocolError(f"the escrow service's answer has no valid escrow_id: {value!r}")
    return value


def _when(text: Optional[str]) -> Optional[datetime]:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# --------------------------------------------------------------------------- answers


def parse_escrow(
    record: Mapping[str, Any],
    *,
    replayed: bool = False,
    idempotency_honoured: Optional[bool] = None,
) -> Escrow:
    """A create answer or a ``GET /escrow/{id}`` answer."""
    status = _text(record, "status")
    if not status:
        raise ProtocolError("the escrow service's answer has no escrow status")
    hours = record.get("timeout_hours")
    if hours is not None and (isinstance(hours, bool) or not isinstance(hours, int)):
        raise ProtocolError(f"the answer has a non-integer timeout_hours: {hours!r}")
    return Escrow(
        escrow_id=_escrow_id(record),
        status=status,
        amount_usd=_required_money(record, "amount_usd"),
        commission_usd=parse_money(record, "commission_usd", required=False),
        net_to_counterparty=parse_money(record, "net_to_counterparty", required=False),
        description=_text(record, "description"),
        creator_id=_text(record, "creator_id"),
        counterparty_id=_text(record, "counterparty_id"),
        timeout_hours=hours,
        created_at=_text(record, "created_at"),
        auto_release_at=_text(record, "auto_release_at"),
        replayed=replayed,
        refunded_at=_text(record, "refunded_at"),
        idempotency_honoured=idempotency_honoured,
    )


def parse_release(answer: Mapping[str, Any]) -> Settlement:
    """A release answer. ``amount_released`` is what the payee got (net of the commission)."""
    if answer.get("status") != "released":
        raise ProtocolError(f"a release answered status {answer.get('status')!r}, not 'released'")
    net = _required_money(answer, "amount_released")
    commission = _required_money(answer, "commission")
    payee = _text(answer, "counterparty_id") or "the counterparty"
    return Settlement(
        escrow_id=_escrow_id(answer),
        status="released",
        amount_usd=net + commission,
        commission_usd=commission,
        referral_commission_usd=parse_money(answer, "referral_commission", required=False),
        net_usd=net,
        detail=f"released {usdc_str(net)} USDC to {payee} "
        f"({usdc_str(commission)} USDC commission)",
    )


def parse_refund(answer: Mapping[str, Any]) -> Settlement:
    """A refund answer (sandbox extension): the full amount back, no commission."""
    if answer.get("status") != "refunded":
        raise ProtocolError(f"a refund answered status {answer.get('status')!r}, not 'refunded'")
    amount = _required_money(answer, "amount_refunded")
    payer = _text(answer, "creator_id") or "the creator"
    return Settlement(
        escrow_id=_escrow_id(answer),
        status="refunded",
        amount_usd=amount,
        commission_usd=ZERO,
        referral_commission_usd=ZERO,
        net_usd=amount,
        detail=f"refunded {usdc_str(amount)} USDC to {payer} in full (no commission)",
    )


def parse_balance(answer: Mapping[str, Any]) -> dict:
    """``GET /wallet/balance`` (sandbox extension) -> ``{"agent_id", "usdc", "locked"}``."""
    return {
        "agent_id": _text(answer, "agent_id"),
        "usdc": parse_money(answer, "usdc"),
        "locked": parse_money(answer, "locked"),
    }


def parse_capabilities(document: Optional[Mapping[str, Any]]) -> Capabilities:
    """``/openapi.json`` (None: the server has none). A sandbox says so under ``x-pf-sandbox``."""
    marker = document.get("x-pf-sandbox") if document else None
    if not isinstance(marker, dict):
        return LIVE
    extensions = marker.get("extensions")
    if not isinstance(extensions, list):
        extensions = []
    return Capabilities(sandbox=True, extensions=frozenset(e for e in extensions if isinstance(e, str)))


# --------------------------------------------------------------------------- meanings


def _commission(escrow: Escrow) -> Decimal:
    # The live GET always carries commission_usd; fee_for only covers a server that omits it.
    if escrow.commission_usd is not None:
        return escrow.commission_usd
    return fee_for(escrow.amount_usd).commission


def _refunded_in_full(escrow: Escrow) -> bool:
    """A refund call (sandbox) gives everything back before the timeout; the timeout sweep
    (the only refund the live service makes, and it does not say when) keeps the 1%."""
    refunded_at, due = _when(escrow.refunded_at), _when(escrow.auto_release_at)
    return refunded_at is not None and due is not None and refunded_at < due


def settlement_of(escrow: Escrow) -> Optional[Settlement]:
    """What an escrow's state (as ``GET`` shows it) means for the money, or None while it is
    still held (funded, completed) or locked for review (disputed: see ``escrow.status``).

    - ``released``: the payee got ``net_to_counterparty``, the service kept
      ``commission_usd``; the referral share is unknown (None), a GET does not carry it.
    - ``refunded`` before ``auto_release_at`` (a sandbox refund call): everything back,
      no commission.
    - ``refunded`` otherwise (the timeout sweep, the live service's only refund): back to
      the payer less the ``commission_usd`` the service kept.
    """
    def settled(status: str, commission: Decimal, referral: Optional[Decimal], net: Decimal,
                detail: str) -> Settlement:
        return Settlement(escrow_id=escrow.escrow_id, status=status, amount_usd=escrow.amount_usd,
                          commission_usd=commission, referral_commission_usd=referral, net_usd=net,
                          detail=detail)

    if escrow.status == "released":
        commission = _commission(escrow)
        net = escrow.net_to_counterparty
        if net is None:
            net = escrow.amount_usd - commission
        return settled("released", commission, None, net,
                       f"already released (read back from the service): {usdc_str(net)} USDC to "
                       f"{escrow.counterparty_id or 'the counterparty'}")
    if escrow.status == "refunded":
        payer = escrow.creator_id or "the creator"
        if _refunded_in_full(escrow):
            return settled("refunded", ZERO, ZERO, escrow.amount_usd,
                           f"already refunded by a refund, in full: {usdc_str(escrow.amount_usd)} "
                           f"USDC back to {payer}")
        commission = _commission(escrow)
        net = escrow.amount_usd - commission
        return settled("refunded", commission, None, net,
                       f"already refunded automatically at its timeout: {usdc_str(net)} USDC back to "
                       f"{payer}, the service kept its {usdc_str(commission)} USDC commission")
    return None


def refund_pending(escrow: Escrow, *, note: Optional[str] = None) -> Settlement:
    """An open escrow on a server without a refund call: what its timeout will give back.

    The commission is the server's ``commission_usd`` (what its sweep will keep), and the
    amount coming back is ``amount_usd`` less that. ``note`` is added to the detail.
    """
    commission = _commission(escrow)
    net = escrow.amount_usd - commission
    when = escrow.auto_release_at or "its timeout"
    detail = (
        f"this escrow service has no refund call: {usdc_str(net)} USDC "
        f"({usdc_str(escrow.amount_usd)} minus the 1% commission of {usdc_str(commission)}) "
        f"returns to the payer automatically at {when}; no call can hasten it"
    )
    return Settlement(
        escrow_id=escrow.escrow_id,
        status="refund_pending",
        amount_usd=escrow.amount_usd,
        commission_usd=commission,
        referral_commission_usd=None,
        net_usd=net,
        expected_at=escrow.auto_release_at,
        detail=f"{detail}; {note}" if note else detail,
    )


def create_outcome_unknown(exc: PurpleFleaError) -> bool:
    """True when a create that failed with ``exc`` may still have locked funds.

    Only a refusal the service made in words (a 4xx: 429 included) or a request that
    never left (:class:`~pf_metaflow.errors.NetworkError`) proves that nothing happened.
    A 5xx (the service's own ``internal_error`` or ``debit_failed`` too: they may come
    after the funds moved), a proxy's error page, an answer lost on the way, or a 2xx we
    cannot read (a yes, garbled) do not.
    """
    if isinstance(exc, (AmbiguousOutcome, ServerError)):
        return True
    if isinstance(exc, ProtocolError):
        return exc.status is None or 200 <= exc.status < 300 or exc.status >= 500
    return False
