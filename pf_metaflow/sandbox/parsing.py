"""Reading requests and writing answers for the sandbox server: bounded, checked, exact.

Everything a client sends is checked before any work is done, at a cost that does not
depend on what the input claims (a number's exponent, a body's nesting):

- a body is at most :data:`MAX_BODY` bytes, whether it comes with ``Content-Length`` or
  chunked (over it: 413 and nothing done);
- JSON is nested at most :data:`MAX_DEPTH` deep (deeper bodies are refused, never a
  RecursionError); a number literal over :data:`MAX_NUMBER_CHARS` characters or not below
  ``1e{MAX_EXPONENT}``, and ``NaN`` / ``Infinity``, are never converted (an :class:`Unusable`
  that the field receiving it refuses); strings are valid Unicode (no lone surrogates) without NUL;
- the create, claim, register and dispute fields are checked here, with short messages that
  never repeat a long input or show a Python repr, before the engine sees them.

Answers are written by :func:`dumps`: a :class:`~decimal.Decimal` becomes a JSON number
written from its own digits (``9999999999.999999``, ``0.000002``), never through a float.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any, Mapping, Optional

from ..errors import InvalidAmount, InvalidRequest, PurpleFleaError
from ..ids import AGENT_ID_RE, MAX_DESCRIPTION
from ..money import MIN_ESCROW_USDC, USDC_PLACES

MAX_BODY = 64 * 1024  # escrow requests are a few hundred bytes
MAX_DEPTH = 8  # our bodies are flat objects
MAX_NUMBER_CHARS = 40
MAX_EXPONENT = 18  # |number| < 1e18: more than any amount, hour count or balance
MAX_TEXT = 1000  # characters in any one string of a body
MAX_SHOWN = 40  # an input is repeated in a message only when it is this short
MAX_NAME = 100
MAX_REFERRAL_CODE = 64

# A plain decimal, ASCII digits only: no sign, exponent, underscore, space or other script.
_PLAIN_DECIMAL = re.compile(r"[0-9]{1,18}(?:\.[0-9]{1,18})?", re.ASCII)


class PayloadTooLarge(PurpleFleaError):
    status = 413
    default_code = "payload_too_large"


def too_large() -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than {MAX_BODY // 1024} KiB")


class Unusable:
    """A JSON number the parser read but did not convert: ``NaN`` / ``Infinity`` (not JSON,
    but sent), or a literal over the limits. The field that receives it says what is wrong
    (an amount: "must be a finite amount" / "is too large"); an unknown field is ignored."""

    def __init__(self, finite: bool) -> None:
        self.finite = finite

    def __repr__(self) -> str:
        return "a number that is too large" if self.finite else "a number that is not finite"


def _unusable(value: Any, name: str, code: str, error: type = InvalidRequest) -> None:
    if isinstance(value, Unusable):
        if value.finite:
            raise error(f"{name} is too large (numbers are limited to {MAX_NUMBER_CHARS} "
                        f"characters and below 1e{MAX_EXPONENT})", code=code)
        raise error(f"{name} must be a finite amount, got a value that is not", code=code)


def show(value: Any) -> str:
    """``value`` for a message: short text quoted as JSON, otherwise only what it is."""
    if isinstance(value, Unusable):
        return repr(value)
    if isinstance(value, str):
        if len(value) <= MAX_SHOWN and _clean(value):
            return json.dumps(value)
        return f"a text of {len(value)} characters"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, Decimal)):
        text = _number_text(Decimal(value))
        return text if len(text) <= MAX_SHOWN else "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a value of another kind"


def _clean(text: str) -> bool:
    return "\x00" not in text and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


# -- request bodies ---------------------------------------------------------------------------


def read_body(environ: Mapping[str, Any]) -> bytes:
    """The request body, at most :data:`MAX_BODY` bytes, or :class:`PayloadTooLarge`.

    With ``Content-Length`` the declared size decides before anything is read; a chunked
    body (no length, ``wsgi.input_terminated``) is read up to one byte past the limit.
    """
    stream = environ.get("wsgi.input")
    declared = environ.get("CONTENT_LENGTH") or ""
    if declared.strip():
        try:
            length = int(declared.strip()) if declared.strip().isdigit() else -1
        except ValueError:
            length = -1
        if length < 0 or len(declared) > 20:
            raise InvalidRequest("Content-Length is not a byte count", code="invalid_request")
        if length > MAX_BODY:
            raise too_large()
        limit = length
    elif environ.get("wsgi.input_terminated"):
        limit = MAX_BODY + 1
    else:
        return b""
    if stream is None or limit == 0:
        return b""
    chunks, size = [], 0
    while size < limit:
        chunk = stream.read(min(limit - size, 16 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_BODY:
        raise too_large()
    return b"".join(chunks)


def _parse_number(text: str) -> Any:
    if len(text) > MAX_NUMBER_CHARS:
        return Unusable(finite=True)
    number = Decimal(text)  # the literal is short, so this is cheap whatever its exponent
    if number and number.adjusted() >= MAX_EXPONENT:
        return Unusable(finite=True)
    return number


def _parse_int(text: str) -> Any:
    number = _parse_number(text)
    return number if isinstance(number, Unusable) else int(number)  # at most 18 digits


def _constant(name: str) -> Unusable:
    return Unusable(finite=False)


def parse_json_object(raw: bytes) -> dict:
    """A JSON object within every limit above, else :class:`InvalidRequest` (400)."""
    if not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("request body is not UTF-8 JSON", code="invalid_json") from None
    try:
        body = json.loads(text, parse_float=_parse_number, parse_int=_parse_int,
                          parse_constant=_constant)
    except RecursionError:  # the C parser's own depth guard: far deeper than ours
        raise _too_deep() from None
    except ValueError:
        raise InvalidRequest("request body is not JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    _check_values(body, 1)
    return body


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"request body is nested more than {MAX_DEPTH} deep",
                          code="invalid_json")


def _check_values(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _too_deep()
    if isinstance(value, str):
        if not _clean(value):
            raise InvalidRequest("text in the body holds a NUL or an unpaired surrogate "
                                 "(not valid Unicode text)", code="invalid_string")
        if len(value) > MAX_TEXT:
            raise InvalidRequest(f"text in the body is longer than {MAX_TEXT} characters",
                                 code="invalid_string")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_values(key, depth)
            _check_values(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_values(item, depth + 1)


def check_header(value: Optional[str], name: str, limit: int = 255) -> Optional[str]:
    """A header value that is printable ASCII of at most ``limit`` characters (or None)."""
    if value is None:
        return None
    if not value.strip() or len(value) > limit or not value.isascii() or not value.isprintable():
        raise InvalidRequest(f"{name} must be 1..{limit} printable ASCII characters",
                             code=f"invalid_{name.lower().replace('-', '_')}")
    return value


# -- fields -------------------------------------------------------------------------------------


def amount(value: Any, name: str, *, minimum: Optional[Decimal] = MIN_ESCROW_USDC) -> Decimal:
    """A USDC amount: a JSON number or a plain ASCII decimal string, >= 0, at most 6 places."""
    if value is None:
        raise InvalidAmount(f"{name} is required")
    _unusable(value, name, "invalid_amount", InvalidAmount)
    if isinstance(value, str):
        text = value.strip()
        if not _PLAIN_DECIMAL.fullmatch(text):
            raise InvalidAmount(f"{name} is not a number: expected a plain ASCII decimal such "
                                f"as 12.5, got {show(value)}")
        number = Decimal(text)
    elif isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        number = Decimal(value)
    else:
        raise InvalidAmount(f"{name} must be a number of USDC, got {show(value)}")
    if number < 0:
        raise InvalidAmount(f"{name} must not be negative, got {show(value)}")
    if number != number.quantize(Decimal(1).scaleb(-USDC_PLACES), rounding="ROUND_DOWN"):
        raise InvalidAmount(f"{name} has more than {USDC_PLACES} decimal places (USDC's "
                            f"precision), got {show(value)}")
    if minimum is not None and number < minimum:
        raise InvalidAmount(f"{name} is below the Purple Flea escrow minimum of {minimum} USDC, "
                            f"got {show(value)}")
    return number


def text(value: Any, name: str, code: str, *, required: bool = True,
         limit: int = MAX_TEXT) -> Optional[str]:
    """Text of at most ``limit`` characters (checked for NUL and surrogates by the parser)."""
    if value is None and not required:
        return None
    _unusable(value, name, code)
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be text, got {show(value)}", code=code)
    if len(value) > limit:
        raise InvalidRequest(f"{name} is longer than {limit} characters", code=code)
    return value


def description(value: Any) -> str:
    code = "invalid_description"
    if not isinstance(value, str) or len(value.strip()) < 3:
        shown = show(value) if value is not None else "nothing"
        raise InvalidRequest(f"description must be text of at least 3 characters, got {shown}",
                             code=code)
    if len(value) > MAX_DESCRIPTION:
        raise InvalidRequest(f"description is longer than {MAX_DESCRIPTION} characters",
                             code=code)
    return value


def agent_id(value: Any, name: str) -> str:
    code = "invalid_counterparty"
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{name} is empty: give a Purple Flea agent id such as "
                             "ag_sandbox_worker", code=code)
    value = value.strip()
    if value.startswith("0x"):
        raise InvalidRequest(f"{name} {show(value)} looks like an on-chain wallet address; "
                             "Purple Flea escrow pays agent ids (ag_...)", code=code)
    if not AGENT_ID_RE.match(value):
        raise InvalidRequest(f"{name} {show(value)} is not a Purple Flea agent id: 'ag_' and up "
                             "to 64 letters, digits, '_' or '-'", code=code)
    return value


def timeout_hours(value: Any) -> Optional[Any]:
    """A JSON number (clamped to 1..720 by the engine, as live) or a plain decimal string."""
    if value is None:
        return None
    _unusable(value, "timeout_hours", "invalid_timeout")
    if isinstance(value, str):
        if not _PLAIN_DECIMAL.fullmatch(value.strip()):
            raise InvalidRequest(f"timeout_hours must be a whole number of hours, got "
                                 f"{show(value)}", code="invalid_timeout")
        return Decimal(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise InvalidRequest(f"timeout_hours must be a whole number of hours, got {show(value)}",
                             code="invalid_timeout")
    return value


# -- answers ------------------------------------------------------------------------------------


def _number_text(number: Decimal) -> str:
    if not number.is_finite():
        raise ValueError("an amount must be finite")
    if number.is_zero():
        return "0"
    return format(number.normalize(), "f")


def dumps(value: Any) -> str:
    """JSON like :func:`json.dumps`, a Decimal as a number written from its digits."""
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts)


def _encode(value: Any, out: list) -> None:
    if isinstance(value, Decimal):
        out.append(_number_text(value))
    elif isinstance(value, dict):
        out.append("{")
        for n, (key, item) in enumerate(value.items()):
            if n:
                out.append(", ")
            out.append(json.dumps(str(key)))
            out.append(": ")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for n, item in enumerate(value):
            if n:
                out.append(", ")
            _encode(item, out)
        out.append("]")
    else:  # str, int, bool, None (floats never hold money here; they would be written as is)
        out.append(json.dumps(value, allow_nan=False))


__all__ = [
    "MAX_BODY", "MAX_DEPTH", "PayloadTooLarge", "amount", "agent_id",
    "check_header", "description", "dumps", "parse_json_object", "read_body", "show", "text",
    "timeout_hours", "too_large",
]
