"""Agent ids, API keys and escrow descriptions: what well-formed ones look like."""

from __future__ import annotations

import re

from .errors import ConfigurationError, InvalidAgentId, InvalidDescription, InvalidRequest

AGENT_ID_RE = re.compile(r"^ag_[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ESCROW_ID_RE = re.compile(r"^esc_[A-Za-z0-9_-]{1,64}$")
API_KEY_RE = re.compile(r"^pf_[A-Za-z0-9_-]{8,200}$")
MAX_DESCRIPTION = 500

SANDBOX_PAYER = "ag_sandbox_payer"
SANDBOX_WORKER = "ag_sandbox_worker"


def check_agent_id(value: object, *, name: str = "agent_wallet") -> str:
    """Return ``value`` if it is a Purple Flea agent id (``ag_…``), else raise InvalidAgentId."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidAgentId(f"{name} is empty: give a Purple Flea agent id (ag_…); a compiled deployment "
                             "carries no default payee, so pass it when you trigger it (--agent_wallet ag_…)")
    if value.startswith("0x"):
        raise InvalidAgentId(
            f"{name} {value!r} looks like an on-chain wallet address; Purple Flea escrow pays "
            "agent ids (ag_…), which you get when the agent registers"
        )
    if not AGENT_ID_RE.match(value):
        raise InvalidAgentId(
            f"{name} {value!r} is not a Purple Flea agent id: expected 'ag_' followed by "
            "letters, digits, '_' or '-' (at most 64)"
        )
    return value


def check_escrow_id(value: object) -> str:
    if not isinstance(value, str) or not ESCROW_ID_RE.match(value):
        raise InvalidRequest(f"{value!r} is not an escrow id (expected esc_…)", code="invalid_escrow_id")
    return value


def check_description(value: object) -> str:
    if not isinstance(value, str) or len(value.strip()) < 3:
        raise InvalidDescription(f"description must be text of at least 3 characters, got {value!r}")
    if len(value) > MAX_DESCRIPTION:
        raise InvalidDescription(f"description is longer than {MAX_DESCRIPTION} characters")
    return value


def check_api_key(value: object, *, source: str = "PF_API_KEY") -> str:
    """Validate the shape of an API key. The message never repeats the key."""
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{source} is empty: set it to your Purple Flea API key (pf_live_…)")
    if value != value.strip() or not API_KEY_RE.match(value):
        raise ConfigurationError(
            f"{source} is malformed: a Purple Flea key is 'pf_' followed by at least 8 letters, "
            "digits, '_' or '-' (the value is not shown)"
        )
    return value


def redact(text: str, *secrets: str | None) -> str:
    """Replace every occurrence of each secret in ``text`` with ``pf_***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "pf_***")
    return text
