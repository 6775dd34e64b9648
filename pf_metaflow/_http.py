"""The HTTP transport: the live wire protocol over one ``requests.Session``.

It knows the wire (paths, headers, status codes, what a dropped connection means) and
nothing above it: answers go up as the service's JSON objects, failures as the errors of
:mod:`pf_metaflow.errors`. What an answer *means* is :mod:`pf_metaflow.answers`' call.

Loaded only when an ``http(s)://`` escrow URL is configured, so that the embedded
sandbox (the default, and every Metaflow task of a sandbox run) never imports
``requests`` or ``urllib3``.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import sys
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import MaxRetryError, NewConnectionError

from .answers import Capabilities, parse_capabilities, parse_money
from .errors import (
    AmbiguousOutcome,
    ConfigurationError,
    NetworkError,
    NotFound,
    ProtocolError,
    error_for,
)
from .ids import redact

_HTTP_EXCERPT = 160


# --------------------------------------------------------------------------- configuration


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def http_base(url: str, key: Optional[str]) -> str:
    """The base URL requests are sent to, or ConfigurationError.

    The key goes over HTTPS only, except to loopback. Messages never echo the URL,
    which might hold a secret someone pasted into it.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise ConfigurationError(
            "PF_ESCROW_URL must be an https:// URL (e.g. https://escrow.purpleflea.com), "
            "sandbox: or unset"
        )
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
    base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    if key is None:
        raise ConfigurationError(
            f"no API key for the escrow service at {base}: set PF_API_KEY "
            "(or pass api_key=) to your Purple Flea key (pf_live_…)"
        )
    if scheme == "http" and not _is_loopback(host):
        raise ConfigurationError(
            f"refusing to send the API key over plain http to {host}: use https:// "
            "(plain http is allowed only to 127.0.0.1, ::1 and localhost)"
        )
    return base


def _retry_after(value: Optional[str]) -> Optional[float]:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


# --------------------------------------------------------------------------- transport


class _BearerAuth(requests.auth.AuthBase):
    """Puts the key in the Authorization header, and nowhere else (not even its repr).

    Passing auth also stops requests from consulting ~/.netrc on every call.
    """

    def __init__(self, key: str) -> None:
        self._value = f"Bearer {key}"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._value
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(***)"


def _excerpt(body: bytes, key: Optional[str]) -> str:
    text = body[: _HTTP_EXCERPT * 4].decode("utf-8", errors="replace")
    return redact(" ".join(text.split())[:_HTTP_EXCERPT], key)


def _never_sent(exc: requests.exceptions.ConnectionError) -> bool:
    """True when the connection failed before any byte of the request went out."""
    reason: Any = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, (NewConnectionError, ConnectionRefusedError))


def _failure_reason(exc: BaseException) -> str:
    chain: list[BaseException] = []
    seen: Optional[BaseException] = exc
    while seen is not None and len(chain) < 6:
        chain.append(seen)
        nxt = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        seen = nxt or getattr(seen, "reason", None) or seen.__cause__ or seen.__context__
        if seen in chain:
            break
    text = " ".join(str(e) for e in chain).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "nodename nor servname" in text or (
        "resolve" in text
    ):
        return "host name not found"
    if isinstance(exc, requests.exceptions.Timeout) or "timed out" in text:
        return "timed out"
    if "reset" in text:
        return "connection reset"
    if "aborted" in text or "remote end closed" in text:
        return "connection closed by the server"
    return type(exc).__name__


class HttpTransport:
    """The live wire protocol over one requests.Session (its connection pool is reused)."""

    def __init__(
        self, base: str, key: str, timeout: float, session: Optional[requests.Session] = None
    ) -> None:
        self.base = base
        self._key = key
        self._auth = _BearerAuth(key)
        self._timeout = timeout
        self._session = session if session is not None else requests.Session()
        version = getattr(sys.modules.get("pf_metaflow"), "__version__", "0")
        self._headers = {
            "Accept": "application/json",
            "User-Agent": f"pf-metaflow/{version} {requests.utils.default_user_agent()}",
        }
        self._json_headers = {**self._headers, "Content-Type": "application/json"}

    def __repr__(self) -> str:
        return f"HttpTransport({redact(self.base, self._key)!r})"

    def request(
        self,
        what: str,
        method: str,
        path: str,
        *,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> tuple[dict, Mapping[str, str]]:
        """One HTTP exchange -> (JSON object, response headers), or a PurpleFleaError.

        ``what`` names the operation in messages ("create escrow", "release esc_…").
        """
        try:
            response = self._session.request(
                method,
                self.base + path,
                data=body,
                headers=headers or self._headers,
                auth=self._auth,
                timeout=self._timeout,
                allow_redirects=False,  # a redirect is not part of the protocol
            )
        except requests.exceptions.SSLError as exc:
            raise NetworkError(
                f"{what}: TLS with the escrow service at {self.base} failed "
                f"({_failure_reason(exc)}); nothing was sent",
                details={"retryable": False},
            ) from None
        except (requests.exceptions.ConnectTimeout, requests.exceptions.ProxyError) as exc:
            raise self._not_sent(what, exc) from None
        except requests.exceptions.ConnectionError as exc:
            if _never_sent(exc):
                raise self._not_sent(what, exc) from None
            raise self._ambiguous(what, exc) from None
        except requests.exceptions.RequestException as exc:  # ReadTimeout, broken body, ...
            raise self._ambiguous(what, exc) from None
        return self._answer(what, response)

    def _not_sent(self, what: str, exc: BaseException) -> NetworkError:
        return NetworkError(
            f"{what}: cannot reach the escrow service at {self.base} ({_failure_reason(exc)}); "
            "nothing was sent. Check PF_ESCROW_URL and the network",
        )

    def _ambiguous(
        self, what: str, exc: Optional[BaseException], status: Optional[int] = None
    ) -> AmbiguousOutcome:
        why = f"HTTP {status} from a gateway" if exc is None else _failure_reason(exc)
        return AmbiguousOutcome(
            f"{what}: the request was sent to {self.base} but no answer came back ({why}); "
            "it may or may not have taken effect",
            status=status,
            details={"reason": why},
        )

    def _answer(self, what: str, response: requests.Response) -> tuple[dict, Mapping[str, str]]:
        status = response.status_code
        content = response.content
        if status in (502, 504):
            # A gateway gave up waiting: the service may have acted on the request.
            raise self._ambiguous(what, None, status)
        try:
            data = json.loads(content, parse_float=Decimal) if content else None
        except (ValueError, UnicodeDecodeError):
            data = None
        if 200 <= status < 300:
            if not isinstance(data, dict):
                raise self._unreadable(what, status, content)
            return data, response.headers
        retry_after = _retry_after(response.headers.get("Retry-After"))
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            code = data["error"]
            text = data.get("message") if isinstance(data.get("message"), str) else None
            details = {k: v for k, v in data.items() if k not in ("error", "message", "_info")}
            if "balance" in details:
                try:
                    details["balance"] = parse_money(details, "balance")
                except ProtocolError:
                    pass
        elif status in (429, 503):
            # A proxy's own page for "slow down" / "unavailable": the status says it all.
            code, text, details = None, None, {}
        else:
            raise self._unreadable(what, status, content)
        if retry_after is not None or status in (429, 503):
            details["retry_after"] = retry_after
        shown = redact(text, self._key) if text else (code or f"HTTP {status}")
        message = f"{what}: {shown} (HTTP {status}{' ' + code if code else ''})"
        raise error_for(status, code, message, details)

    def _unreadable(self, what: str, status: int, content: bytes) -> ProtocolError:
        excerpt = _excerpt(content, self._key)
        if not content.strip():
            kind = "an empty body"
        elif excerpt.lstrip().lower().startswith(("<!doctype", "<html", "<")):
            kind = "an HTML page"
        else:
            kind = "something that is not a JSON object"
        return ProtocolError(
            f"{what}: {self.base} answered HTTP {status} with {kind} instead of escrow JSON"
            + (f": {excerpt!r}" if excerpt else ""),
            status=status,
            details={"excerpt": excerpt},
        )

    # -- the protocol -------------------------------------------------------------

    def create(
        self,
        amount: Decimal,
        description: str,
        counterparty: str,
        timeout_hours: Optional[int],
        referral_code: Optional[str],
        idempotency_key: Optional[str],
    ) -> tuple[dict, bool]:
        fields: dict[str, Any] = {"description": description, "counterparty_agent_id": counterparty}
        if timeout_hours is not None:
            fields["timeout_hours"] = timeout_hours
        if referral_code is not None:
            fields["referral_code"] = referral_code
        # amount_usd is a JSON number written from the exact Decimal, never through a float.
        body = '{"amount_usd": ' + f"{amount.normalize():f}, " + json.dumps(fields)[1:]
        headers = self._json_headers
        if idempotency_key is not None:
            headers = {**headers, "Idempotency-Key": idempotency_key}
        data, response_headers = self.request(
            "create escrow", "POST", "/escrow/create", body=body.encode(), headers=headers
        )
        replayed = response_headers.get("Idempotent-Replayed", "").lower() == "true"
        return data, replayed

    def release(self, escrow_id: str) -> dict:
        return self.request(f"release {escrow_id}", "POST", f"/escrow/release/{escrow_id}")[0]

    def refund(self, escrow_id: str) -> dict:
        return self.request(f"refund {escrow_id}", "POST", f"/escrow/refund/{escrow_id}")[0]

    def get(self, escrow_id: str) -> dict:
        return self.request(f"get {escrow_id}", "GET", f"/escrow/{escrow_id}")[0]

    def capabilities(self) -> Capabilities:
        try:
            document = self.request("read capabilities", "GET", "/openapi.json")[0]
        except NotFound:
            document = None  # no OpenAPI document: certainly not our sandbox
        return parse_capabilities(document)

    def agent_id(self) -> Optional[str]:
        """The live protocol has no way to ask whose key this is (a sandbox's balance does)."""
        return None

    def balance(self) -> dict:
        return self.request("read balance", "GET", "/wallet/balance")[0]

