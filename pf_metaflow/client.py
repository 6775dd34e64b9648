"""The Purple Flea escrow client: one API over two transports.

``EscrowClient`` speaks the live wire protocol of docs/design.md over HTTP (the live service,
or ``pf-metaflow sandbox serve``: :mod:`pf_metaflow._http`) or calls the SQLite sandbox
engine in-process (the default when ``PF_ESCROW_URL`` is unset: :mod:`pf_metaflow._embedded`).
What the service's answers mean is read in :mod:`pf_metaflow.answers`; what is retried
is :mod:`pf_metaflow.retries`' one policy. The embedded path loads neither the HTTP
transport (requests), the retry policy (tenacity) nor the rate-limit pacing: every paid
Metaflow task is a new process, and it pays for each module it imports.

A create is retried only when the service provably did nothing (429, a request that
never left), or with an ``Idempotency-Key`` on a server that honours it. Otherwise a
create whose outcome is unknown (no answer, a 5xx, a proxy's error page) raises
:class:`~pf_metaflow.errors.AmbiguousOutcome` and the caller decides.

The API key travels only in the ``Authorization`` header. It is never part of a
message, a repr, a log line or a pickle.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, TypeVar, Union

from ._embedded import EmbeddedTransport, is_sandbox_url, sandbox_path
from .answers import (
    OPEN_STATUSES,
    Capabilities,
    Escrow,
    Settlement,
    create_outcome_unknown,
    parse_balance,
    parse_escrow,
    parse_refund,
    parse_release,
    refund_pending,
    settlement_of,
)
from .errors import (
    AmbiguousOutcome,
    ConfigurationError,
    InvalidRequest,
    InvalidStatus,
    NotFound,
    PermissionDenied,
    PurpleFleaError,
)
from .ids import check_agent_id, check_api_key, check_description, check_escrow_id, redact
from .money import AmountLike, parse_usdc, usdc_str
from .retries import Resend, retry_policy, run

if TYPE_CHECKING:  # requests, tenacity and the pacing load only for http(s) URLs
    import requests
    import tenacity

    from .pacing import Pacer

__all__ = [
    "Escrow",
    "Settlement",
    "EscrowClient",
    "default_client",
    "retry_policy",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_TIMEOUT_HOURS = 720
# Ten of the live service's 60 s rate-limit windows. With run-level pacing a shard waits
# about one window per 20 shards running at once ahead of it, so this lets a fan-out of
# up to ~200 concurrent shards (Metaflow's --max-workers) get paid; a shard still
# without a slot after ten minutes is better reported unpaid than left hanging.
DEFAULT_MAX_WAIT = 600.0
_TOKEN_RE = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces: safe in a header


def _read(fetch: Callable[[], T]) -> T:
    """A read whose answer was lost: asking again is harmless."""
    try:
        return fetch()
    except AmbiguousOutcome as exc:
        raise Resend(exc.message, status=exc.status, details=exc.details) from None


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
        The most time one call spends waiting to retry (default 600 s: ten live
        rate-limit windows). Retrying stops once the time since the first attempt, plus
        the wait before the next, would pass it; so a ``Retry-After`` or rate-limit
        window ending later is not waited out, and the :class:`RateLimited` says how
        long it waited and that nothing was processed. 0 disables retries.
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
        max_wait: float = DEFAULT_MAX_WAIT,
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
        self._policy: Optional[tenacity.Retrying] = None  # the embedded engine has nothing to retry
        self._pacer: Optional[Pacer] = None  # nor any rate limit to pace to
        self._capabilities: Optional[Capabilities] = None
        self._agent_id: Optional[str] = None  # whose key this is, once some answer said so
        self._warned: set[str] = set()
        self._transport: Any

        if is_sandbox_url(url):
            path = sandbox_path(url)
            self.is_embedded = True
            self.url = f"sandbox://{path}"
            self._transport = EmbeddedTransport(path, key)
            return
        from ._http import HttpTransport, http_base
        from .pacing import Pacer

        base = http_base(url, key)
        assert key is not None  # http_base refuses a URL without one
        self.is_embedded = False
        self.url = redact(base, key)
        self._policy = retry_policy(max_attempts, max_wait)
        self._pacer = Pacer(base, key)  # the file is named by a hash: the key is not stored
        self._transport = HttpTransport(base, key, timeout, session)

    def __repr__(self) -> str:
        return f"EscrowClient(url={self.url!r}, key={'set' if self._key else 'unset'})"

    def __reduce__(self):
        # A pickled client would carry the key into artifacts or caches: refuse loudly.
        raise TypeError(
            "EscrowClient holds an API key and cannot be pickled or copied; create it where "
            "you use it (pf_metaflow.client.default_client())"
        )

    def _run(self, attempt: Callable[[], T]) -> T:
        return run(self._policy, attempt, self.max_wait)

    # -- what the server offers ------------------------------------------------------

    def _server(self) -> Capabilities:
        """The server's capabilities, read once (``/openapi.json``) and kept."""
        caps = self._capabilities
        if caps is None:
            caps = self._run(lambda: _read(self._transport.capabilities))
            self._capabilities = caps
        return caps

    def capabilities(self) -> frozenset[str]:
        """The extensions the server offers ("refund", "idempotency", "faucet", "balance").

        The embedded sandbox has all of them. Over HTTP, read once from
        ``/openapi.json``'s ``x-pf-sandbox`` marker; the live service has none.
        """
        return self._server().extensions

    def _has(self, capability: str) -> bool:
        """Like ``capability in capabilities()`` but False when they cannot be read."""
        try:
            return capability in self.capabilities()
        except PurpleFleaError:
            return False

    @property
    def is_sandbox(self) -> bool:
        """True for the embedded sandbox and a server that says it is a sandbox (test money);
        False for the live service. Over HTTP the first use reads ``/openapi.json`` (and
        raises the :class:`PurpleFleaError` of that read if it fails)."""
        return self.is_embedded or self._server().sandbox

    @property
    def supports_refund(self) -> bool:
        return "refund" in self.capabilities()

    @property
    def supports_idempotency(self) -> bool:
        return "idempotency" in self.capabilities()

    def _warn_once(self, kind: str, message: str, *args: Any) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message, *args)

    def _honours_idempotency(self) -> Optional[bool]:
        """Whether an Idempotency-Key does anything on this server (None: cannot tell now)."""
        try:
            honoured = "idempotency" in self.capabilities()
        except PurpleFleaError as exc:
            self._warn_once(
                "idempotency_unknown",
                "pf-metaflow: could not learn whether the escrow service at %s honours idempotency "
                "keys (%s); until it can, a create whose answer is lost is not retried",
                self.url, exc.message,
            )
            return None
        if not honoured:
            self._warn_once(
                "idempotency_ignored",
                "pf-metaflow: the escrow service at %s does not honour idempotency keys: the "
                "idempotency_key given to create does nothing there, and a create whose answer "
                "is lost cannot be retried (it raises AmbiguousOutcome: look the escrow up by its "
                "description before creating another)",
                self.url,
            )
        return honoured

    # -- whose key this is -------------------------------------------------------------

    def _learn_agent(self, agent_id: Optional[str]) -> None:
        if agent_id and self._agent_id is None:
            self._agent_id = agent_id

    def _own_agent_id(self) -> Optional[str]:
        """The agent this client's key belongs to, where the server lets us learn it with a
        read (never by changing anything): the embedded engine, a sandbox's balance, or an
        earlier create answer's ``creator_id``."""
        if self._agent_id is None:
            self._learn_agent(self._transport.agent_id())
        if self._agent_id is None and self._has("balance"):
            try:
                self.balance()
            except PurpleFleaError:
                pass
        return self._agent_id

    def _check_creator(self, escrow: Escrow, expected: Optional[str]) -> Optional[str]:
        """Raise PermissionDenied unless this key's agent (and ``expected``) created
        ``escrow``; a note for the detail when nobody can tell."""
        if escrow.creator_id is None:
            return "its creator could not be verified (the service did not say who created it)"
        own = self._own_agent_id()
        for agent, who in ((own, "the agent of this client's API key"),
                           (expected, "the creator the caller expected")):
            if agent is not None and agent != escrow.creator_id:
                raise PermissionDenied(
                    f"refund {escrow.escrow_id}: the escrow was created by {escrow.creator_id}, "
                    f"not by {agent} ({who}); only its creator can have it back, so no refund "
                    "is pending for this caller",
                    details={"creator_id": escrow.creator_id, "expected_creator_id": agent},
                )
        if own is None and expected is None:
            return ("its creator could not be verified: this service cannot say whose API key "
                    "this is (pass creator_id= to check it)")
        return None

    # -- operations -------------------------------------------------------------------

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
        when ``idempotency_key`` is given. A create whose outcome is unknown (no answer,
        a 5xx, an unreadable answer) is re-sent only with a key, to a server that honours
        it; otherwise it raises :class:`AmbiguousOutcome` (``details``: operation,
        description, amount, payee). On a server that ignores keys, a key is reported
        once per client as a warning and ``Escrow.idempotency_honoured`` is False.
        """
        amount = parse_usdc(amount_usd, name="amount_usd")
        check_agent_id(counterparty_agent_id, name="counterparty_agent_id")
        check_description(description)
        timeout_hours = _check_timeout_hours(timeout_hours)
        referral_code = _check_token(referral_code, "referral_code")
        idempotency_key = _check_token(idempotency_key, "idempotency_key")
        honoured = None if idempotency_key is None else self._honours_idempotency()
        transport = self._transport

        def attempt() -> Escrow:
            try:
                record, replayed = transport.create(
                    amount, description, counterparty_agent_id, timeout_hours, referral_code,
                    idempotency_key,
                )
                escrow = parse_escrow(record, replayed=replayed, idempotency_honoured=honoured)
            except PurpleFleaError as exc:
                if not create_outcome_unknown(exc):
                    raise
                details = {
                    **exc.details,
                    "operation": "create",
                    "description": description,
                    "amount_usd": usdc_str(amount),
                    "counterparty_agent_id": counterparty_agent_id,
                }
                raise _unknown_create(exc, details, idempotency_key, honoured) from None
            self._learn_agent(escrow.creator_id)
            return escrow

        pacer = self._pacer
        if pacer is None:
            return self._run(attempt)
        # Over HTTP, creates share the run's rate-limit window with every other process
        # using this URL and key: wait for a slot rather than stampede (pf_metaflow.pacing).
        from .pacing import Budget

        budget = Budget("create escrow", self.max_wait)
        retry = self.max_attempts > 1
        return self._run(lambda: pacer.send(attempt, budget, retry))

    def release(self, escrow_id: Union[str, Escrow]) -> Settlement:
        """Pay the escrow to its counterparty (less the 1% commission).

        Safe to call again: an escrow found already released gives its Settlement
        (``referral_commission_usd`` None: a read-back does not carry it) instead of an
        error, and an unanswered release is checked before it is sent again.
        """
        escrow_id = _escrow_id_of(escrow_id)
        return self._settle(escrow_id, "released", self._transport.release, parse_release)

    def refund(self, escrow_id: Union[str, Escrow], *, creator_id: Optional[str] = None) -> Settlement:
        """Give the escrowed amount back to the payer.

        With a refund endpoint (the sandbox): a full refund, no commission. On the
        live service (none): ``refund_pending``, the amount less the service's commission
        coming back by itself at ``expected_at``, reported only for an escrow this
        client's key created: ``creator_id`` is the creator the caller expects (the
        create answer's). Another creator raises :class:`PermissionDenied`; when neither
        this key's agent nor ``creator_id`` is known, ``detail`` says so.
        """
        escrow_id = _escrow_id_of(escrow_id)
        if creator_id is not None:
            check_agent_id(creator_id, name="creator_id")
        if self.supports_refund:
            return self._settle(escrow_id, "refunded", self._transport.refund, parse_refund)
        escrow = self.get(escrow_id)
        note = self._check_creator(escrow, creator_id)
        if escrow.status in OPEN_STATUSES:
            return refund_pending(escrow, note=note)
        settled = settlement_of(escrow)
        if settled is not None and settled.status == "refunded":
            return settled
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

        def reached(escrow: Escrow) -> Optional[Settlement]:
            settled = settlement_of(escrow)
            return settled if settled is not None and settled.status == goal else None

        def look() -> Escrow:
            return parse_escrow(self._transport.get(escrow_id))

        def attempt() -> Settlement:
            try:
                return parse(send(escrow_id))
            except InvalidStatus:
                try:
                    done = reached(look())
                except PurpleFleaError:
                    done = None
                if done is not None:
                    return done
                raise
            except AmbiguousOutcome as exc:
                try:
                    escrow = look()
                except NotFound:
                    raise
                except PurpleFleaError:
                    # Unknown, and unreadable for now: sending again is safe, the service
                    # refuses a second settlement (409), which the next attempt handles.
                    raise Resend(exc.message, status=exc.status, details=exc.details) from None
                done = reached(escrow)
                if done is not None:
                    return done
                if escrow.status in OPEN_STATUSES:
                    raise Resend(
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
        return self._run(lambda: parse_escrow(_read(lambda: transport.get(escrow_id))))

    def balance(self) -> Optional[dict]:
        """``{"agent_id", "usdc", "locked"}`` on a sandbox; None on the live service."""
        if "balance" not in self.capabilities():
            return None
        answer = parse_balance(self._run(lambda: _read(self._transport.balance)))
        self._learn_agent(answer["agent_id"])
        return answer


def _unknown_create(
    exc: PurpleFleaError, details: dict, key: Optional[str], honoured: Optional[bool]
) -> AmbiguousOutcome:
    """The error for a create whose outcome is unknown: re-sent (:class:`Resend`) only with a
    key the server honours, else an :class:`AmbiguousOutcome` that says how to check."""
    message = exc.message
    if not isinstance(exc, AmbiguousOutcome):
        details.setdefault("error_code", exc.code)
        message += "; the escrow may or may not have been created"
    if key is not None and honoured:
        return Resend(message, status=exc.status, details=details)
    if key is None:
        why = "no idempotency_key was given"
    elif honoured is None:
        why = "it could not be learned whether the service honours idempotency keys"
    else:
        why = "the service does not honour idempotency keys"
    return AmbiguousOutcome(
        f"{message}. It was not retried ({why}), so it cannot be retried safely: look for an "
        f"escrow described {details['description']!r} before creating another",
        status=exc.status,
        details=details,
    )


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
    max_wait = _env_seconds("PF_ESCROW_MAX_WAIT", DEFAULT_MAX_WAIT, upper=86400)
    cache_key: tuple = (url, key, timeout, max_wait)
    if is_sandbox_url(url):
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
    10) or ``PF_ESCROW_MAX_WAIT`` (longest time one call spends waiting: for the rate
    limit, a ``Retry-After``, or between retries; default 600)."""
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
