"""Settling escrow: the rules of docs/design.md, over an escrow client, no Metaflow.

Each function takes a ledger entry and returns its next state, after calling
``record(entry)`` for every state it reaches, so the caller can write it down
durably (the decorator writes Metaflow task metadata) *before* anything else
can go wrong. What a server's answer *means* (released? refunded by timeout,
fee kept?) is decided once, in :func:`pf_metaflow.answers.settlement_of`; this
module only applies the rules:

- one escrow per task, shared by its attempts (:func:`adopt`);
- paid at most once: a release either ends ``released`` or raises
  :class:`ReleaseFailed` (the step must not succeed with its agent unpaid);
- refund only what is provably still held; never create twice where the
  server cannot tell us whether the first create happened.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Callable, Mapping, Optional

from .client import EscrowClient, Escrow, Settlement
from .errors import (
    AmbiguousOutcome,
    InvalidStatus,
    NetworkError,
    NotFound,
    PermissionDenied,
    PurpleFleaError,
    ProtocolError,
    ServerError,
    RateLimited,
)
from .ledger import NOT_CREATED, Entry, advance, utcnow
from .money import ZERO, usdc_str

Recorder = Callable[[Entry], None]

# Failures after which we cannot know whether the server acted.
_UNSURE = (AmbiguousOutcome, NetworkError, ProtocolError, ServerError, RateLimited)


class SettlementError(PurpleFleaError):
    """Settling an escrow went wrong in a way the step must not hide. ``entry`` is its latest state."""

    default_code = "settlement_failed"

    def __init__(self, message: str, entry: Entry, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.entry = entry

    def __reduce__(self):
        return (_rebuild_settlement_error, (type(self), self.message, self.entry))


def _rebuild_settlement_error(cls, message, entry):
    return cls(message, entry)


class ReleaseFailed(SettlementError):
    """The agent could not be paid: the escrow is refunded, disputed, unknown or unreachable."""

    default_code = "release_failed"


class ReleaseRateLimited(ReleaseFailed):
    """The release was refused with 429 until the client's wait bound (``PF_ESCROW_MAX_WAIT``)
    ran out: provably nothing happened, the escrow is still funded and its entry ``locked``."""

    default_code = "release_rate_limited"


class NotRecorded(SettlementError):
    """An escrow was created but its record could not be written; it was given back at once."""

    default_code = "not_recorded"


def _noop(_: Entry) -> None:
    pass


def _settlement_of(escrow: Escrow) -> Optional[Settlement]:
    from .answers import settlement_of

    return settlement_of(escrow)


def _idempotency_key(client: EscrowClient, entry: Mapping[str, Any]) -> Optional[str]:
    """The entry's key where the server honours keys; none where it would be ignored (the live
    service), so the client has nothing to warn about. Unsure: send it (the client says)."""
    key = entry.get("idempotency_key")
    if key is None:
        return None
    try:
        return key if client.supports_idempotency else None
    except PurpleFleaError:
        return key


def _create_args(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "counterparty_agent_id": entry["recipient"],
        "description": entry["description"],
        "timeout_hours": entry.get("timeout_hours"),
        "referral_code": entry.get("referral_code"),
    }


def _locked(entry: Mapping[str, Any], escrow: Escrow) -> Entry:
    return advance(entry, escrow_id=escrow.escrow_id, status="locked", reason=None,
                   expected_at=escrow.auto_release_at, creator_id=escrow.creator_id)


# --------------------------------------------------------------------------- create


def open_escrow(client: EscrowClient, entry: Entry, record: Recorder = _noop) -> Entry:
    """Create the escrow for ``entry`` (status ``unknown`` until then); return it ``locked``.

    ``record`` sees the intent before the create is sent, so a process killed
    mid-create leaves a trace that the next attempt or ``reconcile`` can follow; if
    the intent cannot be recorded, nothing is sent. A create whose outcome is
    unknown is recorded ``unknown`` and re-raised; one that provably never took effect
    (refused by the service, or a 429 wait past ``PF_ESCROW_MAX_WAIT``) is recorded
    ``not_created`` with the reason, and re-raised. An escrow created whose ``locked`` record cannot
    be written is refunded at once (nobody could find it again) and
    :class:`NotRecorded` is raised.
    """
    # If this intent stays the last word (the task was killed, timed out or crashed while
    # creating), it says how to check.
    record({**entry, "reason": _unknown_reason(
        entry, "no answer to the create was recorded; it may or may not have reached the service")})
    try:
        escrow = client.create(Decimal(entry["amount_usdc"]), idempotency_key=_idempotency_key(client, entry),
                               **_create_args(entry))
    except AmbiguousOutcome as exc:
        _best_effort(record, advance(entry, status="unknown", reason=_unknown_reason(entry, str(exc))))
        raise
    except PurpleFleaError as exc:
        if isinstance(exc, ProtocolError) and _unreadable_success(exc):
            # An answer we cannot read may hide a yes: the funds may well be locked.
            _best_effort(record, advance(entry, status="unknown", reason=_unknown_reason(entry, exc.message)))
        else:
            _best_effort(record, advance(entry, status=NOT_CREATED, reason=_not_created_reason(exc)))
        raise
    locked = _locked(entry, escrow)
    try:
        record(locked)
    except Exception as exc:  # noqa: BLE001 - whatever broke the record, the money must come back
        why = f"its record could not be written ({type(exc).__name__}: {exc})"
        undone = refund(client, locked, why, _best_effort_recorder(record))
        raise NotRecorded(
            f"escrow {escrow.escrow_id} was created but {why}; it was settled at once "
            f"({undone['status']}) so that no escrow is left that nobody can find", undone,
        ) from None
    return locked


def _best_effort(record: Recorder, entry: Entry) -> None:
    try:
        record(entry)
    except Exception:  # noqa: BLE001 - the original error matters more; reconcile re-reads the service
        pass


def _best_effort_recorder(record: Recorder) -> Recorder:
    return lambda entry: _best_effort(record, entry)


def _not_created_reason(exc: PurpleFleaError) -> str:
    if isinstance(exc, RateLimited):
        return f"no escrow created (rate limited): {exc.message}"
    return f"no escrow created (the service refused the create: {exc.code}): {exc.message}"


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


# --------------------------------------------------------------------------- states


def _settled(entry: Mapping[str, Any], s: Settlement, reason: Optional[str],
             by: Any = None) -> Entry:
    """The entry once ``s`` happened (or, for refund_pending, will happen by itself)."""
    common: dict[str, Any] = {"fee_usdc": usdc_str(s.commission_usd)}
    if by is not None:
        common["settled_by"] = by
    if s.status == "released":
        referral = s.referral_commission_usd
        if referral is None:  # read back from the service: keep what the first release reported
            referral = entry.get("referral_usdc")
        return advance(entry, status="released", net_usdc=usdc_str(s.net_usd),
                       referral_usdc=None if referral is None else usdc_str(Decimal(referral)),
                       settled_at=utcnow(), reason=reason, expected_at=None, **common)
    if s.status == "refunded":
        return advance(entry, status="refunded", net_usdc=usdc_str(ZERO), settled_at=utcnow(),
                       reason=_join(reason, s.detail if s.commission_usd else None),
                       expected_at=None, **common)
    # refund_pending: the money comes back by itself at expected_at, less the fee.
    return advance(entry, status="refund_pending", net_usdc=usdc_str(ZERO), settled_at=None,
                   expected_at=s.expected_at, reason=_join(reason, s.detail), **common)


def _join(*parts: Optional[str]) -> Optional[str]:
    text = "; ".join(p for p in parts if p)
    return text or None


def _observe(client: EscrowClient, entry: Entry) -> tuple[Optional[Escrow], Optional[Settlement]]:
    """(escrow as the server has it, what it settled) or (None, None) when it cannot be read."""
    try:
        escrow = client.get(entry["escrow_id"])
    except PurpleFleaError:
        return None, None
    return escrow, _settlement_of(escrow)


# --------------------------------------------------------------------------- adopt


def adopt(client: EscrowClient, entry: Entry, attempt: int, record: Recorder = _noop) -> Entry:
    """Take over the task's escrow from an earlier attempt, as the service has it now.

    Returns the entry ``locked`` (still held: this attempt pays from it),
    ``released`` (already paid: this attempt's work is not paid again),
    ``refunded`` or ``refund_pending`` (no longer held: the caller may lock anew), or
    ``unknown`` (a create whose outcome nobody can learn: the caller must not create
    another). Raises :class:`SettlementError` for a disputed escrow.
    """
    status = entry.get("status")
    if status == "unknown" and not entry.get("escrow_id"):
        entry = _recover_unknown(client, entry, record)
        status = entry.get("status")
    if status != "locked" or not entry.get("escrow_id"):
        return entry
    escrow, settled = _observe(client, entry)
    if escrow is None:
        return entry  # cannot look now: the release will look again (and fail loudly if need be)
    if settled is not None:
        observed = _settled(entry, settled, f"found {settled.status} when attempt {attempt} took it over")
        record(observed)
        return observed
    if escrow.status == "disputed":
        raise SettlementError(
            f"escrow {entry['escrow_id']} of this task is disputed on the service: its funds stay "
            "locked until Purple Flea reviews it, so this attempt neither pays from it nor locks "
            "another", entry,
        )
    return entry


# --------------------------------------------------------------------------- release


def release(client: EscrowClient, entry: Entry, record: Recorder = _noop, *, by: Any = None) -> Entry:
    """Pay the agent: return the entry ``released``, or raise :class:`ReleaseFailed`.

    A failed or unreadable answer is checked against the escrow's state first: a
    release that took effect (its answer lost or garbled) is recorded as released.
    An escrow found refunded, disputed, or not there at all fails the release: the
    step must not succeed with its agent unpaid.
    """
    if entry.get("status") == "released":
        return entry
    if entry.get("status") != "locked" or not entry.get("escrow_id"):
        raise ReleaseFailed(
            f"cannot pay {entry['recipient']}: the escrow is {entry.get('status')}"
            + (f" ({entry['reason']})" if entry.get("reason") else ""), entry,
        )
    try:
        settlement = client.release(entry["escrow_id"])
    except PurpleFleaError as exc:
        escrow, settled = _observe(client, entry)
        if settled is not None and settled.status == "released":
            done = _settled(entry, settled, None, by)
            _best_effort(record, done)
            return done
        if settled is not None:  # refunded (by reconcile --force, a timeout, or by hand)
            after = _settled(entry, settled, f"release refused: the escrow was already {settled.status}")
            _best_effort(record, after)
            raise ReleaseFailed(
                f"escrow {entry['escrow_id']} was already {settled.status} when the step tried to pay "
                f"{entry['recipient']}: the agent is unpaid", after,
            ) from None
        state = escrow.status if escrow is not None else "unreadable"
        why = (f"release failed ({exc.message}); the escrow is {state} on the service"
               + ("; disputed funds stay locked until Purple Flea reviews them" if state == "disputed" else ""))
        failure = ReleaseFailed
        if isinstance(exc, RateLimited) and state in ("funded", "completed"):
            failure = ReleaseRateLimited
            why += ("; the agent is not paid yet and the escrow stays locked: to pay it, "
                    f"pf_metaflow.pf_release({entry['escrow_id']!r}); `pf-metaflow reconcile` then "
                    "records the release, or, if nobody released it, gives it back")
        after = advance(entry, reason=why)
        _best_effort(record, after)
        raise failure(f"could not pay {entry['recipient']} from escrow {entry['escrow_id']}: {why}",
                      after) from None
    done = _settled(entry, settlement, None, by)
    _best_effort(record, done)
    return done


# --------------------------------------------------------------------------- refund


def refund(client: EscrowClient, entry: Entry, reason: str, record: Recorder = _noop, *,
           by: Any = None) -> Entry:
    """Give the money back as soon as the server allows. Never raises for a server failure:
    the entry keeps its open status, with the failure in ``reason``, for ``reconcile``.
    """
    status = entry.get("status")
    if status in ("released", "refunded", NOT_CREATED):
        return entry
    try:
        if status == "unknown" and not entry.get("escrow_id"):
            entry = _recover_unknown(client, entry, record)
            if entry.get("status") in ("unknown", NOT_CREATED):
                return entry
        if entry.get("status") == "refund_pending":
            return _recheck_pending(client, entry, record)
        settlement = _refund_call(client, entry)
    except InvalidStatus:
        try:
            return _observe_or_keep(client, entry, reason, record, by)
        except _UNSURE as exc:
            return _keep_open(entry, reason, exc, record)
    except (NotFound, PermissionDenied) as exc:
        nxt = advance(entry, reason=f"{reason}; refund failed: {exc.message}")
        _best_effort(record, nxt)
        return nxt
    except _UNSURE as exc:
        return _keep_open(entry, reason, exc, record)
    done = _settled(entry, settlement, reason, by)
    _best_effort(record, done)
    return done


def _refund_call(client: EscrowClient, entry: Entry) -> Settlement:
    # The creator recorded at create: a live refund is reported pending only for our own escrow.
    return client.refund(entry["escrow_id"], creator_id=entry.get("creator_id"))


def _keep_open(entry: Entry, reason: str, exc: PurpleFleaError, record: Recorder) -> Entry:
    nxt = advance(entry, reason=f"{reason}; refund not confirmed ({exc.message}); "
                                "run `pf-metaflow reconcile` to settle it")
    _best_effort(record, nxt)
    return nxt


def _observe_or_keep(client: EscrowClient, entry: Entry, reason: str, record: Recorder, by: Any) -> Entry:
    escrow = client.get(entry["escrow_id"])
    settled = _settlement_of(escrow)
    if settled is not None:
        observed = _settled(entry, settled, reason if settled.status != "released" else entry.get("reason"), by)
    else:
        observed = advance(entry, reason=f"{reason}; escrow is {escrow.status} on the server "
                                          "(a disputed escrow stays locked until reviewed)")
    _best_effort(record, observed)
    return observed


def _recheck_pending(client: EscrowClient, entry: Entry, record: Recorder) -> Entry:
    escrow = client.get(entry["escrow_id"])
    settled = _settlement_of(escrow)
    if settled is None:
        return entry
    observed = _settled(entry, settled, entry.get("reason"))
    _best_effort(record, observed)
    return observed


def _recover_unknown(client: EscrowClient, entry: Entry, record: Recorder) -> Entry:
    """Learn what became of a create whose answer was lost.

    Only a server that honours idempotency keys can tell us: the same create,
    re-sent with the same key, replays the first answer (or creates it now, in
    which case the caller settles it: nothing is lost either way).
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
        void = advance(entry, status=NOT_CREATED, reason=f"no escrow created: the create never took "
                                                          f"effect ({exc.message})")
        _best_effort(record, void)
        return void
    locked = _locked(entry, escrow)
    record(locked)
    return locked


def resolve(client: EscrowClient, entry: Entry, reason: str, record: Recorder = _noop, *,
            by: Any = None) -> Entry:
    """Settle an entry nobody else will: look, then refund what is still held."""
    if entry.get("status") == "locked" and entry.get("escrow_id"):
        _, settled = _observe(client, entry)
        if settled is not None:
            observed = _settled(entry, settled, reason if settled.status != "released" else None, by)
            _best_effort(record, observed)
            return observed
    return refund(client, entry, reason, record, by=by)
