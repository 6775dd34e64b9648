"""The live Purple Flea escrow MCP tool set, as data (no MCP SDK needed to read it).

Names, argument names, result and error shapes are the live server's (docs/design.md,
"MCP"): streamable HTTP at ``/mcp``, stateless; a result is one text content holding
the HTTP API's JSON; an error is ``isError: true`` with JSON ``{error, message}`` using
the HTTP API's codes. The key travels as the ``casino_api_key`` argument, so an LLM that
calls these tools directly sees it: :mod:`pf_metaflow.mcp.toolkit` hands agents the same
tools with that argument removed (:func:`model_tools`) and fills it in itself.
"""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from typing import Any, Mapping, Optional

KEY_ARG = "casino_api_key"
TOOL_NAMES = ("create_escrow", "get_escrow", "mark_complete", "release_escrow", "dispute_escrow",
              "escrow_stats")
MIN_DISPUTE_REASON = 10

_KEY = {"type": "string", "description": "Your Purple Flea API key (pf_live_...)."}
_ESCROW_ID = {"type": "string", "description": "The escrow id (esc_...)."}


def _schema(properties: dict, required: list) -> dict:
    return {"type": "object", "properties": properties, "required": required}


LIVE_TOOLS: tuple[dict, ...] = (
    {
        "name": "create_escrow",
        "description": "Lock funds in escrow for another agent's task. The counterparty is paid "
                       "(less the 1% commission) when you release it; it returns to you if it times out.",
        "inputSchema": _schema({
            KEY_ARG: _KEY,
            "amount_usd": {"type": "number", "minimum": 0.1, "description": "USDC to lock (at least 0.10)."},
            "counterparty_agent_id": {"type": "string", "description": "The agent to pay (ag_...)."},
            "description": {"type": "string", "minLength": 3, "description": "What the escrow pays for."},
            "timeout_hours": {"type": "integer", "minimum": 1, "maximum": 720,
                              "description": "Hours before unreleased funds return to you (default 24)."},
            "referral_code": {"type": "string", "description": "Referral code (optional)."},
        }, [KEY_ARG, "amount_usd", "counterparty_agent_id", "description"]),
    },
    {
        "name": "get_escrow",
        "description": "Read an escrow's status and amounts.",
        "inputSchema": _schema({"escrow_id": _ESCROW_ID}, ["escrow_id"]),
    },
    {
        "name": "mark_complete",
        "description": "As the counterparty, mark the escrowed task complete (the creator then releases).",
        "inputSchema": _schema({KEY_ARG: _KEY, "escrow_id": _ESCROW_ID}, [KEY_ARG, "escrow_id"]),
    },
    {
        "name": "release_escrow",
        "description": "As the creator, release the escrowed funds to the counterparty (less the 1% commission).",
        "inputSchema": _schema({KEY_ARG: _KEY, "escrow_id": _ESCROW_ID}, [KEY_ARG, "escrow_id"]),
    },
    {
        "name": "dispute_escrow",
        "description": "Flag an escrow for manual review; its funds stay locked until a person reviews it.",
        "inputSchema": _schema({
            KEY_ARG: _KEY, "escrow_id": _ESCROW_ID,
            "reason": {"type": "string", "minLength": MIN_DISPUTE_REASON,
                       "description": "Why (at least 10 characters)."},
        }, [KEY_ARG, "escrow_id", "reason"]),
    },
    {
        "name": "escrow_stats",
        "description": "Escrow service statistics: counts, volume and commission.",
        "inputSchema": _schema({}, []),
    },
)


def live_tools() -> list[dict]:
    """The six tools as the live server lists them (``name``, ``description``, ``inputSchema``)."""
    return copy.deepcopy(list(LIVE_TOOLS))


def without_key(tool: Mapping[str, Any]) -> dict:
    """``tool`` with the ``casino_api_key`` argument removed from its schema."""
    out = copy.deepcopy(dict(tool))
    schema = out["inputSchema"]
    schema["properties"].pop(KEY_ARG, None)
    schema["required"] = [name for name in schema.get("required", []) if name != KEY_ARG]
    return out


def _json_default(value: Any) -> Any:
    # Amounts are JSON numbers, as on the HTTP API: a 6-place Decimal survives a double exactly.
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"cannot send {type(value).__name__} as JSON")


def dumps(body: Mapping[str, Any]) -> str:
    return json.dumps(dict(body), default=_json_default, sort_keys=False)


def error_body(code: str, message: str, details: Optional[Mapping[str, Any]] = None) -> dict:
    """The live error shape: ``{error, message}`` plus what the HTTP API adds (e.g. ``balance``)."""
    body: dict[str, Any] = {"error": code, "message": message}
    for key, value in (details or {}).items():
        if key == "balance" and isinstance(value, str):
            value = Decimal(value)
        body.setdefault(key, value)
    return body
