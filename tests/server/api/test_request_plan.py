"""What the request plan decides, on both route families, over real HTTP with the demo model (2048
positions), a server that takes prompts of at most 2040 tokens and at most 40 new tokens: a prompt at the
limit and one token over it; an unset budget cut to what the context leaves (with and without a task's
prefix); a budget over what the context leaves; a budget over the server's cap where it would fit; a
prompt scored with no room left for a new token. The native routes answer 413/422 with their body, the
OpenAI routes 400 with OpenAI's codes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from prefix_store.formats.native import encode_native
from server.engine.base_model import BaseModel
from tests.server.api.live_server import live_server
from tests.server.engine.helpers import random_prefix

pytestmark = pytest.mark.e2e  # starts servers or other processes

CONTEXT = 2048  # the demo model's positions
PROMPT_LIMIT = 2040
CAP = 40
NATIVE, COMPLETIONS = "native", "completions"


def words(tokens: int) -> str:
    """A text of exactly ``tokens`` tokens in the demo tokenizer (" the" is one token, and no BOS)."""
    return " the" * tokens


@pytest.fixture(scope="module")
def client(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    env = {"PREFIX_SERVE_MAX_PROMPT_TOKENS": str(PROMPT_LIMIT), "PREFIX_SERVE_MAX_NEW_TOKENS": str(CAP)}
    with (
        live_server(demo_model_dir, tmp_path_factory.mktemp("store"), env=env) as url,
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        yield http


@pytest.fixture(scope="module")
def base_id(client: httpx.Client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def tasks(client: httpx.Client, llama_base: BaseModel) -> dict[int, str]:
    """Tasks by their prefix's virtual tokens."""
    for tokens in (3, 8):
        blob = encode_native(random_prefix(llama_base, tokens, seed=tokens), llama_base.geometry)
        uploaded = client.put(f"/v1/admin/prefixes/p{tokens}", files={"file": ("p.safetensors", blob)})
        assert uploaded.status_code == 201, uploaded.text
    return {3: "p3", 8: "p8"}


def ask(
    client: httpx.Client,
    route: str,
    base_id: str,
    prompt: str,
    new_tokens: int | None,
    task: str | None = None,
) -> httpx.Response:
    """A greedy request on ``route``; ``new_tokens`` None leaves the budget unset. OpenAI's generate past
    EOS (``ignore_eos``), so a budget is what they return."""
    if route == NATIVE:
        body: dict = {"prompt": prompt, "task_id": task}
        if new_tokens is not None:
            body["max_new_tokens"] = new_tokens
        return client.post("/v1/generate", json=body)
    body = {"model": task or base_id, "prompt": prompt, "temperature": 0, "ignore_eos": True}
    if new_tokens is not None:
        body["max_tokens"] = new_tokens
    return client.post("/v1/completions", json=body)


def new_tokens_of(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["completion_tokens"]


def native_error(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == error_type
    return response.json()["error"]["message"]


def openai_error(response: httpx.Response, code: str, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    return error["message"]


@pytest.mark.parametrize("route", [NATIVE, COMPLETIONS])
def test_a_prompt_at_the_limit_is_served_and_one_token_more_is_refused(
    client: httpx.Client, base_id: str, route: str
) -> None:
    served = ask(client, route, base_id, words(PROMPT_LIMIT), 1)
    assert served.status_code == 200 and served.json()["usage"]["prompt_tokens"] == PROMPT_LIMIT
    refused = ask(client, route, base_id, words(PROMPT_LIMIT + 1), 1)
    if route == NATIVE:
        message = native_error(refused, 413, "payload_too_large")
        assert message == f"the prompt has {PROMPT_LIMIT + 1} tokens, over the limit of {PROMPT_LIMIT}"
    else:
        message = openai_error(refused, "context_length_exceeded", "prompt")
        assert f"This server's maximum input length is {PROMPT_LIMIT} tokens" in message


@pytest.mark.parametrize("route", [NATIVE, COMPLETIONS])
def test_an_unset_budget_is_the_default_cut_to_what_the_context_leaves(
    client: httpx.Client, base_id: str, tasks: dict[int, str], route: str
) -> None:
    room = CONTEXT - PROMPT_LIMIT  # 8, under both routes' defaults (native 64, completions 16)
    assert new_tokens_of(ask(client, route, base_id, words(PROMPT_LIMIT), None)) == room
    assert new_tokens_of(ask(client, route, base_id, words(PROMPT_LIMIT), None, task=tasks[3])) == room - 3
    default = CAP if route == NATIVE else 16  # native: 64 cut to the server's cap
    short = ask(client, route, base_id, words(10), None)
    assert new_tokens_of(short) <= default and (
        short.json().get("finish_reason", "length") == "eos" or new_tokens_of(short) == default
    )
    if route == NATIVE:  # a prefix that leaves no room at all: the prompt alone is too long
        message = native_error(
            ask(client, route, base_id, words(PROMPT_LIMIT), None, task=tasks[8]), 413, "payload_too_large"
        )
        assert (
            message
            == f"prefix (8) + prompt ({PROMPT_LIMIT}) = {CONTEXT} positions leave no room for new tokens: the model supports {CONTEXT}"
        )


@pytest.mark.parametrize("route", [NATIVE, COMPLETIONS])
def test_a_budget_over_what_the_context_leaves_is_refused(
    client: httpx.Client, base_id: str, tasks: dict[int, str], route: str
) -> None:
    room = CONTEXT - PROMPT_LIMIT
    assert new_tokens_of(ask(client, route, base_id, words(PROMPT_LIMIT), room)) == room
    over = ask(client, route, base_id, words(PROMPT_LIMIT), room + 1)
    with_prefix = ask(client, route, base_id, words(PROMPT_LIMIT), room - 2, task=tasks[3])
    if route == NATIVE:
        message = native_error(over, 413, "payload_too_large")
        assert message == (
            f"prefix (0) + prompt ({PROMPT_LIMIT}) + max_new_tokens ({room + 1}) = {CONTEXT + 1} positions, "
            f"but the model supports {CONTEXT}"
        )
        assert "prefix (3)" in native_error(with_prefix, 413, "payload_too_large")
    else:
        message = openai_error(over, "context_length_exceeded", "max_tokens")
        assert message == (
            f"This model's maximum context length is {CONTEXT} tokens. However, you requested {CONTEXT + 1} "
            f"tokens ({PROMPT_LIMIT} in the prompt, {room + 1} in the completion). Please reduce the length "
            "of the prompt or completion."
        )
        assert "3 in the task's prefix" in openai_error(with_prefix, "context_length_exceeded", "max_tokens")


@pytest.mark.parametrize("route", [NATIVE, COMPLETIONS])
def test_a_budget_over_the_servers_cap_is_refused_where_it_would_fit(
    client: httpx.Client, base_id: str, route: str
) -> None:
    assert new_tokens_of(ask(client, route, base_id, words(10), CAP)) == CAP or route == NATIVE
    refused = ask(client, route, base_id, words(10), CAP + 1)
    field = "max_new_tokens" if route == NATIVE else "max_tokens"
    if route == NATIVE:
        message = native_error(refused, 422, "validation_error")
    else:
        message = openai_error(refused, "integer_above_max_value", field)
    assert message == f"{field} is over the limit of {CAP}"


def test_a_prompt_that_fills_the_context_is_scored_with_no_new_token(
    client: httpx.Client, tasks: dict[int, str]
) -> None:
    """Prefix (8) + prompt (2040) = the whole context: ``max_tokens`` 0 with ``echo`` scores it (lm-eval's
    call); one new token does not fit, and the prompt is at fault."""
    body = {"model": tasks[8], "prompt": words(PROMPT_LIMIT), "max_tokens": 0, "echo": True, "logprobs": 0}
    scored = client.post("/v1/completions", json=body)
    assert scored.status_code == 200, scored.text
    choice = scored.json()["choices"][0]
    assert (
        len(choice["logprobs"]["token_logprobs"]) == PROMPT_LIMIT
        and choice["logprobs"]["token_logprobs"][0] is None
    )
    message = openai_error(
        client.post("/v1/completions", json={**body, "max_tokens": 1}),
        "context_length_exceeded",
        "prompt",
    )
    assert "8 in the task's prefix" in message
