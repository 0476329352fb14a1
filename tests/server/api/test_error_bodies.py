"""What a malformed request is told, over real HTTP, on the native and the OpenAI routes: a task id with
a "/" (400 with the naming rule, not the router's 404), non-finite numbers, bodies that are not JSON
objects, invalid JSON (the reason and where), and token counts over the server's limit (the limit). The
messages are the same on both; the OpenAI routes answer them 400 in OpenAI's shape
(``test_openai_errors``)."""

from __future__ import annotations

import json

import httpx
import pytest

from prefix_store.errors import InvalidName
from prefix_store.storage.names import validate_task_id
from server.api.errors import is_openai_path
from tests.server.api.live_server import NEW_TOKENS_LIMIT

pytestmark = pytest.mark.e2e  # starts servers or other processes

JSON = {"content-type": "application/json"}
# a valid body of each generation route, with its token-count field
ROUTES = {
    "/v1/generate": ({"prompt": "hi", "max_new_tokens": 2}, "max_new_tokens"),
    "/v1/completions": ({"model": "base", "prompt": "hi", "max_tokens": 2}, "max_tokens"),
    "/v1/chat/completions": (
        {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "max_tokens",
    ),
}


def _naming_rule() -> str:
    with pytest.raises(InvalidName) as refused:
        validate_task_id("team/summarize")
    return str(refused.value)


@pytest.fixture
def client(limited_client: httpx.Client) -> httpx.Client:
    return limited_client


def _schema_status(route: str) -> int:
    """Schema errors are 422 on the native routes, 400 (OpenAI's) on the OpenAI routes."""
    return 400 if is_openai_path(route) else 422


def _error(response: httpx.Response, status: int) -> str:
    """The message of a documented error body with ``status``."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"type", "message"} and error["type"], error
    return error["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "team/summarize"),
        ("GET", "team/summarize"),
        ("DELETE", "team/summarize"),
        ("GET", "team/summarize/download"),
        ("GET", "a%2Fb"),
        ("DELETE", "a%2Fb"),
        ("GET", "a%2Fb/download"),
        ("PUT", "summarize/download"),  # only GET has a /download
        ("GET", "summarize/"),
        ("GET", "%2Fetc%2Fpasswd"),
        ("PUT", ""),
    ],
)
def test_a_task_id_with_a_slash_is_a_400_that_states_the_naming_rule(
    client: httpx.Client, method: str, path: str
) -> None:
    files = {"file": ("p.safetensors", b"never read")} if method == "PUT" else None
    response = client.request(method, f"/v1/admin/prefixes/{path}", files=files)
    assert response.json() == {"error": {"type": "invalid_request", "message": _naming_rule()}}
    assert response.status_code == 400
    assert "1-128 characters of [A-Za-z0-9._-]" in _naming_rule() and "'.'" in _naming_rule()


def test_unknown_routes_elsewhere_stay_404_and_the_list_takes_a_trailing_slash(client: httpx.Client) -> None:
    for path in ("/v1/nothing-here", "/v1/admin/nothing", "/v1/generate/x", "/v1/admin/prefixes-x"):
        assert _error(client.get(path), 404) == "Not Found", path
    assert client.get("/v1/admin/prefixes/").json() == client.get("/v1/admin/prefixes").json()


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("route", ROUTES)
def test_a_non_finite_number_is_refused_as_not_finite(client: httpx.Client, route: str, value: str) -> None:
    body, _ = ROUTES[route]
    raw = json.dumps({**body, "temperature": float(value)})  # Python's JSON writes (and reads) them
    assert value in raw
    message = _error(client.post(route, content=raw.encode(), headers=JSON), _schema_status(route))
    assert message == "temperature: Input should be a finite number"


@pytest.mark.parametrize(
    ("content", "headers", "got"),
    [
        (b'{"prompt": "hi"}', {}, "got no content-type"),
        (b'{"prompt": "hi"}', {"content-type": "text/plain"}, "got content-type 'text/plain'"),
        (b"prompt=hi", {"content-type": "application/x-www-form-urlencoded"}, "got content-type"),
        (b'["hi"]', JSON, "got an array"),
        (b'"hi"', JSON, "got a string"),
        (b"3", JSON, "got a number"),
        (b"", JSON, "got no body"),
    ],
    ids=["no-content-type", "text", "form", "array", "string", "number", "empty"],
)
@pytest.mark.parametrize("route", ROUTES)
def test_a_body_that_is_not_a_json_object_is_told_so(
    client: httpx.Client, route: str, content: bytes, headers: dict[str, str], got: str
) -> None:
    message = _error(client.post(route, content=content, headers=headers), _schema_status(route))
    assert message.startswith("the body must be a JSON object (content-type: application/json); " + got)


@pytest.mark.parametrize(
    "document",
    ['{\n  "prompt": "hi",\n  oops\n}', '{"prompt": "hi"', '{"prompt": "hi",}', "{not json"],
)
@pytest.mark.parametrize("route", ROUTES)
def test_invalid_json_is_told_with_its_reason_and_where(
    client: httpx.Client, route: str, document: str
) -> None:
    with pytest.raises(json.JSONDecodeError) as decoding:
        json.loads(document)
    reason = decoding.value
    message = _error(client.post(route, content=document.encode(), headers=JSON), _schema_status(route))
    assert message == f"invalid JSON: {reason.msg} at line {reason.lineno} column {reason.colno}"


@pytest.mark.parametrize("count", [NEW_TOKENS_LIMIT + 1, 65_537, 10**30])
@pytest.mark.parametrize("route", ROUTES)
def test_a_token_count_over_the_limit_names_the_limit(client: httpx.Client, route: str, count: int) -> None:
    body, field = ROUTES[route]
    model = {"model": client.get("/readyz").json()["model"]} if "model" in body else {}
    message = _error(client.post(route, json={**body, **model, field: count}), _schema_status(route))
    assert message == f"{field} is over the limit of {NEW_TOKENS_LIMIT}"
    assert client.post(route, json={**body, **model, field: NEW_TOKENS_LIMIT}).status_code == 200


def test_chat_names_max_completion_tokens_when_that_was_sent(client: httpx.Client) -> None:
    body, _ = ROUTES["/v1/chat/completions"]
    body = {**body, "model": client.get("/readyz").json()["model"], "max_tokens": None}
    message = _error(
        client.post("/v1/chat/completions", json={**body, "max_completion_tokens": NEW_TOKENS_LIMIT + 1}), 400
    )
    assert message == f"max_completion_tokens is over the limit of {NEW_TOKENS_LIMIT}"
