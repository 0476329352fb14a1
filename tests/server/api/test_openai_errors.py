"""What the OpenAI-compatible routes answer when a request cannot be served, over real HTTP with the demo
model (2048 positions) and the official ``openai`` client: OpenAI's error shape on every OpenAI route
(the native routes keep theirs), 400 ``context_length_exceeded`` in the words LiteLLM recognises,
``max_tokens`` up to what the context leaves, ``ignore_eos``, and stream chunks that carry ``usage`` only
when asked."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from prefix_store.formats.native import encode_native
from server.engine.base_model import BaseModel
from tests.server.api.live_server import live_server, openai_client, write_keys_file
from tests.server.engine.helpers import random_prefix

pytestmark = pytest.mark.e2e  # starts servers or other processes

CONTEXT = 2048  # the demo model's positions
PREFIX_TOKENS = 6
MESSAGES = [{"role": "user", "content": "Say something."}]
PROMPT = "Once upon a time"
KEYS = {"acme-admin-key": ("acme", "admin"), "acme-user-key": ("acme", "user"), "tiny-key": ("tiny", "user")}
USER = {"Authorization": "Bearer acme-user-key"}
# LiteLLM's ExceptionCheckers.is_error_str_context_window_exceeded looks for this (lower-cased) in the
# error's text to raise its ContextWindowExceededError for OpenAI-compatible providers
LITELLM_CONTEXT_WINDOW = "this model's maximum context length is"


@pytest.fixture(scope="module")
def server_url(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Default limits (no --max-new-tokens); tenant ``tiny`` may send one request a minute."""
    root = tmp_path_factory.mktemp("openai-errors")
    keys = write_keys_file(root / "keys.json", KEYS, tenants={"tiny": {"requests_per_minute": 1}})
    with live_server(demo_model_dir, root / "store", env={"PREFIX_SERVE_API_KEYS": str(keys)}) as url:
        yield url


@pytest.fixture(scope="module")
def client(server_url: str) -> Iterator[httpx.Client]:
    """Plain HTTP, acme's user key: to read bodies and headers exactly as sent."""
    with httpx.Client(base_url=server_url, headers=USER, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def acme(server_url: str) -> openai.OpenAI:
    return openai_client(server_url, "acme-user-key")


@pytest.fixture(scope="module")
def base_id(client: httpx.Client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def task(server_url: str, llama_base: BaseModel) -> str:
    blob = encode_native(random_prefix(llama_base, PREFIX_TOKENS, seed=5), llama_base.geometry)
    uploaded = httpx.put(
        f"{server_url}/v1/admin/prefixes/summarize",
        files={"file": ("p.safetensors", blob)},
        headers={"Authorization": "Bearer acme-admin-key"},
    )
    assert uploaded.status_code == 201, uploaded.text
    return "summarize"


@pytest.fixture(scope="module")
def chat_prompt_tokens(acme: openai.OpenAI, base_id: str) -> int:
    """The tokens of ``MESSAGES`` through the chat template."""
    chat = acme.chat.completions.create(model=base_id, messages=MESSAGES, max_tokens=1)
    return chat.usage.prompt_tokens  # type: ignore[union-attr]


def _openai_error(response: httpx.Response, status: int) -> dict:
    """The error of an OpenAI-shaped body with ``status``: exactly OpenAI's four fields."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


JSON = {"content-type": "application/json"}
TOO_BIG = b'{"model": "m", "prompt": "' + b"x" * (1 << 20) + b'"}'  # over the 1 MiB body limit


NO_KEY = {"headers": {"Authorization": ""}}
SEED = {"json": {"model": "x", "messages": MESSAGES, "seed": -1}}


@pytest.mark.parametrize(
    ("method", "path", "request_args", "status", "param", "code"),
    [
        pytest.param("GET", "/v1/models", NO_KEY, 401, None, "invalid_api_key", id="no-key"),
        pytest.param("GET", "/v1/models/nothing", {}, 404, "model", "model_not_found", id="unknown-model"),
        pytest.param("GET", "/v1/models/a/b", {}, 404, None, "not_found", id="unknown-route"),
        pytest.param("GET", "/v1/models/a%0A", {}, 400, None, "invalid_request", id="control-char"),
        pytest.param("DELETE", "/v1/completions", {}, 405, None, "method_not_allowed", id="method"),
        pytest.param("POST", "/v1/completions", {"content": b"{oops"}, 400, None, "invalid_value", id="json"),
        pytest.param("POST", "/v1/completions", {"json": {}}, 400, "model", "missing_required_parameter"),
        pytest.param("POST", "/v1/chat/completions", {"content": TOO_BIG}, 400, None, "payload_too_large"),
        pytest.param("POST", "/v1/chat/completions", SEED, 400, "seed", "invalid_value", id="range"),
    ],
)
def test_every_openai_route_answers_errors_in_openai_shape(
    client: httpx.Client, method: str, path: str, request_args: dict, status: int, param: str, code: str
) -> None:
    response = client.request(method, path, **{"headers": JSON, **request_args})
    error = _openai_error(response, status)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_the_native_routes_keep_their_error_body(client: httpx.Client) -> None:
    def native(response: httpx.Response, status: int) -> dict:
        assert response.status_code == status, response.text
        assert list(response.json()) == ["error"] and set(response.json()["error"]) == {"type", "message"}
        return response.json()["error"]

    unauthenticated = httpx.post(f"{client.base_url}/v1/generate", json={"prompt": "hi"})
    assert native(unauthenticated, 401) == {
        "type": "authentication_error",
        "message": "a valid API key is required",
    }
    assert native(client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": 0}), 422) == {
        "type": "validation_error",
        "message": "max_new_tokens: Input should be greater than or equal to 1",
    }
    over = native(client.post("/v1/generate", json={"prompt": "hi", "max_new_tokens": CONTEXT}), 413)
    assert over["type"] == "payload_too_large" and over["message"].endswith(f"the model supports {CONTEXT}")
    assert (
        native(client.post("/v1/generate", content=TOO_BIG, headers=JSON), 413)["type"] == "payload_too_large"
    )
    assert native(client.get("/v1/admin/prefixes/never-uploaded"), 403)["type"] == "permission_denied"


def test_a_rate_limited_tenant_gets_429_with_retry_after_in_openai_shape(
    server_url: str, base_id: str
) -> None:
    tiny = openai_client(server_url, "tiny-key")
    tiny.completions.create(model=base_id, prompt=PROMPT, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as raised:
        tiny.completions.create(model=base_id, prompt=PROMPT, max_tokens=1)
    error = raised.value
    assert (error.type, error.code, error.param) == ("rate_limit_error", "rate_limit_exceeded", None)
    assert int(error.response.headers["retry-after"]) >= 1


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_over_the_context_is_context_length_exceeded(
    acme: openai.OpenAI, base_id: str, chat_prompt_tokens: int, field: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        acme.chat.completions.create(model=base_id, messages=MESSAGES, **{field: CONTEXT})
    error = raised.value
    assert (error.status_code, error.type, error.code, error.param) == (
        400,
        "invalid_request_error",
        "context_length_exceeded",
        field,
    )
    p = chat_prompt_tokens
    assert error.body["message"] == (  # type: ignore[index]
        f"This model's maximum context length is {CONTEXT} tokens. However, you requested {p + CONTEXT} "
        f"tokens ({p} in the messages, {CONTEXT} in the completion). Please reduce the length of the "
        "messages or completion."
    )
    assert LITELLM_CONTEXT_WINDOW in str(error).lower()


def test_max_tokens_up_to_what_the_context_leaves_is_accepted(
    acme: openai.OpenAI, base_id: str, task: str, chat_prompt_tokens: int
) -> None:
    """The whole context, no server cap: a stop sequence from the greedy text ends each one early."""
    for model, room in (
        (base_id, CONTEXT - chat_prompt_tokens),
        (task, CONTEXT - chat_prompt_tokens - PREFIX_TOKENS),
    ):
        text = acme.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
        stop = text.choices[0].message.content[4:7]  # type: ignore[index]
        chat = acme.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=room, temperature=0, stop=stop
        )
        assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens < 12  # type: ignore[union-attr]
        with pytest.raises(openai.BadRequestError) as raised:
            acme.chat.completions.create(model=model, messages=MESSAGES, max_tokens=room + 1, stop=stop)
        assert (raised.value.code, raised.value.param) == ("context_length_exceeded", "max_tokens")
    assert f"{PREFIX_TOKENS} in the task's prefix" in raised.value.body["message"]  # type: ignore[index]


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_a_prompt_over_the_context_is_context_length_exceeded_naming_the_prompt(
    acme: openai.OpenAI, base_id: str, route: str
) -> None:
    long_text = "word " * CONTEXT
    with pytest.raises(openai.BadRequestError) as raised:
        if route == "chat":
            acme.chat.completions.create(model=base_id, messages=[{"role": "user", "content": long_text}])
        else:
            acme.completions.create(model=base_id, prompt=long_text)
    error = raised.value
    field = "messages" if route == "chat" else "prompt"
    assert (error.code, error.param) == ("context_length_exceeded", field)
    message = error.body["message"]  # type: ignore[index]
    assert (
        LITELLM_CONTEXT_WINDOW in message.lower() and f"Please reduce the length of the {field}." in message
    )


def test_ignore_eos_generates_past_the_end_of_sequence(
    acme: openai.OpenAI, client: httpx.Client, base_id: str
) -> None:
    """A seed whose sampled text ends at EOS early (native ``eos``) runs to ``max_tokens`` with ``ignore_eos``."""
    native = {"prompt": PROMPT, "max_new_tokens": 48, "temperature": 1.0}
    seed = next(
        s
        for s in range(200)
        if client.post("/v1/generate", json={**native, "seed": s}).json()["finish_reason"] == "eos"
    )
    params = {"model": base_id, "prompt": PROMPT, "max_tokens": 48, "temperature": 1.0, "seed": seed}
    ended = acme.completions.create(**params)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens < 48  # type: ignore[union-attr]
    kept_on = acme.completions.create(**params, extra_body={"ignore_eos": True})
    assert kept_on.choices[0].finish_reason == "length" and kept_on.usage.completion_tokens == 48  # type: ignore[union-attr]


def _chunks(client: httpx.Client, route: str, body: dict) -> list[dict]:
    with client.stream("POST", route, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_stream_chunks_carry_usage_only_when_asked(client: httpx.Client, base_id: str, route: str) -> None:
    body = {"model": base_id, "max_tokens": 6, "temperature": 0}
    body |= {"messages": MESSAGES} if "chat" in route else {"prompt": PROMPT}

    plain = _chunks(client, route, body)
    assert plain and all("usage" not in chunk and chunk["choices"] for chunk in plain)

    *text, last = _chunks(client, route, {**body, "stream_options": {"include_usage": True}})
    assert all("usage" not in chunk for chunk in text)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6

    continuous = {"include_usage": True, "continuous_usage_stats": True}
    every = _chunks(client, route, {**body, "stream_options": continuous})
    counts = [chunk["usage"]["completion_tokens"] for chunk in every]
    assert counts == sorted(counts) and counts[-1] == 6 and every[-1]["choices"] == []
    assert {chunk["usage"]["prompt_tokens"] for chunk in every} == {last["usage"]["prompt_tokens"]}
    assert [c["choices"] for c in every[:-1]] == [c["choices"] for c in text]  # the same text chunks
