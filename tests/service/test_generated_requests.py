"""Requests generated from the OpenAPI document (schemathesis): valid (positive) and invalid
(negative) bodies,
parameters and ids for every operation, against the API served over HTTP on the real Redis and
S3-compatible servers. Every answer must be documented, match its schema, and none may be a
server error."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.conftest import KEY_A

pytestmark = pytest.mark.integration
EXAMPLES_PER_OPERATION = 100  # per generation mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_generated_requests_get_no_server_error_and_match_the_schema(live_api):
    schema = schemathesis.openapi.from_url(f"{live_api}/openapi.json")
    calls: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    operations = [r.ok() for r in schema.get_all_operations()]
    # /readyz takes no input, and without a Denoiser here its 503 is the right answer
    operations = [op for op in operations if op.path != "/readyz"]
    for operation, mode in [(op, mode) for op in operations for mode in GenerationMode]:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def exercise(case) -> None:
            response = case.call(base_url=live_api, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30)
            calls[case.operation.label] += 1
            statuses[response.status_code] += 1
            case.validate_response(response, checks=CHECKS)

        try:
            exercise()
        except Unsatisfiable:  # nothing to make invalid: an operation without inputs
            assert mode == GenerationMode.NEGATIVE, operation.label
    total = sum(calls.values())
    print(f"{total} generated requests over {len(calls)} operations; statuses {dict(sorted(statuses.items()))}")
    assert total >= 1000
    assert not any(status >= 500 for status in statuses)
    assert len(calls) >= 7  # every operation was exercised
