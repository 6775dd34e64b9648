"""The escrow client's one retry policy: what is retried, how often, how long it waits.

Only failures that cannot move money twice are retried: a request that never left
(:class:`NetworkError`), "not now" answers (429, 503), and operations the client has
made safe to repeat by raising :class:`Resend` (a read; a release or refund checked
against the escrow first; a create re-sent with the same ``Idempotency-Key`` to a
server that honours it). Waits honour ``Retry-After``, else back off exponentially
with jitter.

tenacity is imported only when a policy is built: the embedded sandbox has nothing to
retry and never loads it. Tests replace :data:`_sleep` to record waits instead of
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
    return isinstance(exc, (RateLimited, ServiceUnavailable, Resend))


def _failure(retry_state: Any) -> Optional[BaseException]:
    return retry_state.outcome.exception() if retry_state.outcome else None


def _asked_wait(exc: Optional[BaseException]) -> Optional[float]:
    """The wait the server asked for (``Retry-After``, in the error's details), if any."""
    return getattr(exc, "details", {}).get("retry_after") if exc is not None else None


class _WaitRetryAfter:
    """Wait what the server asked (``Retry-After``, capped at ``cap``), else ``fallback``."""

    def __init__(self, fallback: Callable[[Any], float], cap: float) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: Any) -> float:
        asked = _asked_wait(_failure(retry_state))
        if asked is not None:
            return min(max(float(asked), 0.0), self.cap)
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
        if retry_state.attempt_number >= PACED_ATTEMPTS_CAP:
            return True
        paced = _asked_wait(_failure(retry_state)) is not None
        return not paced and retry_state.attempt_number >= self.max_attempts


def _log_retry(retry_state: Any) -> None:
    exc = _failure(retry_state)
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


def run(policy: Optional["tenacity.Retrying"], attempt: Callable[[], T]) -> T:
    """``attempt()`` under ``policy`` (None: once). A :class:`Resend` still failing when the
    attempts run out is the plain :class:`AmbiguousOutcome` it stands for."""
    try:
        if policy is None:
            return attempt()
        return policy.copy()(attempt)
    except Resend as exc:
        raise AmbiguousOutcome(exc.message, status=exc.status, details=exc.details) from None
