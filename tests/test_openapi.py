"""The OpenAPI description: true to the routes, and the API fuzzed from it with schemathesis."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from attune_sse.app import create_app
from attune_sse.config import load_config

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FUZZ_EXAMPLES = 30  # per operation: bounded, so the suite stays a few minutes long
# The stream never ends on its own: fuzzing it would hang; its bad input is tested in test_sse_execution_stream.
NOT_FUZZED = "/api/v1/executions/stream"
FUZZ_CALLS: collections.Counter = collections.Counter()
FUZZ_STATUSES: collections.Counter = collections.Counter()


def test_every_route_is_described_and_every_description_is_a_route(server: Any, database: Any,
                                                                   tmp_path: Path) -> None:
    described = requests.get(server.base_url + "/api/v1/openapi.json", timeout=5).json()
    assert described["openapi"].startswith("3.")
    in_spec = {(path, method.upper()) for path, item in described["paths"].items()
               for method in item if method in {"get", "post", "patch", "put", "delete"}}
    config_file = tmp_path / "c.yaml"
    config_file.write_text(json.dumps({"environment": "test", "database": {"url": database.url},
                                       "security": {"jwt_secret": "s"}}))
    app = create_app(load_config(config_file, environ={}), start_listener=False)
    in_app = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        in_app |= {(path, method) for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert in_spec == in_app


def json_errors(ctx: Any, response: Any, case: Any) -> bool:
    """Every error is the JSON of DESIGN.md, and no response carries a traceback."""
    assert "Traceback" not in response.text, "a traceback reached the client"
    if response.status_code >= 400:
        body = json.loads(response.text)
        assert set(body) == {"error", "code"}, body
        assert isinstance(body["error"], str) and isinstance(body["code"], str)
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          json_errors]


def fuzz_operation(operation: Any, mode: GenerationMode, token: str) -> None:
    """FUZZ_EXAMPLES generated requests to one operation, each checked by CHECKS."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              database=None, derandomize=True)
    def fuzz(case: Any) -> None:
        response = case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)
        FUZZ_CALLS[f"{case.method} {case.path} ({mode.value})"] += 1
        FUZZ_STATUSES[response.status_code] += 1

    fuzz()


def test_fuzz_the_api(server: Any, token: str) -> None:
    """Each operation with valid (positive) and invalid (negative) generated requests, checked
    for: no 5xx, documented status codes and content types, responses matching their schema,
    errors in the JSON shape, no traceback."""
    api_schema = schemathesis.openapi.from_url(server.base_url + "/api/v1/openapi.json").exclude(path=NOT_FUZZED)
    failures = []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(operation, mode, token)
            except Unsatisfiable:
                # An operation with no parameter and no body has no invalid input to send.
                assert mode is GenerationMode.NEGATIVE and not operation.body and not operation.query
            except Exception as exc:  # collected, so one report names every failing operation
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)


def test_fuzz_report() -> None:
    """After the fuzzing (file order): what it tried, saved for the record."""
    assert FUZZ_CALLS, "the fuzz run made no call"
    ARTIFACTS.mkdir(exist_ok=True)
    report = {"examples": sum(FUZZ_CALLS.values()), "per_operation": dict(FUZZ_CALLS),
              "statuses": {str(k): v for k, v in sorted(FUZZ_STATUSES.items())}, "failures": 0}
    (ARTIFACTS / "fuzz-report.json").write_text(json.dumps(report, indent=2))
    assert not any(status >= 500 for status in FUZZ_STATUSES)
