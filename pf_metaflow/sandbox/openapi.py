"""The OpenAPI 3.1 document the sandbox serves at ``/openapi.json``.

It describes what this server does, request bodies, path parameters, headers and every
answer, so schemathesis and client generators can use it, and it advertises the sandbox's
extensions under ``x-pf-sandbox`` (``{"extensions": [...]}``): that marker is how a client
tells a sandbox from the live service. A server without refunds or idempotency keys (``serve
--live``, ``--no-refund``, ``--no-idempotency``) neither lists nor mentions them.
"""

from __future__ import annotations

from typing import Any

from .parsing import MAX_BODY, MAX_DESCRIPTION, MAX_NAME, MAX_REFERRAL_CODE, MAX_TEXT

JSON = "application/json"
_AMOUNT_PATTERN = r"^\s*[0-9]{1,18}(\.[0-9]{1,18})?\s*$"
ESCROW_ID_PATTERN = r"^esc_[A-Za-z0-9_-]{1,64}$"
AGENT_ID_PATTERN = r"^ag_[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

_ERROR_TEXT = {
    400: "The request is invalid (error: invalid_amount, invalid_description, "
         "invalid_counterparty, self_escrow, invalid_json, invalid_number, invalid_string, ...).",
    401: "No API key, or one this sandbox does not know (error: unauthorized).",
    402: "The balance is smaller than the amount (error: insufficient_balance, with balance).",
    403: "Only the escrow's creator (release) or counterparty (complete) may do this "
         "(error: forbidden).",
    404: "No such escrow, agent or counterparty (error: not_found, counterparty_not_found).",
    408: "The request body did not arrive in time (error: request_timeout).",
    409: "The escrow's status does not allow this (error: invalid_status).",
    413: f"The request body is larger than {MAX_BODY // 1024} KiB (error: payload_too_large).",
    429: "Too many requests in this window (error: rate_limited).",
    500: "The server failed (error: internal_error).",
    503: "The database stayed busy; nothing changed, try again (error: service_unavailable).",
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    return {**schema, "type": [schema["type"], "null"]}


def _schemas(*, refunds: bool, idempotency: bool, live_words: bool) -> dict:
    number = {"type": "number", "description": "USDC, at most 6 decimal places, written exactly."}
    time = {"type": "string", "description": "UTC time, e.g. 2026-01-31T12:00:00.000Z"}
    status: dict[str, Any] = {"type": "string"}
    if live_words:
        status["enum"] = ["funded", "completed", "released", "disputed", "refunded"]
    escrow_fields: dict[str, Any] = {
        "escrow_id": {"type": "string", "pattern": ESCROW_ID_PATTERN},
        "status": status,
        "amount_usd": number,
        "commission_usd": number,
        "net_to_counterparty": number,
        "description": {"type": "string"},
        "creator_id": {"type": "string"},
        "counterparty_id": {"type": "string"},
        "timeout_hours": {"type": "integer", "minimum": 1, "maximum": 720},
        "created_at": time,
        "auto_release_at": time,
        "completed_at": _nullable(time),
        "released_at": _nullable(time),
        "disputed_at": _nullable(time),
    }
    if live_words:
        escrow_fields["refunded_at"] = _nullable(time)
    stats = {
        "total_created": {"type": "integer"},
        "total_released": {"type": "integer"},
        "total_disputed": {"type": "integer"},
        "total_volume_usd": number,
        "total_commission_usd": number,
        "commission_rate": {"type": "string"},
        "referral_commission_rate": {"type": "string"},
    }
    if live_words:
        stats["total_refunded"] = {"type": "integer"}
    amount_in = {
        "anyOf": [
            {"type": "number", "minimum": 0},
            {"type": "string", "pattern": _AMOUNT_PATTERN},
        ],
        "description": "USDC as a JSON number or a plain ASCII decimal string; at most 6 "
                       "decimal places.",
    }
    decimal_string = {"type": "string", "pattern": r"^[0-9]+\.[0-9]{6}$"}
    schemas: dict[str, Any] = {
        "Info": {
            "type": "object",
            "description": "Carried by every JSON answer (clients ignore unknown fields).",
            "properties": {
                "service": {"type": "string"},
                "version": {"type": "string"},
                "sandbox": {"type": "boolean"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
        "Error": {
            "type": "object",
            "required": ["error", "message"],
            "properties": {
                "error": {"type": "string"},
                "message": {"type": "string", "maxLength": 1000},
                "balance": {**number, "description": "With insufficient_balance."},
                "status": {**status, "description": "With invalid_status."},
                "_info": _ref("Info"),
            },
        },
        "Escrow": {"type": "object", "required": list(escrow_fields), "properties": {
            **escrow_fields, "_info": _ref("Info")}},
        "CreateEscrow": {
            "type": "object",
            "required": ["amount_usd", "description", "counterparty_agent_id"],
            "properties": {
                "amount_usd": {**amount_in, "description": amount_in["description"]
                               + " At least 0.10."},
                "description": {"type": "string", "minLength": 3, "maxLength": MAX_DESCRIPTION},
                "counterparty_agent_id": {"type": "string", "pattern": AGENT_ID_PATTERN},
                "timeout_hours": {
                    "anyOf": [{"type": "number", "exclusiveMaximum": 1e18,
                               "exclusiveMinimum": -1e18},
                              {"type": "string", "pattern": _AMOUNT_PATTERN}],
                    "description": "Hours until the escrow times out, floored and clamped to "
                                   "1..720 (default 24).",
                },
                "referral_code": {"type": "string", "maxLength": MAX_REFERRAL_CODE},
            },
        },
        "Released": {
            "type": "object",
            "required": ["escrow_id", "status", "amount_released", "commission",
                         "referral_commission", "counterparty_id"],
            "properties": {
                "escrow_id": {"type": "string"},
                "status": {"const": "released"},
                "amount_released": number,
                "commission": number,
                "referral_commission": number,
                "counterparty_id": {"type": "string"},
                "message": {"type": "string"},
                "_info": _ref("Info"),
            },
        },
        "Completed": {
            "type": "object",
            "required": ["escrow_id", "status"],
            "properties": {"escrow_id": {"type": "string"}, "status": {"const": "completed"},
                           "auto_release_at": time, "message": {"type": "string"},
                           "_info": _ref("Info")},
        },
        "Dispute": {
            "type": "object",
            "properties": {"reason": {"type": "string", "maxLength": MAX_TEXT}},
        },
        "Disputed": {
            "type": "object",
            "required": ["escrow_id", "status", "reason"],
            "properties": {"escrow_id": {"type": "string"}, "status": {"const": "disputed"},
                           "reason": {"type": "string"}, "message": {"type": "string"},
                           "_info": _ref("Info")},
        },
        "Stats": {"type": "object", "required": list(stats),
                  "properties": {**stats, "_info": _ref("Info")}},
        "Health": {"type": "object", "required": ["status"],
                   "properties": {"status": {"const": "ok"}, "service": {"type": "string"},
                                  "_info": _ref("Info")}},
        "Index": {"type": "object", "required": ["service", "extensions"],
                  "properties": {"service": {"type": "string"}, "version": {"type": "string"},
                                 "extensions": {"type": "array", "items": {"type": "string"}},
                                 "openapi": {"type": "string"}, "_info": _ref("Info")}},
        "Register": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME}},
        },
        "Agent": {
            "type": "object", "required": ["agent_id", "api_key", "referral_code"],
            "properties": {"agent_id": {"type": "string"}, "api_key": {"type": "string"},
                           "referral_code": {"type": "string"}, "_info": _ref("Info")},
        },
        "Claim": {
            "type": "object",
            "properties": {"amount": {**amount_in, "description": "USDC to mint (default 100, "
                                      "more than 0 and at most 1000000)."}},
        },
        "Claimed": {
            "type": "object", "required": ["agent_id", "claimed", "balance"],
            "properties": {"agent_id": {"type": "string"}, "claimed": number,
                           "balance": number, "_info": _ref("Info")},
        },
        "Balance": {
            "type": "object", "required": ["agent_id", "usdc", "locked"],
            "properties": {"agent_id": {"type": "string"}, "usdc": number, "locked": number,
                           "_info": _ref("Info")},
        },
        "Balances": {
            "type": "object", "required": ["agents", "house_fees", "minted"],
            "properties": {
                "agents": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["usdc", "locked"],
                    "properties": {"usdc": decimal_string, "locked": decimal_string}}},
                "house_fees": decimal_string,
                "minted": decimal_string,
                "_info": _ref("Info"),
            },
        },
    }
    if refunds:
        schemas["Refunded"] = {
            "type": "object",
            "required": ["escrow_id", "status", "amount_refunded", "creator_id"],
            "properties": {"escrow_id": {"type": "string"}, "status": {"const": "refunded"},
                           "amount_refunded": number, "creator_id": {"type": "string"},
                           "message": {"type": "string"}, "_info": _ref("Info")},
        }
    return schemas


def _answer(description: str, schema: str, headers: dict | None = None) -> dict:
    answer: dict[str, Any] = {"description": description,
                              "content": {JSON: {"schema": _ref(schema)}}}
    if headers:
        answer["headers"] = headers
    return answer


def _errors(*codes: int, retry_after_429: bool = True) -> dict:
    out = {}
    for code in codes:
        headers = None
        if code == 503 or (code == 429 and retry_after_429):
            headers = {"Retry-After": {"description": "Seconds to wait before trying again.",
                                       "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
        out[str(code)] = _answer(_ERROR_TEXT[code], "Error", headers)
    return out


def _body(schema: str, required: bool = True) -> dict:
    return {"required": required, "content": {JSON: {"schema": _ref(schema)}}}


def document(*, version: str, extensions: list[str], refunds: bool, idempotency: bool,
             sandbox_limits: bool = True) -> dict:
    """The OpenAPI 3.1 document of a server with these settings.

    ``sandbox_limits``: 429 answers carry ``Retry-After`` (False for ``--live``, whose 429s,
    like the live service's, do not). In live mode (no refunds, no idempotency), the
    document does not mention either.
    """
    live_words = refunds or idempotency
    escrow_id = {"name": "escrow_id", "in": "path", "required": True,
                 "schema": {"type": "string", "pattern": ESCROW_ID_PATTERN}}
    bearer = [{"bearer": []}]
    always = (500, 503)
    body_errors = (400, 408, 413)
    ra = sandbox_limits

    def settle(summary: str, op_id: str, ok: dict, *, body: dict | None = None) -> dict:
        op: dict[str, Any] = {
            "operationId": op_id, "summary": summary, "security": bearer,
            "parameters": [escrow_id],
            "responses": {"200": ok, **_errors(401, 403, 404, 409, 429, *always,
                                               retry_after_429=ra)},
        }
        if body is not None:
            op["requestBody"] = body
            op["responses"].update(_errors(*body_errors))
        return {"post": op}

    create_params = []
    created_headers = None
    create_errors = [400, 401, 402, 404, 408, 413, 429, *always]
    if idempotency:
        create_params.append({
            "name": "Idempotency-Key", "in": "header", "required": False,
            "description": "Same key and body: the first answer again, with "
                           "Idempotent-Replayed: true; same key, another body: 409.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                       "pattern": r"^[!-~]([ -~]*[!-~])?$"},
        })
        created_headers = {"Idempotent-Replayed": {
            "description": "true when this is the stored first answer to the same request.",
            "schema": {"type": "string", "enum": ["true"]}}}
        create_errors.append(409)
    paths: dict[str, Any] = {
        "/": {"get": {"operationId": "index", "summary": "What this server is",
                      "responses": {"200": _answer("The service.", "Index")}}},
        "/health": {"get": {"operationId": "health", "summary": "Liveness",
                            "responses": {"200": _answer("Up.", "Health")}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                  "responses": {"200": {
                                      "description": "The OpenAPI document.",
                                      "content": {JSON: {"schema": {"type": "object"}}}}}}},
        "/escrow/stats": {"get": {"operationId": "stats", "summary": "Counts and volume",
                                  "responses": {"200": _answer("Totals.", "Stats"),
                                                **_errors(*always)}}},
        "/escrow/create": {"post": {
            "operationId": "create", "summary": "Lock funds in a new escrow",
            "security": bearer, "parameters": create_params,
            "requestBody": _body("CreateEscrow"),
            "responses": {"201": _answer("The escrow, funded.", "Escrow", created_headers),
                          **_errors(*create_errors, retry_after_429=ra)},
        }},
        "/escrow/release/{escrow_id}": settle(
            "Pay the counterparty (amount - 1%); creator only", "release",
            _answer("Released.", "Released")),
        "/escrow/complete/{escrow_id}": settle(
            "Mark the work done; counterparty only", "complete",
            _answer("Completed.", "Completed")),
        "/escrow/dispute/{escrow_id}": settle(
            "Flag for review; funds stay locked", "dispute",
            _answer("Disputed.", "Disputed"), body=_body("Dispute", required=False)),
        "/escrow/{escrow_id}": {"get": {
            "operationId": "get", "summary": "One escrow", "parameters": [escrow_id],
            "responses": {"200": _answer("The escrow.", "Escrow"), **_errors(404, *always)},
        }},
        "/faucet/register": {"post": {
            "operationId": "register", "summary": "Register a sandbox agent and get its key",
            "requestBody": _body("Register"),
            "responses": {"201": _answer("The new agent.", "Agent"),
                          **_errors(*body_errors, *always)},
        }},
        "/faucet/claim": {"post": {
            "operationId": "claim", "summary": "Mint free test USDC", "security": bearer,
            "requestBody": _body("Claim", required=False),
            "responses": {"200": _answer("Claimed.", "Claimed"),
                          **_errors(*body_errors, 401, 404, *always)},
        }},
        "/wallet/balance": {"get": {
            "operationId": "balance", "summary": "The caller's balance", "security": bearer,
            "responses": {"200": _answer("Balance.", "Balance"),
                          **_errors(401, 404, *always)},
        }},
        "/sandbox/balances": {"get": {
            "operationId": "balances", "summary": "Every agent's balance (decimal strings)",
            "responses": {"200": _answer("Balances.", "Balances"), **_errors(*always)},
        }},
    }
    if refunds:
        paths["/escrow/refund/{escrow_id}"] = settle(
            "Give the creator the full amount back, no commission; creator only", "refund",
            _answer("Refunded.", "Refunded"))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Purple Flea agent escrow (pf-metaflow sandbox)",
            "version": version,
            "description": "The live Purple Flea escrow wire protocol on a local sandbox, test "
                           "money only, plus the extensions named under x-pf-sandbox.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": _schemas(refunds=refunds, idempotency=idempotency,
                                live_words=live_words),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "A sandbox key (pf_sandbox_...)."}},
        },
        "x-pf-sandbox": {"extensions": list(extensions)},
    }
