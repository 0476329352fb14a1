"""Valid but hostile requests get a bounded, correct answer, over real HTTP with the demo model: a request is
one request to its tenant's limits whatever its ``n``; one that makes more engine requests than the server
queues is a 400 (never a 429 forever); the tokens and logprob entries one request may make are capped with
a 400 that states the limit (an unset budget is cut to fit instead); ``usage`` counts every ``best_of``
sample; ``logit_bias`` keys are ASCII token ids; response formats that admit no document, or whose
patterns cannot be used, are refused before any token is generated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testing.server_process import metric
from tests.server.api.live_server import live_server, write_keys_file

pytestmark = pytest.mark.e2e  # starts servers or other processes

QUEUE = 64
REQUEST_TOKENS = 4096
REQUEST_LOGPROBS = 2000
KEYS = {"solo-key": ("solo", "admin"), "wide-key": ("wide", "admin")}
MESSAGES = [{"role": "user", "content": "Give me a JSON document."}]


def words(tokens: int) -> str:
    """A text of exactly ``tokens`` tokens in the demo tokenizer."""
    return " the" * tokens


@pytest.fixture(scope="module")
def server_url(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tenant ``solo`` may have one request in flight and 3 a minute; ``wide`` the defaults (64, 600)."""
    root = tmp_path_factory.mktemp("bounds")
    keys = write_keys_file(
        root / "keys.json", KEYS, tenants={"solo": {"max_concurrent": 1, "requests_per_minute": 3}}
    )
    env = {
        "PREFIX_SERVE_API_KEYS": str(keys),
        "PREFIX_SERVE_MAX_QUEUE": str(QUEUE),
        "PREFIX_SERVE_MAX_REQUEST_TOKENS": str(REQUEST_TOKENS),
        "PREFIX_SERVE_MAX_REQUEST_LOGPROBS": str(REQUEST_LOGPROBS),
    }
    with live_server(demo_model_dir, root / "store", env=env) as url:
        yield url


def client(server_url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=server_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


@pytest.fixture(scope="module")
def wide(server_url: str) -> Iterator[httpx.Client]:
    with client(server_url, "wide-key") as http:
        yield http


@pytest.fixture(scope="module")
def base_id(wide: httpx.Client) -> str:
    return wide.get("/v1/models").json()["data"][0]["id"]


def openai_error(response: httpx.Response, param: str | None, code: str = "invalid_value") -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error
    return error["message"]


def test_a_request_of_many_samples_is_one_request_to_the_tenants_limits(
    server_url: str, base_id: str
) -> None:
    """``solo`` (1 in flight, 3 a minute): three requests of ``n`` 16 are served, the fourth is over the rate."""
    body = {"model": base_id, "prompt": "Once", "max_tokens": 2, "n": 16, "ignore_eos": True}
    with client(server_url, "solo-key") as solo:
        for _ in range(3):
            answer = solo.post("/v1/completions", json=body)
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["choices"]) == 16 and answer.json()["usage"]["completion_tokens"] == 32
        over = solo.post("/v1/completions", json=body)
    assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
    assert "3 requests per minute" in over.json()["error"]["message"]


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_more_engine_requests_than_the_queue_holds_is_a_400_that_states_it(
    wide: httpx.Client, base_id: str, route: str
) -> None:
    common = {"model": base_id, "max_tokens": 1, "ignore_eos": True}
    if route == "chat":
        path, body = "/v1/chat/completions", {**common, "messages": MESSAGES}
    else:
        path, body = "/v1/completions", {**common, "prompt": ["a", "b"]}
    prompts = 1 if route == "chat" else 2
    served = wide.post(path, json={**body, "n": QUEUE // prompts})
    assert served.status_code == 200 and len(served.json()["choices"]) == QUEUE, served.text
    message = openai_error(wide.post(path, json={**body, "n": QUEUE // prompts + 1}), "n")
    assert f"{QUEUE + prompts} engine requests" in message and f"the {QUEUE} the server queues" in message


def test_tokens_over_the_request_limit_are_refused_and_an_unset_budget_is_cut_to_fit(
    wide: httpx.Client, base_id: str
) -> None:
    """4 prompts of 200 tokens × ``n`` 4 = 16 engine requests: 3200 prompt tokens leave 896 for new ones."""
    body = {"model": base_id, "prompt": [words(200)] * 4, "n": 4, "ignore_eos": True, "temperature": 0}
    per_request = (REQUEST_TOKENS - 3200) // 16  # 56
    fits = wide.post("/v1/completions", json={**body, "max_tokens": per_request})
    assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == 16 * per_request
    message = openai_error(
        wide.post("/v1/completions", json={**body, "max_tokens": per_request + 1}), "max_tokens"
    )
    assert (
        f"{REQUEST_TOKENS + 16} tokens" in message
        and f"over the limit of {REQUEST_TOKENS} per request" in message
    )
    messages = [{"role": "user", "content": words(200)}]
    chat = {"model": base_id, "messages": messages, "n": 16, "ignore_eos": True}
    cut = wide.post("/v1/chat/completions", json=chat)  # unset: as many as fit (1024), cut to the limit
    assert cut.status_code == 200, cut.text
    prompt_tokens = cut.json()["usage"]["prompt_tokens"]
    assert cut.json()["usage"]["completion_tokens"] == 16 * ((REQUEST_TOKENS - 16 * prompt_tokens) // 16)


def test_logprob_entries_over_the_answer_limit_are_refused(wide: httpx.Client, base_id: str) -> None:
    """Scoring 4 prompts of 100 tokens with 4 alternatives: 4 × 100 × 5 = 2000 entries fit, 101 tokens not."""
    body = {"model": base_id, "max_tokens": 0, "echo": True, "logprobs": 4}
    scored = wide.post("/v1/completions", json={**body, "prompt": [words(100)] * 4})
    assert scored.status_code == 200, scored.text
    assert [len(c["logprobs"]["top_logprobs"]) for c in scored.json()["choices"]] == [100] * 4
    message = openai_error(
        wide.post("/v1/completions", json={**body, "prompt": [words(101)] * 4}), "logprobs"
    )
    assert "2020 logprob entries" in message and f"over the limit of {REQUEST_LOGPROBS}" in message


def test_usage_counts_every_best_of_sample_as_the_metrics_do(
    server_url: str, wide: httpx.Client, base_id: str
) -> None:
    generated = metric(server_url, "prefix_serve_generated_tokens_total")
    body = {"model": base_id, "prompt": "Once", "max_tokens": 5, "best_of": 4, "n": 1, "ignore_eos": True}
    answer = wide.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["choices"]) == 1 and answer.json()["usage"]["completion_tokens"] == 20
    assert metric(server_url, "prefix_serve_generated_tokens_total") - generated == 20


@pytest.mark.parametrize("key", ["³", "١٢", "1" * 5000, "-1", "", " 7", "7.0", "0x10", "12345678901"])
def test_a_logit_bias_key_that_is_not_ascii_digits_is_a_400(
    wide: httpx.Client, base_id: str, key: str
) -> None:
    body = {"model": base_id, "prompt": "Once", "max_tokens": 1, "logit_bias": {key: 5}}
    message = openai_error(wide.post("/v1/completions", json=body), "logit_bias")
    assert "1 to 10 ASCII digits" in message and len(message) < 500


def test_a_logit_bias_key_outside_the_vocabulary_is_a_400_naming_it(wide: httpx.Client, base_id: str) -> None:
    body = {"model": base_id, "prompt": "Once", "max_tokens": 1, "logit_bias": {"9999999999": 5}}
    assert "logit_bias: token ids must be below" in openai_error(
        wide.post("/v1/completions", json=body), "logit_bias"
    )
    assert wide.post("/v1/completions", json={**body, "logit_bias": {"12": 5}}).status_code == 200


@pytest.mark.parametrize(
    ("schema", "refusal"),
    [
        ({"$ref": "#"}, "admits no document"),
        (
            {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
            "admits no document",
        ),
        ({"type": "string", "pattern": "\\"}, "ends with a lone"),
        ({"type": "string", "pattern": "("}, "cannot be used"),
        (
            {"type": "object", "properties": {"s": {"type": "string", "pattern": "^a{1000000}$"}}},
            "cannot be used",
        ),
        ({"type": "object", "patternProperties": {"^b{1000000}$": {"type": "string"}}}, "cannot be used"),
    ],
)
def test_a_response_format_that_cannot_be_followed_is_refused_before_generating(
    wide: httpx.Client, base_id: str, schema: dict, refusal: str
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "doc", "schema": schema}}
    body = {"model": base_id, "messages": MESSAGES, "max_tokens": 8, "response_format": response_format}
    assert refusal in openai_error(wide.post("/v1/chat/completions", json=body), "response_format")
