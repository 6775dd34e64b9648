"""The errors pf-metaflow raises, one hierarchy for the client, the sandbox and the decorator.

Catch the level you care about::

    PurpleFleaError
    ├── ConfigurationError        bad PF_ESCROW_URL / PF_API_KEY, key over plain HTTP
    ├── InvalidRequest            400: the request itself is wrong (also raised locally)
    │   ├── InvalidAmount
    │   ├── InvalidAgentId
    │   └── InvalidDescription
    ├── AuthenticationError       401
    ├── PermissionDenied          403: only an escrow's creator may release or refund it
    │                             (also raised locally: refund_pending for another's escrow)
    ├── InsufficientFunds         402
    ├── NotFound                  404: unknown escrow or counterparty
    ├── Conflict                  409
    │   ├── InvalidStatus         the escrow is not in a state that allows this
    │   └── IdempotencyConflict   same Idempotency-Key, different request
    ├── RateLimited               429 (``retry_after`` seconds, if the server said)
    ├── ServerError               5xx
    │   └── ServiceUnavailable    503
    ├── NetworkError              the request never reached the server (safe to retry)
    ├── AmbiguousOutcome          it may or may not have happened: check before retrying
    │                             (a lost answer; for a create also a 5xx or an unreadable 2xx)
    ├── ProtocolError             an answer we cannot read (HTML, empty, wrong shape)
    └── BudgetError               a budget or a payment plan is wrong (raised before money moves)

No message, repr or attribute of these errors ever holds an API key.
"""

from __future__ import annotations

from typing import Any, Optional


class PurpleFleaError(Exception):
    """Base class: ``message`` for people, ``code`` (the service's error code) for programs."""

    status: Optional[int] = None
    default_code = "error"

    def __init__(
        self,
        message: str,
        *,
        code: Optional[str] = None,
        status: Optional[int] = None,
        details: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        if status is not None:
            self.status = status
        self.details = dict(details or {})

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, message={self.message!r})"

    def __reduce__(self):
        # Keep errors picklable (Metaflow's @catch stores them as artifacts).
        return (_rebuild, (type(self), self.message, self.code, self.status, self.details))


def _rebuild(cls, message, code, status, details):
    return cls(message, code=code, status=status, details=details)


class ConfigurationError(PurpleFleaError):
    default_code = "configuration_error"


class InvalidRequest(PurpleFleaError):
    status = 400
    default_code = "invalid_request"


class InvalidAmount(InvalidRequest, ValueError):
    default_code = "invalid_amount"


class InvalidAgentId(InvalidRequest, ValueError):
    default_code = "invalid_counterparty"


class InvalidDescription(InvalidRequest, ValueError):
    default_code = "invalid_description"


class AuthenticationError(PurpleFleaError):
    status = 401
    default_code = "unauthorized"


class PermissionDenied(PurpleFleaError):
    status = 403
    default_code = "forbidden"


class InsufficientFunds(PurpleFleaError):
    status = 402
    default_code = "insufficient_balance"


class NotFound(PurpleFleaError):
    status = 404
    default_code = "not_found"


class Conflict(PurpleFleaError):
    status = 409
    default_code = "conflict"


class InvalidStatus(Conflict):
    default_code = "invalid_status"


class IdempotencyConflict(Conflict):
    default_code = "idempotency_conflict"


class RateLimited(PurpleFleaError):
    status = 429
    default_code = "rate_limited"

    @property
    def retry_after(self) -> Optional[float]:
        return self.details.get("retry_after")


class ServerError(PurpleFleaError):
    status = 500
    default_code = "internal_error"


class ServiceUnavailable(ServerError):
    status = 503
    default_code = "service_unavailable"

    @property
    def retry_after(self) -> Optional[float]:
        return self.details.get("retry_after")


class NetworkError(PurpleFleaError):
    """The request did not reach the server (connection refused, DNS): nothing happened."""

    default_code = "network_error"


class AmbiguousOutcome(PurpleFleaError):
    """The request may have taken effect (timeout or reset after sending; for a create,
    any 5xx or an answer we cannot read, since only a 4xx or a request never sent proves
    that nothing happened).

    ``details`` carries ``operation`` and, for a create, the ``description`` tag
    to look the escrow up by (and ``error_code``, the code of the answer, if one came).
    """

    default_code = "outcome_unknown"


class ProtocolError(PurpleFleaError):
    """The server answered something we cannot read (an HTML page, an empty body)."""

    default_code = "protocol_error"


class BudgetError(PurpleFleaError, ValueError):
    """A budget, weights or payment plan is wrong. Raised before any escrow is created."""

    default_code = "invalid_budget"


# The live service's error codes, and the class each maps to.
ERROR_CODES: dict[str, type[PurpleFleaError]] = {
    "invalid_amount": InvalidAmount,
    "invalid_description": InvalidDescription,
    "invalid_counterparty": InvalidAgentId,
    "self_escrow": InvalidAgentId,
    "unauthorized": AuthenticationError,
    "forbidden": PermissionDenied,
    "insufficient_balance": InsufficientFunds,
    "counterparty_not_found": NotFound,
    "creator_not_found": NotFound,
    "not_found": NotFound,
    "invalid_status": InvalidStatus,
    "idempotency_conflict": IdempotencyConflict,
    "rate_limited": RateLimited,
    "debit_failed": ServerError,
    "release_failed": ServerError,
    "internal_error": ServerError,
    "service_unavailable": ServiceUnavailable,
}

# Fallback by HTTP status when the body names no code we know.
STATUS_CLASSES: dict[int, type[PurpleFleaError]] = {
    400: InvalidRequest,
    401: AuthenticationError,
    402: InsufficientFunds,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_for(status: int, code: Optional[str], message: str, details: Optional[dict] = None) -> PurpleFleaError:
    """The error for a service answer: by its code if we know it, else by its HTTP status."""
    cls = ERROR_CODES.get(code or "")
    if cls is None:
        cls = STATUS_CLASSES.get(status, ServerError if status >= 500 else PurpleFleaError)
    return cls(message, code=code or cls.default_code, status=status, details=details)
