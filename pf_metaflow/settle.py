"""Settling escrow: the rules in DESIGN.md, over an escrow client, with no Metaflow in sight.

Each function takes a ledger entry and returns its next state, after calling
``record(entry)`` for every state it reaches, so the caller can write it down
durably (the decorator writes Metaflow task metadata) *before* anything else
can go wrong. The caller's exception, if any, stays the caller's: these
functions raise only when the step itself must not go on (a create or release
that failed).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Callable, Mapping

from .client import EscrowClient, Escrow, Settlement
from .errors import (
    AmbiguousOutcome,
    InvalidStatus,
    NetworkError,
    NotFound,
    PurpleFleaError,
    ProtocolError,
    ServerError,
    RateLimited,
)
from .ledger import VOID, Entry, advance, utcnow
from .money import ZERO, fee_for, usdc_str

Recorder = Callable[[Entry], None]

# Failures after which we cannot know whether the server acted.
_UNSURE = (AmbiguousOutcome, NetworkError, ProtocolError, ServerError, RateLimited)


def _noop(_: Entry) -> None:
    pass


def _create_args(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "counterparty_agent_id": entry["recipient"],
        "description": entry["description"],
        "timeout_hours": entry.get("timeout_hours"),
        "referral_code": entry.get("referral_code"),
    }


def _locked(entry: Mapping[str, Any], escrow: Escrow) -> Entry:
    return advance(entry, escrow_id=escrow.escrow_id, status="locked", reason=None,
                   expected_at=escrow.auto_release_at)


def open_escrow(client: EscrowClient, entry: Entry, record: Recorder = _noop) -> Entry:
    """Create the escrow for ``entry`` (status ``unknown`` until then); return it ``locked``.

    ``record`` sees the intent before the create is sent, so a process killed
    mid-create leaves a trace that the next attempt or ``reconcile`` can follow.
    A create whose outcome is unknown is recorded ``unknown`` and re-raised; one
    the service refused is recorded void and re-raised.
    """
    # If this intent stays the last word (the task was killed, timed out or crashed while
    # creating), it says how to check.
    record({**entry, "reason": _unknown_reason(
        entry, "no answer to the create was recorded; it may or may not have reached the service")})
    # The key always goes along: a server without idempotency ignores it, and the client
    # asks what the server supports only if an answer is lost (saving a request per task).
    try:
        escrow = client.create(Decimal(entry["amount_usdc"]), idempotency_key=entry.get("idempotency_key"),
                               **_create_args(entry))
    except AmbiguousOutcome as exc:
        why = f"{exc}; it was not retried because {client.url} does not honour idempotency keys"
        record(advance(entry, status="unknown", reason=_unknown_reason(entry, why)))
        raise
    except PurpleFleaError as exc:
        if isinstance(exc, ProtocolError) and _unreadable_success(exc):
            # An answer we cannot read may hide a yes: the funds may well be locked.
            record(advance(entry, status="unknown", reason=_unknown_reason(entry, exc.message)))
        else:
            record(advance(entry, status=VOID, reason=f"create refused: {exc.message}"))
        raise
    locked = _locked(entry, escrow)
    record(locked)
    return locked


def _unreadable_success(exc: ProtocolError) -> bool:
    """An answer that may hide a success: an unreadable 2xx, or an unreadable 5xx (a proxy's
    error page: the service itself may have acted behind it). An unreadable 4xx is a refusal."""
    return exc.status is None or 200 <= exc.status < 300 or exc.status >= 500


def _unknown_reason(entry: Mapping[str, Any], why: str) -> str:
    return (
        f"create outcome unknown ({why}). If an escrow with description "
        f"{entry['description']!r} exists, it returns to the payer by itself after "
        f"{entry.get('timeout_hours') or 24} h (less the 1% commission); check it with GET "
        "/escrow/{id} or the Purple Flea dashboard"
    )


def _settled(entry: Mapping[str, Any], s: Settlement, reason: str | None) -> Entry:
    if s.status == "released":
        return advance(entry, status="released", fee_usdc=usdc_str(s.commission_usd),
                       net_usdc=usdc_str(s.net_usd), settled_at=utcnow(), reason=reason,
                       expected_at=None)
    if s.status == "refunded":
        return advance(entry, status="refunded", fee_usdc=usdc_str(s.commission_usd),
                       net_usdc=usdc_str(ZERO), settled_at=utcnow(), reason=reason,
                       expected_at=None)
    # refund_pending: the money comes back by itself at expected_at, less the fee.
    detail = f"{reason}; {s.detail}" if reason and s.detail else (reason or s.detail)
    return advance(entry, status="refund_pending", fee_usdc=usdc_str(s.commission_usd),
                   net_usdc=usdc_str(ZERO), settled_at=None, expected_at=s.expected_at,
                   reason=detail)


def _observed(entry: Mapping[str, Any], escrow: Escrow, reason: str | None) -> Entry | None:
    """The entry as the server sees it, when the server's status settles it; else None."""
    amount = Decimal(entry["amount_usdc"])
    if escrow.status == "released":
        fee = fee_for(amount)
        commission = escrow.commission_usd if escrow.commission_usd is not None else fee.commission
        net = escrow.net_to_counterparty if escrow.net_to_counterparty is not None else fee.net
        return advance(entry, status="released", fee_usdc=usdc_str(commission),
                       net_usdc=usdc_str(net), settled_at=utcnow(), reason=reason)
    if escrow.status == "refunded":
        return advance(entry, status="refunded", net_usdc=usdc_str(ZERO), settled_at=utcnow(),
                       reason=reason, expected_at=None)
    return None


def release(client: EscrowClient, entry: Entry, record: Recorder = _noop) -> Entry:
    """Pay the agent. On failure the entry stays ``locked`` (with the reason) and the error is raised.

    A failed or unreadable answer is checked against the escrow's state first: a
    release that took effect (its answer lost or garbled) is recorded as released,
    so work that was paid for is never reported as failed.
    """
    try:
        settlement = client.release(entry["escrow_id"])
    except PurpleFleaError as exc:
        observed = _look(client, entry)
        if observed is not None:
            record(observed)
            return observed
        if not isinstance(exc, InvalidStatus):
            record(advance(entry, reason=f"release failed: {exc.message}; reconcile will settle it"))
        raise
    done = _settled(entry, settlement, None)
    record(done)
    return done


def _look(client: EscrowClient, entry: Entry) -> Entry | None:
    """The entry as the server has settled it, or None (not settled, or the server can't say)."""
    try:
        return _observed(entry, client.get(entry["escrow_id"]), None)
    except PurpleFleaError:
        return None


def refund(client: EscrowClient, entry: Entry, reason: str, record: Recorder = _noop) -> Entry:
    """Give the money back as soon as the server allows. Never raises for a server failure:
    the entry keeps its open status, with the failure in ``reason``, for ``reconcile``.
    """
    status = entry.get("status")
    if status in ("released", "refunded", VOID):
        return entry
    try:
        if status == "unknown" and not entry.get("escrow_id"):
            entry = _recover_unknown(client, entry, record)
            if entry.get("status") == "unknown" or entry.get("status") == VOID:
                return entry
        if entry.get("status") == "refund_pending":
            return _recheck_pending(client, entry, record)
        settlement = client.refund(entry["escrow_id"])
    except InvalidStatus:
        try:
            return _observe_or_keep(client, entry, reason, record)
        except _UNSURE as exc:
            return _keep_open(entry, reason, exc, record)
    except NotFound as exc:
        nxt = advance(entry, reason=f"{reason}; refund failed: {exc.message}")
        record(nxt)
        return nxt
    except _UNSURE as exc:
        return _keep_open(entry, reason, exc, record)
    done = _settled(entry, settlement, reason)
    record(done)
    return done


def _keep_open(entry: Entry, reason: str, exc: PurpleFleaError, record: Recorder) -> Entry:
    nxt = advance(entry, reason=f"{reason}; refund not confirmed ({exc.message}); "
                                "run `pf-metaflow reconcile` to settle it")
    record(nxt)
    return nxt


def _observe_or_keep(client: EscrowClient, entry: Entry, reason: str, record: Recorder) -> Entry:
    escrow = client.get(entry["escrow_id"])
    observed = _observed(entry, escrow, reason if escrow.status == "refunded" else entry.get("reason"))
    if observed is None:
        observed = advance(entry, reason=f"{reason}; escrow is {escrow.status} on the server "
                                          "(a disputed escrow stays locked until reviewed)")
    record(observed)
    return observed


def _recheck_pending(client: EscrowClient, entry: Entry, record: Recorder) -> Entry:
    escrow = client.get(entry["escrow_id"])
    observed = _observed(entry, escrow, entry.get("reason"))
    if observed is None:
        return entry
    record(observed)
    return observed


def _recover_unknown(client: EscrowClient, entry: Entry, record: Recorder) -> Entry:
    """Learn what became of a create whose answer was lost.

    Only a server that honours idempotency keys can tell us: the same create,
    re-sent with the same key, replays the first answer (or creates it now, in
    which case the caller refunds it straight away: nothing is lost either way).
    """
    key = entry.get("idempotency_key")
    if not (key and client.supports_idempotency):
        return entry
    try:
        escrow = client.create(Decimal(entry["amount_usdc"]), idempotency_key=key, **_create_args(entry))
    except _UNSURE:
        raise
    except PurpleFleaError as exc:
        # Refused now means it never happened: a replay would have returned the first answer.
        void = advance(entry, status=VOID, reason=f"create never took effect: {exc.message}")
        record(void)
        return void
    locked = _locked(entry, escrow)
    record(locked)
    return locked


def resolve(client: EscrowClient, entry: Entry, reason: str, record: Recorder = _noop) -> Entry:
    """Settle an entry left open by a task that died: look, then refund what is still held."""
    if entry.get("status") == "locked" and entry.get("escrow_id"):
        try:
            escrow = client.get(entry["escrow_id"])
        except _UNSURE:
            return entry
        observed = _observed(entry, escrow, reason)
        if observed is not None:
            record(observed)
            return observed
    return refund(client, entry, reason, record)
