"""``/openapi.json`` is a complete OpenAPI 3.1 document and the server keeps to it.

Schemathesis generates requests from the document (a bounded number per operation, fixed
seed) against a real ``pf-metaflow sandbox serve`` on 127.0.0.1 and checks every answer: no
5xx, a documented status, content type, headers and body schema.
"""

from __future__ import annotations

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pf_metaflow.sandbox.engine import PAYER_KEY, SandboxEngine
from pf_metaflow.sandbox.openapi import document

AS_PAYER = {"Authorization": f"Bearer {PAYER_KEY}"}
EXAMPLES = 25  # per operation; the whole run stays within a few seconds
TIMEOUT = 10
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


def test_every_answer_keeps_to_the_document(sandbox_server):
    api = schemathesis.openapi.from_url(f"{sandbox_server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 13
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def keeps_to_the_document(case):
            case.call_and_validate(base_url=sandbox_server.url, headers=AS_PAYER,
                                   checks=CHECKS, timeout=TIMEOUT)

        keeps_to_the_document()


def test_after_the_generated_requests_money_is_conserved(sandbox_server):
    SandboxEngine(sandbox_server.db).check_invariant()


def test_the_document_is_openapi_3_1_with_the_sandbox_marker(sandbox_server):
    doc = requests.get(f"{sandbox_server.url}/openapi.json", timeout=TIMEOUT).json()
    assert doc["openapi"] == "3.1.0"
    assert doc["x-pf-sandbox"] == {"extensions": ["refund", "idempotency", "faucet", "balance"]}
    assert set(doc) <= {"openapi", "info", "paths", "components", "x-pf-sandbox"}  # no _info
    create = doc["paths"]["/escrow/create"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]
    assert [p["name"] for p in create["parameters"]] == ["Idempotency-Key"]
    assert {"201", "400", "401", "402", "404", "409", "413", "429"} <= set(create["responses"])
    release = doc["paths"]["/escrow/release/{escrow_id}"]["post"]
    assert release["parameters"][0] == {"name": "escrow_id", "in": "path", "required": True,
                                        "schema": release["parameters"][0]["schema"]}


def test_every_path_parameter_is_declared():
    doc = document(version="0", extensions=[], refunds=True, idempotency=True)
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == {part[1:-1] for part in path.split("/") if part.startswith("{")}


def test_a_live_like_document_lists_neither_refund_nor_idempotency():
    doc = document(version="0", extensions=["faucet", "balance"], refunds=False,
                   idempotency=False, sandbox_limits=False)
    text = str(doc).lower()
    assert "refund" not in text and "idempotency" not in text and "idempotent" not in text
    assert "Retry-After" not in str(doc["paths"]["/escrow/create"]["post"]["responses"]["429"])
    assert doc["x-pf-sandbox"] == {"extensions": ["faucet", "balance"]}
