"""Several prompts and several choices in one OpenAI request (lists of prompts, token-id prompts, ``n``,
``best_of``, streamed and not), and ``chat_template_kwargs``, with the official ``openai`` client against a
live server."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

from server.api.openai.protocol import MAX_PROMPTS, MAX_SAMPLES, ChatMessage
from server.api.openai.translation import render_chat
from server.engine.base_model import BaseModel
from tests.server.api.live_server import live_server, openai_client

pytestmark = pytest.mark.e2e  # starts a server

PROMPTS = ["The cat sat on", "Numbers: one, two,", "A long time ago"]


@pytest.fixture(scope="module")
def client(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    with live_server(demo_model_dir, tmp_path_factory.mktemp("store")) as url:
        yield openai_client(url, "unused")


@pytest.fixture(scope="module")
def model(llama_base: BaseModel) -> str:
    return llama_base.model_id


def _one(client: openai.OpenAI, model: str, prompt: str | list[int], **params: object) -> str:
    answer = client.completions.create(model=model, prompt=prompt, **{"max_tokens": 6, **params})
    assert len(answer.choices) == 1
    return answer.choices[0].text


def test_a_list_of_prompts_gets_a_choice_each_equal_to_asking_alone(
    client: openai.OpenAI, model: str, llama_base: BaseModel
) -> None:
    answer = client.completions.create(model=model, prompt=PROMPTS, max_tokens=6, temperature=0)
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    assert [choice.text for choice in answer.choices] == [
        _one(client, model, p, temperature=0) for p in PROMPTS
    ]
    prompt_ids = [llama_base.tokenizer(p).input_ids for p in PROMPTS]
    assert answer.usage.prompt_tokens == sum(len(ids) for ids in prompt_ids)
    assert answer.usage.completion_tokens == 18
    by_ids = client.completions.create(model=model, prompt=prompt_ids, max_tokens=6, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in answer.choices]


def test_n_seeded_samples_differ_and_are_reproducible(client: openai.OpenAI, model: str) -> None:
    params = {"model": model, "prompt": PROMPTS[:2], "max_tokens": 8, "temperature": 1.5, "n": 2, "seed": 7}
    first = client.completions.create(**params)
    again = client.completions.create(**params)
    texts = [choice.text for choice in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]  # prompt-major: prompt i, sample j at 2i + j
    assert texts == [choice.text for choice in again.choices]
    assert texts[0] != texts[1] and texts[2] != texts[3]
    # sample j of a prompt draws with seed + j: the same as asking for that one sample alone
    assert texts[1] == _one(client, model, PROMPTS[0], temperature=1.5, seed=8, max_tokens=8)


def test_best_of_returns_the_samples_with_the_highest_total_logprob(
    client: openai.OpenAI, model: str
) -> None:
    params = {"model": model, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 1.5, "seed": 3}
    every = client.completions.create(**params, n=4, logprobs=0)
    totals = [sum(choice.logprobs.token_logprobs) for choice in every.choices]
    ranked = sorted(range(4), key=lambda i: -totals[i])
    best = client.completions.create(**params, n=2, best_of=4)
    assert [c.text for c in best.choices] == [every.choices[i].text for i in ranked[:2]]
    assert all(c.logprobs is None for c in best.choices)  # not asked for
    assert [c.index for c in best.choices] == [0, 1]


def test_streamed_choices_carry_their_index_and_the_usage_of_all(client: openai.OpenAI, model: str) -> None:
    params = {"model": model, "prompt": PROMPTS[:2], "max_tokens": 5, "temperature": 1.0, "n": 2, "seed": 11}
    whole = client.completions.create(**params)
    chunks = list(client.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    texts = ["", "", "", ""]
    finished = []
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason is not None:
                finished.append(choice.index)
    assert texts == [choice.text for choice in whole.choices]
    assert sorted(finished) == [0, 1, 2, 3]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_n_gives_independent_choices(client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": "Tell me something"}]
    params = {"model": model, "messages": messages, "max_tokens": 6, "temperature": 1.5, "seed": 5}
    answer = client.chat.completions.create(**params, n=3, logprobs=True)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.message.content for c in answer.choices}) > 1
    assert answer.usage.completion_tokens == sum(len(c.logprobs.content) for c in answer.choices)
    streamed = ["", "", ""]
    for chunk in client.chat.completions.create(**params, n=3, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [c.message.content for c in answer.choices]


@pytest.mark.parametrize(
    ("params", "param", "words"),
    [
        ({"n": 3, "best_of": 2}, "best_of", "at least n"),
        ({"best_of": 2, "stream": True}, "best_of", "cannot be streamed"),
        ({"prompt": PROMPTS * (MAX_PROMPTS // 3 + 1)}, "prompt", "at most"),
        ({"prompt": ["a", "b"], "n": MAX_SAMPLES // 2 + 1}, "best_of", "at most"),
        ({"prompt": ["a", [1, 2]]}, "prompt", "not both"),
        ({"prompt": []}, "prompt", "at least one prompt"),
        ({"prompt": [[]]}, "prompt", ""),
    ],
    ids=[
        "best_of<n",
        "best_of streamed",
        "too many prompts",
        "too many samples",
        "mixed",
        "none",
        "empty ids",
    ],
)
def test_bad_prompt_lists_and_sample_counts_are_400(
    client: openai.OpenAI, model: str, params: dict, param: str, words: str
) -> None:
    call = {"model": model, "prompt": "hi", "max_tokens": 2, **params}
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(**call)
    assert raised.value.param == param and words in raised.value.body["message"]  # type: ignore[index]


def test_chat_template_kwargs_reach_the_template(
    client: openai.OpenAI, model: str, llama_base: BaseModel
) -> None:
    tokenizer = copy.deepcopy(llama_base.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}{{ mood | default('plain') }}"
    )
    base = SimpleNamespace(tokenizer=tokenizer, model_id="templated")
    assert render_chat(base, [_user("hi")]) == "hiplain"  # type: ignore[arg-type]
    assert render_chat(base, [_user("hi")], {"mood": "cheerful"}) == "hicheerful"  # type: ignore[arg-type]
    messages = [{"role": "user", "content": "hi"}]
    answer = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert answer.choices[0].finish_reason in ("length", "stop")
    for taken in ("tokenize", "messages", "add_generation_prompt", "not-a-name"):
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(
                model=model, messages=messages, max_tokens=2, extra_body={"chat_template_kwargs": {taken: 1}}
            )
        assert raised.value.param == "chat_template_kwargs"


def _user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)
