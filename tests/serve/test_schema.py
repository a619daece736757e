"""Schemathesis over serve's OpenAPI schema, on a live uvicorn: for every operation, valid
and invalid inputs (bounded, seeded), never a 5xx, and every response as documented. Bodies
also get numbers JSON schemas cannot express (NaN, Infinity, 1e400) in each field."""

from __future__ import annotations

import json
from typing import Any

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
from pydantic import BaseModel
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core import NotSet

from services.serve.app import create_app
from services.serve.schemas import FeedbackIn, PromoteIn, RetrainIn, RollbackIn
from tests.serve.conftest import API_KEY, live_server

EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
# Moves aliases or queues a full retrain: driven by the dedicated tests, not by fuzzing.
SIDE_EFFECTS = {"POST /models/{version}/promote", "POST /models/rollback", "POST /retrain"}
# Python's JSON parser reads these as floats no field may hold. Every such body is refused
# before the route runs, so the operations with side effects are safe to send them to.
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e400", "-1e400")
BODIES: dict[str, type[BaseModel]] = {
    "POST /feedback": FeedbackIn, "POST /models/{version}/promote": PromoteIn,
    "POST /models/rollback": RollbackIn, "POST /retrain": RetrainIn}
MARK = "@non-finite-number@"


def fuzz(operation: schemathesis.APIOperation, mode: GenerationMode, url: str) -> None:
    """Run EXAMPLES seeded cases of one operation in one mode; raises the first failure."""
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck),
                         phases=[hypothesis.Phase.generate])
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=url, headers={"X-API-Key": API_KEY}, checks=checks)

    run()


def with_mark(body: Any, field: str | None, index: int) -> Any:
    """`body` with MARK as `field` of the object (of one element of an array), or as the
    whole body when `field` is None or the body holds no object."""
    if isinstance(body, list) and body and field is not None:
        element = index % len(body)
        return [with_mark(item, field, index) if i == element else item
                for i, item in enumerate(body)]
    if isinstance(body, dict) and field is not None:
        return {**body, field: MARK}
    return MARK


def fuzz_non_finite(operation: schemathesis.APIOperation, url: str) -> None:
    """EXAMPLES valid bodies, each with one non-finite number put in: each must be a 422
    as documented."""
    fields = sorted(BODIES[operation.label].model_fields)
    cases = st.tuples(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                      st.sampled_from(NON_FINITE), st.sampled_from([*fields, None]),
                      st.integers(0, 1000))

    @hypothesis.given(drawn=cases)
    @hypothesis.settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck),
                         phases=[hypothesis.Phase.generate])
    def run(drawn: tuple[schemathesis.Case, str, str | None, int]) -> None:
        case, literal, field, index = drawn
        body = None if isinstance(case.body, NotSet) else case.body
        raw = json.dumps(with_mark(body, field, index)).replace(json.dumps(MARK), literal)
        sent = operation.Case(path_parameters=case.path_parameters, query=case.query,
                              body=raw.encode(), media_type="application/json")
        response = sent.call_and_validate(base_url=url, headers={"X-API-Key": API_KEY},
                                          checks=CHECKS)
        assert response.status_code == 422, (raw[:300], response.status_code, response.text)
        assert response.json()["detail"][0]["msg"].startswith("body"), response.text

    run()


@pytest.mark.timeout(900)
def test_schema_holds_for_generated_requests(serve_env: dict[str, str]) -> None:
    failures: list[str] = []
    with live_server(create_app()) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        labels = {op.label for op in operations}
        assert {"GET /recommendations/{user_id}", "GET /items/{movie_id}/similar",
                "GET /popular", "POST /feedback", "GET /models", "GET /models/{version}",
                "GET /healthz", "GET /readyz", "GET /metrics"} | SIDE_EFFECTS <= labels
        for operation in operations:
            if operation.label in SIDE_EFFECTS:
                continue
            for mode in GenerationMode:
                try:
                    fuzz(operation, mode, url)
                except hypothesis.errors.Unsatisfiable:
                    # No inputs (GET /healthz, ...): nothing invalid can be sent.
                    assert mode is GenerationMode.NEGATIVE, operation.label
                # Schemathesis raises a group of failures: collect each operation's, then report.
                except (Exception, BaseExceptionGroup) as error:
                    failures.append(f"{operation.label} ({mode.value}): {error}")
        for operation in operations:
            if operation.label in BODIES:
                try:
                    fuzz_non_finite(operation, url)
                except (Exception, BaseExceptionGroup) as error:
                    failures.append(f"{operation.label} (non-finite numbers): {error}")
        assert {op.label for op in operations} >= set(BODIES)
    assert not failures, "\n\n".join(failures)
