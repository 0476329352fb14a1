"""Schemathesis against the live server's OpenAPI: every operation, positive and negative data, with an
admin key, a user key and no key; zero 5xx and zero check failures. The OpenAPI it reads must declare
every error a route answers (with docs/API.md's error body) and the server's configured limits.
``python -m hardening.fuzz_api`` runs the same with many more examples."""

from __future__ import annotations

import re

import pytest

from hardening.fuzz_api import fuzz, known_values
from server.api.app import create_app
from server.api.errors import is_openai_path
from server.config import ServeSettings
from tests.hardening.conftest import Hardened

EXAMPLES = 12  # per operation, key and mode: 12 operations x 3 keys x 2 modes, about 700 requests
PUBLIC = {"/healthz", "/health", "/readyz"}


def test_the_openapi_declares_every_error_with_the_error_body() -> None:
    """docs/API.md's error body on the native routes; OpenAI's, and 400 for schema errors, on the OpenAI ones."""
    document = create_app(ServeSettings()).openapi()
    for path, operations in document["paths"].items():
        openai = is_openai_path(path)
        error_ref = f"#/components/schemas/{'OpenAIErrorBody' if openai else 'ErrorBody'}"
        for method, operation in operations.items():
            responses = operation["responses"]
            errors = {status: r for status, r in responses.items() if status[0] in "45"}
            assert openai == ("openai" in operation["tags"]), (method, path)  # OPENAI_PATHS = the router
            if path in PUBLIC:
                continue
            assert {"401", "503"} <= set(errors), (method, path)
            if path.startswith("/v1/admin"):
                assert "403" in errors, (method, path)
            if openai and operation.get("requestBody"):
                assert "400" in errors and "422" not in errors, (method, path)
            for status, response in errors.items():  # FastAPI's own 422 body is replaced everywhere
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": error_ref}, (method, path, status)
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_the_openapi_carries_the_configured_limits() -> None:
    settings = ServeSettings(max_new_tokens=8, max_stop_sequences=3, max_stop_sequence_chars=10)
    schemas = create_app(settings).openapi()["components"]["schemas"]
    generate = schemas["GenerateBody"]["properties"]
    assert generate["max_new_tokens"]["maximum"] == 8 and generate["max_new_tokens"]["default"] == 8
    assert generate["stop"]["maxItems"] == 3 and generate["stop"]["items"]["maxLength"] == 10
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["max_completion_tokens"]["anyOf"][0]["maximum"] == 8
    assert {
        branch.get("maxLength") for branch in chat["stop"]["anyOf"] if branch.get("type") == "string"
    } == {10}
    upload = create_app(settings).openapi()["paths"]["/v1/admin/prefixes/{task_id}"]["put"]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    task_id = next(p for p in upload["parameters"] if p["name"] == "task_id")["schema"]
    assert task_id["maxLength"] == 128 and re.fullmatch(task_id["pattern"], "a.b-c_9")


@pytest.mark.e2e
def test_schemathesis_finds_no_5xx_and_no_schema_violation(api_server: Hardened) -> None:
    known = known_values(api_server.server, api_server.admin_key)
    report = fuzz(api_server.server.url, api_server.keys, examples=EXAMPLES, known=known, seed=0)
    assert report.server_errors == 0, report.to_json()
    assert report.failures == [], "\n\n".join(
        f"{f['operation']} [{f['key']}, {f['mode']}] {f['check']}\n{f['message']}" for f in report.failures
    )
    assert len(report.operations) >= 12
    ok = {
        op
        for op, outcomes in report.by_operation.items()
        if any(o.endswith((" 200", " 201", " 204")) for o in outcomes)
    }
    # steered cases get past "unknown task" to the engine and the store on every operation
    assert ok == set(report.operations), set(report.operations) - ok
    assert report.statuses[401] > 0 and report.statuses[403] > 0 and report.statuses[422] > 0
