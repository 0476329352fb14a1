"""LangChain and LiteLLM pointed at a live server as at any OpenAI-compatible one: LangChain's
``OpenAI.batch`` (a list of prompts in one request) and ``ChatOpenAI.with_structured_output`` (a JSON
schema), LiteLLM's ``text_completion`` with a list of prompts and its ``ContextWindowExceededError`` for a
prompt over the model's context."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import litellm
import pytest
from langchain_openai import ChatOpenAI, OpenAI
from pydantic import BaseModel as Schema
from pydantic import Field

from server.engine.base_model import BaseModel
from tests.server.api.live_server import live_server, openai_client

pytestmark = pytest.mark.e2e  # starts a server

PROMPTS = ["The cat sat on", "Numbers: one, two,", "A long time ago"]


class Reply(Schema):
    ok: bool
    digit: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def url(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with live_server(demo_model_dir, tmp_path_factory.mktemp("store")) as server_url:
        yield server_url


@pytest.fixture(scope="module")
def model(llama_base: BaseModel) -> str:
    return llama_base.model_id


def _alone(url: str, model: str, prompt: str, max_tokens: int) -> str:
    client = openai_client(url, "unused")
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return answer.choices[0].text


def test_langchain_openai_batch_answers_each_prompt(url: str, model: str) -> None:
    llm = OpenAI(
        model=model, base_url=f"{url}/v1", api_key="unused", max_tokens=6, temperature=0, max_retries=0
    )
    assert llm.batch(PROMPTS) == [_alone(url, model, prompt, 6) for prompt in PROMPTS]


def test_langchain_structured_output_is_a_valid_instance(url: str, model: str) -> None:
    chat = ChatOpenAI(
        model=model, base_url=f"{url}/v1", api_key="unused", temperature=0, max_tokens=40, max_retries=0
    )
    reply = chat.with_structured_output(Reply).invoke("Reply in JSON.")
    assert isinstance(reply, Reply) and 0 <= reply.digit <= 9


def test_litellm_text_completion_with_a_list_of_prompts(url: str, model: str) -> None:
    answer = litellm.text_completion(
        model=f"text-completion-openai/{model}",
        api_base=f"{url}/v1",
        api_key="unused",
        prompt=PROMPTS,
        max_tokens=5,
        temperature=0,
    )
    texts = [choice.text for choice in sorted(answer.choices, key=lambda choice: choice.index)]
    assert texts == [_alone(url, model, prompt, 5) for prompt in PROMPTS]


def test_litellm_raises_context_window_exceeded_for_an_over_long_prompt(
    url: str, model: str, llama_base: BaseModel
) -> None:
    too_long = "word " * (llama_base.max_positions + 10)
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.text_completion(
            model=f"text-completion-openai/{model}", api_base=f"{url}/v1", api_key="unused", prompt=too_long
        )
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(
            model=f"openai/{model}",
            api_base=f"{url}/v1",
            api_key="unused",
            messages=[{"role": "user", "content": too_long}],
        )
