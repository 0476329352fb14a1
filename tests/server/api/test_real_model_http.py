"""The real SmolLM2-135M-Instruct over HTTP: real text with multi-byte characters streams as it answers
whole, and the chat route renders the model's own chat template."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.model_source import DEFAULT_MODEL
from tests.server.api.live_server import live_server

pytestmark = [pytest.mark.real_model, pytest.mark.e2e]


@pytest.fixture(scope="module")
def client(smollm2_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with (
        live_server(DEFAULT_MODEL, tmp_path_factory.mktemp("store"), timeout=120) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        yield client


def events(client: httpx.Client, route: str, body: dict) -> list[dict]:
    with client.stream("POST", route, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_streamed_text_is_the_whole_answer_on_multi_byte_text(client: httpx.Client) -> None:
    body = {"prompt": "Traduis en français : « I love coffee and crêpes. » Réponse :", "max_new_tokens": 24}
    whole = client.post("/v1/generate", json=body).json()
    streamed = events(client, "/v1/generate", body)
    tokens = [e for e in streamed if "token_id" in e]
    assert [e["token_id"] for e in tokens] == whole["token_ids"]
    assert "".join(e["text"] for e in tokens) == whole["text"]
    assert any(ord(c) > 127 for c in whole["text"]), whole["text"]  # the test saw multi-byte text
    assert streamed[-1]["finish_reason"] == whole["finish_reason"]


def test_chat_uses_the_models_template_streamed_or_not(client: httpx.Client) -> None:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        "max_tokens": 32,
        "temperature": 0,
    }
    answer = client.post("/v1/chat/completions", json=body).json()
    text = answer["choices"][0]["message"]["content"]
    assert "Paris" in text and "<|im_end|>" not in text and answer["choices"][0]["finish_reason"] == "stop"
    chunks = events(client, "/v1/chat/completions", body)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == text
    # the prompt was rendered with the template: more tokens than the bare question
    bare = {"model": DEFAULT_MODEL, "prompt": body["messages"][0]["content"], "max_tokens": 1}
    question = client.post("/v1/completions", json=bare)
    assert answer["usage"]["prompt_tokens"] > question.json()["usage"]["prompt_tokens"]
