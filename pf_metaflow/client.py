"""The Purple Flea escrow client: one API over two transports.

``EscrowClient`` speaks the live wire protocol of DESIGN.md over HTTP (the live
service, or ``pf-metaflow sandbox serve``) through one ``requests.Session``, or calls
the SQLite sandbox engine in-process (the default when ``PF_ESCROW_URL`` is unset).

Retries follow one policy, :func:`retry_policy`, declared once below: only failures
that cannot move money twice are retried (the request never left, 429, 503, or an
operation the server makes safe to repeat). A create whose outcome is unknown is
retried only with an ``Idempotency-Key`` on a server that honours it; otherwise it
raises :class:`~pf_metaflow.errors.AmbiguousOutcome` and the caller decides.

The API key travels only in the ``Authorization`` header. It is never part of a
message, a repr, a log line or a pickle.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar, Union
from urllib.parse import urlsplit

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the HTTP side (requests, tenacity) loads only for http(s) URLs: see _http
    import requests
    import tenacity

from .errors import (
    AmbiguousOutcome,
    AuthenticationError,
    ConfigurationError,
    InvalidRequest,
    InvalidStatus,
    NetworkError,
    NotFound,
    ProtocolError,
    PurpleFleaError,
    RateLimited,
    ServiceUnavailable,
)
from .ids import (
    ESCROW_ID_RE,
    SANDBOX_PAYER,
    check_agent_id,
    check_api_key,
    check_description,
    check_escrow_id,
    redact,
)
from .money import ZERO, AmountLike, fee_for, parse_usdc, quantize, usdc_str

__all__ = [
    "Escrow",
    "Settlement",
    "EscrowClient",
    "default_client",
    "retry_policy",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

SANDBOX_CAPABILITIES = frozenset({"refund", "idempotency", "faucet", "balance"})
MAX_TIMEOUT_HOURS = 720
_HTTP_EXCERPT = 160
_TOKEN_RE = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces: safe in a header


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Escrow:
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

    def __str__(self) -> str:
        return self.escrow_id


@dataclass(frozen=True)
class Settlement:
    """What a release or refund did, or (``refund_pending``) will do by itself."""

    escrow_id: str
    status: str  # "released" | "refunded" | "refund_pending"
    amount_usd: Decimal  # amount released, refunded, or coming back (gross, before any fee)
    commission_usd: Decimal  # fee charged (0 for a sandbox refund)
    referral_commission_usd: Decimal
    net_usd: Decimal  # to the payee (release) / back to the payer (refund)
    expected_at: Optional[str] = None  # refund_pending: when the money comes back
    detail: str = ""  # human sentence on what happened


# --------------------------------------------------------------------------- retry policy


_sleep: Callable[[float], None] = time.sleep  # tests replace this to record waits


class _Resend(AmbiguousOutcome):
    """Internal: the outcome is unknown but sending again cannot move money twice."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, NetworkError):
        return exc.details.get("retryable", True)
    return isinstance(exc, (RateLimited, ServiceUnavailable, _Resend))


def retry_policy(max_attempts: int = 4, max_wait: float = 30.0) -> "tenacity.Retrying":
    """The client's one retry policy (see :func:`pf_metaflow._http.retry_policy`)."""
    from ._http import retry_policy as policy

    return policy(max_attempts, max_wait)


# --------------------------------------------------------------------------- parsing


def _money(record: Mapping[str, Any], field: str, *, required: bool = True) -> Optional[Decimal]:
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


def _escrow(record: Mapping[str, Any], *, replayed: bool = False) -> Escrow:
    status = _text(record, "status")
    if not status:
        raise ProtocolError("the escrow service's answer has no escrow status")
    hours = record.get("timeout_hours")
    if hours is not None and (isinstance(hours, bool) or not isinstance(hours, int)):
        raise ProtocolError(f"the answer has a non-integer timeout_hours: {hours!r}")
    return Escrow(
        escrow_id=_escrow_id(record),
        status=status,
        amount_usd=_money(record, "amount_usd"),
        commission_usd=_money(record, "commission_usd", required=False),
        net_to_counterparty=_money(record, "net_to_counterparty", required=False),
        description=_text(record, "description"),
        creator_id=_text(record, "creator_id"),
        counterparty_id=_text(record, "counterparty_id"),
        timeout_hours=hours,
        created_at=_text(record, "created_at"),
        auto_release_at=_text(record, "auto_release_at"),
        replayed=replayed,
    )


def _released(answer: Mapping[str, Any]) -> Settlement:
    """A release answer. ``amount_released`` is what the payee got (net of the commission)."""
    if answer.get("status") != "released":
        raise ProtocolError(f"a release answered status {answer.get('status')!r}, not 'released'")
    net = _money(answer, "amount_released")
    commission = _money(answer, "commission")
    referral = _money(answer, "referral_commission", required=False) or ZERO
    escrow_id = _escrow_id(answer)
    payee = _text(answer, "counterparty_id") or "the counterparty"
    return Settlement(
        escrow_id=escrow_id,
        status="released",
        amount_usd=net + commission,
        commission_usd=commission,
        referral_commission_usd=referral,
        net_usd=net,
        detail=f"released {usdc_str(net)} USDC to {payee} "
        f"({usdc_str(commission)} USDC commission)",
    )


def _released_before(escrow: Escrow) -> Settlement:
    commission = escrow.commission_usd
    if commission is None:
        commission = fee_for(escrow.amount_usd).commission
    net = escrow.net_to_counterparty
    if net is None:
        net = escrow.amount_usd - commission
    return Settlement(
        escrow_id=escrow.escrow_id,
        status="released",
        amount_usd=escrow.amount_usd,
        commission_usd=commission,
        referral_commission_usd=ZERO,  # not in GET answers; the release answer had it
        net_usd=net,
        detail=f"already released (read back from the service): {usdc_str(net)} USDC to "
        f"{escrow.counterparty_id or 'the counterparty'}",
    )


def _refunded(answer: Mapping[str, Any]) -> Settlement:
    if answer.get("status") != "refunded":
        raise ProtocolError(f"a refund answered status {answer.get('status')!r}, not 'refunded'")
    amount = _money(answer, "amount_refunded")
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


def _when(text: Optional[str]) -> Optional[datetime]:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _refunded_before(
    escrow: Escrow, record: Mapping[str, Any], explicit_default: bool
) -> Settlement:
    """An escrow found already refunded: by a refund call (no fee) or by timeout (1% fee)."""
    refunded_at, due = _when(_text(record, "refunded_at")), _when(escrow.auto_release_at)
    explicit = refunded_at < due if (refunded_at and due) else explicit_default
    commission = ZERO if explicit else fee_for(escrow.amount_usd).commission
    net = escrow.amount_usd - commission
    how = "by a refund, in full" if explicit else "automatically at its timeout, minus 1%"
    return Settlement(
        escrow_id=escrow.escrow_id,
        status="refunded",
        amount_usd=escrow.amount_usd,
        commission_usd=commission,
        referral_commission_usd=ZERO,
        net_usd=net,
        detail=f"already refunded {how}: {usdc_str(net)} USDC back to "
        f"{escrow.creator_id or 'the creator'}",
    )


def _refund_pending(escrow: Escrow) -> Settlement:
    fee = fee_for(escrow.amount_usd)
    when = escrow.auto_release_at or "its timeout"
    return Settlement(
        escrow_id=escrow.escrow_id,
        status="refund_pending",
        amount_usd=escrow.amount_usd,
        commission_usd=fee.commission,
        referral_commission_usd=ZERO,
        net_usd=fee.net,
        expected_at=escrow.auto_release_at,
        detail=f"this escrow service has no refund call: {usdc_str(fee.net)} USDC "
        f"({usdc_str(escrow.amount_usd)} minus the 1% commission of {usdc_str(fee.commission)}) "
        f"returns to the payer automatically at {when}; no call can hasten it",
    )


# --------------------------------------------------------------------------- configuration


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _http_base(url: str) -> tuple[str, str]:
    """``(base URL for requests, host)`` or ConfigurationError. Messages never echo the URL,
    which might hold a secret someone pasted into it."""
    parts = urlsplit(url)
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigurationError("PF_ESCROW_URL has an invalid port") from None
    if not host:
        raise ConfigurationError("PF_ESCROW_URL has no host: use https://escrow.purpleflea.com")
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(
            "PF_ESCROW_URL must not contain a user name or password: the key goes in PF_API_KEY"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError("PF_ESCROW_URL must be a base URL, without '?' or '#' parts")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}", host


def _engine_class():
    # Imported on first use: the HTTP client needs neither sqlite3 nor the engine.
    from .sandbox.engine import SandboxEngine

    return SandboxEngine


def _sandbox_path(url: str) -> Path:
    rest = url[len("sandbox:"):]
    if rest.startswith("//"):
        netloc, _, path = rest[2:].partition("/")
        if netloc:
            raise ConfigurationError(
                "PF_ESCROW_URL sandbox form is sandbox: or sandbox:///absolute/path/escrow.db"
            )
        rest = "/" + path if path else ""
    if not rest:
        return Path(_engine_class().default_path())
    return Path(rest).expanduser().absolute()


# --------------------------------------------------------------------------- transports


class _EmbeddedTransport:
    """The sandbox engine in-process: same answers as the HTTP sandbox, no network."""

    def __init__(self, path: Path, key: Optional[str]) -> None:
        self.path = path
        self._key = key
        self._engine: Any = None
        self._agent: Optional[str] = None
        self._lock = threading.Lock()

    def _open(self) -> tuple[Any, str]:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    engine = _engine_class()(self.path)
                    agent = SANDBOX_PAYER if self._key is None else engine.agent_for_key(self._key)
                    if agent is None:
                        raise AuthenticationError(
                            "the embedded sandbox does not know this API key (PF_ESCROW_URL is "
                            "unset, so pf-metaflow uses the sandbox). Unset PF_API_KEY to pay as "
                            "ag_sandbox_payer, or set PF_ESCROW_URL=https://escrow.purpleflea.com "
                            "to use the live service",
                            status=401,
                        )
                    self._agent = agent
                    self._engine = engine
        return self._engine, self._agent  # type: ignore[return-value]

    def create(
        self,
        amount: Decimal,
        description: str,
        counterparty: str,
        timeout_hours: Optional[int],
        referral_code: Optional[str],
        idempotency_key: Optional[str],
    ) -> tuple[dict, bool]:
        engine, agent = self._open()
        record, replayed = engine.create(
            agent,
            amount_usd=amount,
            description=description,
            counterparty_agent_id=counterparty,
            timeout_hours=24 if timeout_hours is None else timeout_hours,
            referral_code=referral_code,
            idempotency_key=idempotency_key,
        )
        return record, bool(replayed)

    def release(self, escrow_id: str) -> dict:
        engine, agent = self._open()
        return engine.release(agent, escrow_id)

    def refund(self, escrow_id: str) -> dict:
        engine, agent = self._open()
        return engine.refund(agent, escrow_id)

    def get(self, escrow_id: str) -> dict:
        engine, _ = self._open()
        return engine.get(escrow_id)

    def capabilities(self) -> frozenset[str]:
        return SANDBOX_CAPABILITIES

    def balance(self) -> dict:
        engine, agent = self._open()
        return engine.balance(agent)


# --------------------------------------------------------------------------- the client


def _escrow_id_of(escrow: Union[str, Escrow]) -> str:
    return check_escrow_id(escrow.escrow_id if isinstance(escrow, Escrow) else escrow)


def _check_timeout_hours(value: object) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TIMEOUT_HOURS:
        raise InvalidRequest(
            f"timeout_hours must be a whole number of hours from 1 to {MAX_TIMEOUT_HOURS}, "
            f"got {value!r}",
            code="invalid_timeout_hours",
        )
    return value


def _check_token(value: object, name: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not _TOKEN_RE.match(value):
        raise InvalidRequest(
            f"{name} must be 1-255 printable ASCII characters without spaces, got {value!r}",
            code=f"invalid_{name}",
        )
    return value


class EscrowClient:
    """Create, release, refund and read Purple Flea escrows.

    Parameters
    ----------
    url : str, optional
        The escrow service. Default ``$PF_ESCROW_URL``. Unset, ``"sandbox:"`` or
        ``"sandbox:///abs/path.db"``: the embedded sandbox engine (no network). An
        ``https://`` URL: the live service or a sandbox server (plain ``http://`` only
        to loopback hosts, so the key never crosses a network in clear text).
    api_key : str, optional
        Default ``$PF_API_KEY``. Required over HTTP. Optional for the embedded
        sandbox: no key pays as ``ag_sandbox_payer``.
    timeout : float
        Seconds to wait for the service to connect and to answer, per attempt.
    max_attempts : int
        Attempts per call, counting the first.
    max_wait : float
        Retrying stops once the time since the first attempt, plus the wait before the
        next, would reach this many seconds; so a ``Retry-After`` this long or longer is
        not waited out (the error says how long the server asked). 0 disables retries.
    session : requests.Session, optional
        Reuse your own session (proxies, TLS settings); one is made otherwise.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = 10.0,
        max_attempts: int = 4,
        max_wait: float = 30.0,
        session: Optional[requests.Session] = None,
    ) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be a whole number >= 1: {max_attempts!r}")
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be a positive number of seconds: {timeout!r}")
        if not max_wait >= 0:
            raise ConfigurationError(f"max_wait must be >= 0 seconds, got {max_wait!r}")
        key_source = "api_key" if api_key else "PF_API_KEY"
        url = (url if url is not None else os.environ.get("PF_ESCROW_URL", "")).strip()
        key = api_key if api_key else (os.environ.get("PF_API_KEY") or None)
        if key is not None:
            check_api_key(key, source=key_source)
        self._key = key
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.max_wait = max_wait
        self._policy: Optional["tenacity.Retrying"] = None  # the embedded engine has nothing to retry
        self._capabilities: Optional[frozenset[str]] = None
        self._transport: Any

        if not url or url.lower().startswith("sandbox:"):
            path = _sandbox_path(url or "sandbox:")
            self.is_embedded = True
            self.url = f"sandbox://{path}"
            self._transport = _EmbeddedTransport(path, key)
            return
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme not in ("http", "https"):
            raise ConfigurationError(
                "PF_ESCROW_URL must be an https:// URL (e.g. https://escrow.purpleflea.com), "
                "sandbox: or unset"
            )
        base, host = _http_base(url)
        if key is None:
            raise ConfigurationError(
                f"no API key for the escrow service at {redact(base, key)}: set PF_API_KEY "
                "(or pass api_key=) to your Purple Flea key (pf_live_…)"
            )
        if scheme == "http" and not _is_loopback(host):
            raise ConfigurationError(
                f"refusing to send the API key over plain http to {host}: use https:// "
                "(plain http is allowed only to 127.0.0.1, ::1 and localhost)"
            )
        self.is_embedded = False
        self.url = redact(base, key)
        from . import _http

        self._policy = _http.retry_policy(max_attempts, max_wait)
        self._transport = _http.HttpTransport(base, key, timeout, session or _http.requests.Session())

    def __repr__(self) -> str:
        return f"EscrowClient(url={self.url!r}, key={'set' if self._key else 'unset'})"

    def __reduce__(self):
        # A pickled client would carry the key into artifacts or caches: refuse loudly.
        raise TypeError(
            "EscrowClient holds an API key and cannot be pickled or copied; create it where "
            "you use it (pf_metaflow.client.default_client())"
        )

    # -- capabilities -----------------------------------------------------------------

    def capabilities(self) -> frozenset[str]:
        """The extensions the server offers ("refund", "idempotency", "faucet", "balance").

        The embedded sandbox has all of them. Over HTTP, read once from
        ``/openapi.json``'s ``x-pf-sandbox`` marker; the live service has none.
        """
        caps = self._capabilities
        if caps is None:
            caps = self._run(self._read_capabilities)
            self._capabilities = caps
        return caps

    def _read_capabilities(self) -> frozenset[str]:
        try:
            return self._transport.capabilities()
        except AmbiguousOutcome as exc:  # a GET: asking again is harmless
            raise _Resend(exc.message, details=exc.details) from None

    def _has(self, capability: str) -> bool:
        """Like ``capability in capabilities()`` but False when they cannot be read."""
        try:
            return capability in self.capabilities()
        except PurpleFleaError:
            return False

    @property
    def supports_refund(self) -> bool:
        return "refund" in self.capabilities()

    @property
    def supports_idempotency(self) -> bool:
        return "idempotency" in self.capabilities()

    # -- operations -------------------------------------------------------------------

    def _run(self, attempt: Callable[[], T]) -> T:
        try:
            if self._policy is None:
                return attempt()
            return self._policy.copy()(attempt)
        except _Resend as exc:  # attempts ran out while the outcome stayed unknown
            raise AmbiguousOutcome(exc.message, status=exc.status, details=exc.details) from None

    def create(
        self,
        amount_usd: AmountLike,
        *,
        counterparty_agent_id: str,
        description: str,
        timeout_hours: Optional[int] = None,
        referral_code: Optional[str] = None,
        idempotency_key: Optional[str] = None,
    ) -> Escrow:
        """Lock ``amount_usd`` USDC in a new escrow for ``counterparty_agent_id``.

        Everything is validated before any request. ``Idempotency-Key`` is sent only
        when ``idempotency_key`` is given; a create whose outcome is unknown is retried
        only then, and only if the server honours it. Otherwise it raises
        :class:`AmbiguousOutcome` (``details``: operation, description, amount, payee).
        """
        amount = parse_usdc(amount_usd, name="amount_usd")
        check_agent_id(counterparty_agent_id, name="counterparty_agent_id")
        check_description(description)
        timeout_hours = _check_timeout_hours(timeout_hours)
        referral_code = _check_token(referral_code, "referral_code")
        idempotency_key = _check_token(idempotency_key, "idempotency_key")
        transport = self._transport

        def attempt() -> Escrow:
            try:
                record, replayed = transport.create(
                    amount,
                    description,
                    counterparty_agent_id,
                    timeout_hours,
                    referral_code,
                    idempotency_key,
                )
            except AmbiguousOutcome as exc:
                details = {
                    **exc.details,
                    "operation": "create",
                    "description": description,
                    "amount_usd": usdc_str(amount),
                    "counterparty_agent_id": counterparty_agent_id,
                }
                if idempotency_key is not None and self._has("idempotency"):
                    raise _Resend(exc.message, status=exc.status, details=details) from None
                why = (
                    "the service does not honour idempotency keys"
                    if idempotency_key is not None
                    else "no idempotency_key was given"
                )
                raise AmbiguousOutcome(
                    f"{exc.message}. It was not retried ({why}), so it cannot be retried "
                    f"safely: look for an escrow described {description!r} before creating "
                    "another",
                    status=exc.status,
                    details=details,
                ) from None
            return _escrow(record, replayed=replayed)

        return self._run(attempt)

    def release(self, escrow_id: Union[str, Escrow]) -> Settlement:
        """Pay the escrow to its counterparty (less the 1% commission).

        Safe to call again: an escrow found already released gives the same
        Settlement instead of an error, and an unanswered release is checked before
        it is sent again.
        """
        escrow_id = _escrow_id_of(escrow_id)
        return self._settle(escrow_id, "released", self._transport.release, _released)

    def refund(self, escrow_id: Union[str, Escrow]) -> Settlement:
        """Give the escrowed amount back to the payer.

        With a refund endpoint (the sandbox): a full refund, no commission. On the
        live service (none): ``refund_pending``, the amount less 1% coming back
        automatically at ``expected_at``.
        """
        escrow_id = _escrow_id_of(escrow_id)
        if self.supports_refund:
            return self._settle(escrow_id, "refunded", self._transport.refund, _refunded)
        escrow = self.get(escrow_id)
        if escrow.status in ("funded", "completed"):
            return _refund_pending(escrow)
        if escrow.status == "refunded":
            return _refunded_before(escrow, {}, explicit_default=False)
        if escrow.status == "disputed":
            raise InvalidStatus(
                f"refund {escrow_id}: the escrow is disputed; its funds stay locked until "
                "Purple Flea reviews it",
                details={"escrow_status": escrow.status},
            )
        raise InvalidStatus(
            f"refund {escrow_id}: the escrow is already {escrow.status}; it cannot be refunded",
            details={"escrow_status": escrow.status},
        )

    def _settle(
        self,
        escrow_id: str,
        goal: str,
        send: Callable[[str], dict],
        parse: Callable[[Mapping[str, Any]], Settlement],
    ) -> Settlement:
        """Release or refund: send; when unsure (no answer, or "invalid status"), read the
        escrow back and report what is true instead of sending blindly."""
        verb = "release" if goal == "released" else "refund"

        def look() -> tuple[Escrow, dict]:
            record = self._transport.get(escrow_id)
            return _escrow(record), record

        def settled(escrow: Escrow, record: dict) -> Settlement:
            if goal == "released":
                return _released_before(escrow)
            return _refunded_before(escrow, record, explicit_default=True)

        def attempt() -> Settlement:
            try:
                return parse(send(escrow_id))
            except InvalidStatus:
                try:
                    escrow, record = look()
                except PurpleFleaError:
                    escrow = None
                if escrow is not None and escrow.status == goal:
                    return settled(escrow, record)
                raise
            except AmbiguousOutcome as exc:
                try:
                    escrow, record = look()
                except NotFound:
                    raise
                except PurpleFleaError:
                    # Unknown, and unreadable for now: sending again is safe, the service
                    # refuses a second settlement (409), which the next attempt handles.
                    raise _Resend(exc.message, status=exc.status, details=exc.details) from None
                if escrow.status == goal:
                    return settled(escrow, record)
                if escrow.status in ("funded", "completed"):
                    raise _Resend(
                        f"{exc.message}; the escrow was still {escrow.status} when read back, "
                        f"so it was not {goal}",
                        status=exc.status,
                        details={**exc.details, "operation": verb, "escrow_id": escrow_id},
                    ) from None
                raise InvalidStatus(
                    f"{verb} {escrow_id}: the escrow is {escrow.status}, so it cannot be {goal}",
                    details={"escrow_status": escrow.status},
                ) from None

        return self._run(attempt)

    def get(self, escrow_id: Union[str, Escrow]) -> Escrow:
        """Read an escrow's current state."""
        escrow_id = _escrow_id_of(escrow_id)
        transport = self._transport

        def attempt() -> Escrow:
            try:
                return _escrow(transport.get(escrow_id))
            except AmbiguousOutcome as exc:  # a GET: asking again is harmless
                raise _Resend(exc.message, status=exc.status, details=exc.details) from None

        return self._run(attempt)

    def balance(self) -> Optional[dict]:
        """``{"agent_id", "usdc", "locked"}`` on a sandbox; None on the live service."""
        if "balance" not in self.capabilities():
            return None
        transport = self._transport

        def attempt() -> dict:
            try:
                answer = transport.balance()
            except AmbiguousOutcome as exc:
                raise _Resend(exc.message, status=exc.status, details=exc.details) from None
            return {
                "agent_id": _text(answer, "agent_id"),
                "usdc": _money(answer, "usdc"),
                "locked": _money(answer, "locked"),
            }

        return self._run(attempt)


_default_clients: dict[tuple, EscrowClient] = {}
_default_lock = threading.Lock()


def default_client() -> EscrowClient:
    """The client for ``$PF_ESCROW_URL`` / ``$PF_API_KEY``, made once per value and reused.

    For the embedded sandbox the database location ($PF_SANDBOX_DB, else under the
    working directory) is part of the cache key too.
    """
    url = os.environ.get("PF_ESCROW_URL", "").strip()
    key = os.environ.get("PF_API_KEY") or None
    timeout = _env_seconds("PF_ESCROW_TIMEOUT", 10.0, upper=600)
    max_wait = _env_seconds("PF_ESCROW_MAX_WAIT", 30.0, upper=86400)
    cache_key: tuple = (url, key, timeout, max_wait)
    if not url or url.lower().startswith("sandbox:"):
        cache_key += (os.environ.get("PF_SANDBOX_DB"), os.getcwd())
    client = _default_clients.get(cache_key)
    if client is None:
        with _default_lock:
            client = _default_clients.get(cache_key)
            if client is None:
                # Read from the environment by the client itself, so its messages name
                # PF_ESCROW_URL / PF_API_KEY (what the user set), not api_key=.
                client = EscrowClient(timeout=timeout, max_wait=max_wait)
                _default_clients[cache_key] = client
    return client


def _env_seconds(name: str, default: float, *, upper: float) -> float:
    """A number of seconds from the environment: ``PF_ESCROW_TIMEOUT`` (per attempt, default
    10) or ``PF_ESCROW_MAX_WAIT`` (longest time spent retrying one call, default 30)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= upper:
        raise ConfigurationError(f"{name} must be a number of seconds from 0 to {upper:g}, got {raw!r}")
    return value
