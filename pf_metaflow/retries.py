"""The escrow client's one retry policy: what is retried, how often, how long it waits.

Only failures that cannot move money twice are retried: a request that never left
(:class:`NetworkError`), "not now" answers (429, 503), and operations the client has
made safe to repeat by raising :class:`Resend` (a read; a release or refund checked
against the escrow first; a create re-sent with the same ``Idempotency-Key`` to a
server that honours it). Waits honour ``Retry-After``; a 429 without one (the live
service's) waits for the rate-limit window named in its message ("Limit: 20 per 60s";
60 s when it names none); anything else backs off exponentially with jitter.

Waits the server imposes (``Retry-After``, a 429) do not use up ``max_attempts``; they
are bounded by ``max_wait`` in total, and logged once per call. Creates over HTTP are
also paced across processes by :mod:`pf_metaflow.pacing`.

tenacity (and :mod:`pf_metaflow.pacing`, for the window of a 429) is imported only when
a policy is built or consulted: the embedded sandbox has nothing to retry and never
loads either. Tests replace :data:`_sleep` to record waits instead of
sleeping.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from .errors import AmbiguousOutcome, NetworkError, RateLimited, ServiceUnavailable

if TYPE_CHECKING:
    import tenacity

__all__ = ["Resend", "retryable", "retry_policy", "run", "PACED_ATTEMPTS_CAP"]

log = logging.getLogger("pf_metaflow.client")

T = TypeVar("T")

_sleep: Callable[[float], None] = time.sleep  # tests replace this to record waits

# However the server paces us with Retry-After, one call never sends more requests than this.
PACED_ATTEMPTS_CAP = 50


class Resend(AmbiguousOutcome):
    """The outcome is unknown, but sending the same request again cannot move money twice."""


def retryable(exc: BaseException) -> bool:
    if isinstance(exc, NetworkError):
        return exc.details.get("retryable", True)
    if isinstance(exc, RateLimited) and exc.details.get("gave_up"):
        return False  # the pacer already waited all max_wait allows
    return isinstance(exc, (RateLimited, ServiceUnavailable, Resend))


def _failure(retry_state: Any) -> Optional[BaseException]:
    return retry_state.outcome.exception() if retry_state.outcome else None


def _asked_wait(exc: Optional[BaseException]) -> Optional[float]:
    """The wait the server asked for (``Retry-After``, in the error's details), if any."""
    return getattr(exc, "details", {}).get("retry_after") if exc is not None else None


def _window_wait(exc: Optional[BaseException]) -> Optional[float]:
    """For a 429 without ``Retry-After``: the window its message names (else live's 60 s),
    plus a little slack. Waiting that long from now always outlasts the server's window."""
    if not isinstance(exc, RateLimited) or _asked_wait(exc) is not None:
        return None
    from .pacing import DEFAULT_WINDOW, margin, parse_limit  # HTTP only (see the module docstring)

    window = parse_limit(exc.message)[1] or DEFAULT_WINDOW
    return window + margin(window)


class _WaitRetryAfter:
    """Wait what the server asked (``Retry-After``, capped at ``cap``), else ``fallback``."""

    def __init__(self, fallback: Callable[[Any], float], cap: float) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: Any) -> float:
        asked = _asked_wait(_failure(retry_state))
        if asked is not None:
            return min(max(float(asked), 0.0), self.cap)
        window = _window_wait(_failure(retry_state))
        if window is not None:
            return window  # beyond max_wait: stop_before_delay ends the retrying
        return self.fallback(retry_state)


class _StopAfterAttemptsUnlessPaced:
    """Stop after ``max_attempts``, except while the server paces us with ``Retry-After``.

    A 429 or 503 that says when to come back is the server scheduling us, not a
    failure: many tasks of one run share a rate limit (20 creates a minute on the
    live service), so they wait their turn for as long as ``max_wait`` allows.
    """

    def __init__(self, max_attempts: int) -> None:
        self.max_attempts = max_attempts

    def __call__(self, retry_state: Any) -> bool:
        if retry_state.attempt_number >= PACED_ATTEMPTS_CAP or self.max_attempts == 1:
            return True  # max_attempts=1: one request, never a retry, whatever the server says
        exc = _failure(retry_state)
        # A window wait (429 without Retry-After) is pacing too, unless one attempt was asked.
        paced = _asked_wait(exc) is not None or (
            self.max_attempts > 1 and _window_wait(exc) is not None)
        return not paced and retry_state.attempt_number >= self.max_attempts


def _log_retry(retry_state: Any) -> None:
    exc = _failure(retry_state)
    if isinstance(exc, RateLimited):
        # One line per call however many windows it waits, not one per attempt.
        if getattr(retry_state, "pf_rate_logged", False):
            return
        retry_state.pf_rate_logged = True
        until = time.time() + (retry_state.upcoming_sleep or 0.0)
        log.warning(
            "pf-metaflow: %s; waiting for the escrow service's rate limit until %s, then "
            "retrying (PF_ESCROW_MAX_WAIT bounds the total wait)",
            getattr(exc, "message", exc), time.strftime("%H:%M:%S", time.localtime(until)),
        )
        return
    log.info(
        "pf-metaflow: attempt %d failed (%s: %s); retrying in %.2f s",
        retry_state.attempt_number,
        type(exc).__name__,
        getattr(exc, "message", exc),
        retry_state.upcoming_sleep,
    )


def retry_policy(max_attempts: int = 4, max_wait: float = 30.0) -> "tenacity.Retrying":
    """The client's one retry policy.

    At most ``max_attempts`` attempts (not counting waits the server asked for with
    ``Retry-After``), and never a wait that would take the time spent past
    ``max_wait`` seconds (so a ``Retry-After`` longer than that is not waited out:
    the :class:`RateLimited` error goes to the caller with its ``retry_after``).
    """
    import tenacity

    return tenacity.Retrying(
        stop=tenacity.stop_any(
            _StopAfterAttemptsUnlessPaced(max_attempts),  # type: ignore[arg-type]
            tenacity.stop_before_delay(max_wait),
        ),
        wait=_WaitRetryAfter(tenacity.wait_exponential_jitter(max=max_wait, jitter=0.5), cap=max_wait),
        retry=tenacity.retry_if_exception(retryable),
        sleep=lambda seconds: _sleep(seconds),  # looked up late: tests replace it
        before_sleep=_log_retry,
        reraise=True,
    )


def run(
    policy: Optional["tenacity.Retrying"], attempt: Callable[[], T], max_wait: Optional[float] = None
) -> T:
    """``attempt()`` under ``policy`` (None: once). A :class:`Resend` still failing when the
    attempts run out is the plain :class:`AmbiguousOutcome` it stands for; a 429 still
    there when ``max_wait`` is spent says how long it waited and that nothing happened."""
    started = time.monotonic()
    try:
        if policy is None:
            return attempt()
        return policy.copy()(attempt)
    except Resend as exc:
        raise AmbiguousOutcome(exc.message, status=exc.status, details=exc.details) from None
    except RateLimited as exc:
        if policy is None or exc.details.get("gave_up"):
            raise
        waited = time.monotonic() - started
        bound = "" if max_wait is None else f" (PF_ESCROW_MAX_WAIT: {max_wait:g} s)"
        asked = exc.retry_after
        later = f"; the server asked to come back in {asked:g} s" if asked is not None else ""
        raise RateLimited(
            f"{exc.message}: still rate limited after waiting {waited:.0f} s{bound}{later}. "
            "The request was refused with HTTP 429, so it was never processed: nothing "
            "was created, moved or locked by it",
            code=exc.code, status=exc.status,
            details={**exc.details, "gave_up": True, "waited": round(waited, 3)},
        ) from None
