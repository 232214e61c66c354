"""Fuzzing the gateway with schemathesis, from the gateway's own OpenAPI document, with a valid key.

Promised: whatever a client sends that the document allows (and much that it does not), the
gateway never answers 500 and never answers with a body that breaks its own documented schema.
Bounded and deterministic: a fixed number of examples per operation, derandomized (the same
inputs on every run), so a failure reproduces.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import response_schema_conformance

EXAMPLES = 25  # per operation


@pytest.fixture(scope="module")
def gateway_schema(gateway):
    doc = httpx.get(gateway.base_url + "/openapi.json", timeout=10).json()
    return schemathesis.openapi.from_dict(doc)


schema = schemathesis.pytest.from_fixture("gateway_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_500_and_no_schema_breaking_response(case, gateway):
    response = case.call(base_url=gateway.base_url, headers={"Authorization": f"Bearer {gateway.api_key}"},
                         timeout=120)
    assert response.status_code != 500, f"{case.method} {case.path}: 500 {response.text[:300]}"
    case.validate_response(response, checks=[response_schema_conformance])
