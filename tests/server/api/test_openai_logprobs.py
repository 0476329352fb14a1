"""Logprobs, echo, token-id prompts, sampling extras and structured output on the OpenAI routes, with the
official ``openai`` client against a live server; the numbers are PEFT's forward log-softmax."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from server.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from server.api.openai.translation import sampling_params
from server.engine.base_model import BaseModel
from server.engine.sampling import SamplingParams
from testing.peft_reference import make_peft_adapter, peft_greedy_tokens, peft_logprobs
from tests.server.api.live_server import live_server, openai_client

pytestmark = pytest.mark.e2e  # starts a server

TASK = "scored"
PROMPT = "Once upon a time there was a little model that wanted to learn"
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def adapter(llama_base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(llama_base.model.name_or_path, dtype="float32")
    return make_peft_adapter(model, tmp_path_factory.mktemp("peft") / "a", num_virtual_tokens=7, seed=9)


@pytest.fixture(scope="module")
def peft_model(llama_base: BaseModel, adapter: Path) -> PeftModel:
    model = AutoModelForCausalLM.from_pretrained(llama_base.model.name_or_path, dtype="float32").eval()
    return PeftModel.from_pretrained(model, adapter).eval()


@pytest.fixture(scope="module")
def client(
    demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, adapter: Path
) -> Iterator[openai.OpenAI]:
    with live_server(demo_model_dir, tmp_path_factory.mktemp("store")) as url:
        files = {
            "adapter_config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes()),
            "adapter_model": (
                "adapter_model.safetensors",
                (adapter / "adapter_model.safetensors").read_bytes(),
            ),
        }
        assert httpx.put(f"{url}/v1/admin/prefixes/{TASK}", files=files, timeout=60).status_code == 201
        yield openai_client(url, "unused")


def test_completion_logprobs_are_pefts(
    client: openai.OpenAI, llama_base: BaseModel, peft_model: PeftModel
) -> None:
    answer = client.completions.create(model=TASK, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    choice = answer.choices[0]
    prompt_ids = llama_base.tokenizer(PROMPT).input_ids
    ids = peft_greedy_tokens(peft_model, prompt_ids, 5)
    assert choice.logprobs.tokens == [llama_base.tokenizer.decode([token]) for token in ids]
    want = peft_logprobs(peft_model, prompt_ids + ids)
    for i, (token, logprob, top) in enumerate(
        zip(ids, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, strict=True)
    ):
        row = want[len(prompt_ids) + i - 1]
        assert logprob == pytest.approx(float(row[token]), abs=TOLERANCE)
        assert choice.logprobs.tokens[i] in top and len(top) <= 4  # itself and 3 more (strings may coincide)
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset[0] == 0


def test_echo_with_no_new_tokens_scores_a_token_id_prompt(
    client: openai.OpenAI, llama_base: BaseModel, peft_model: PeftModel
) -> None:
    """lm-eval's loglikelihood request: token ids, echo, max_tokens 0, logprobs 1."""
    prompt_ids = llama_base.tokenizer(PROMPT).input_ids
    answer = client.completions.create(model=TASK, prompt=prompt_ids, max_tokens=0, echo=True, logprobs=1)
    choice = answer.choices[0]
    assert choice.text == llama_base.tokenizer.decode(prompt_ids) and answer.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    want = peft_logprobs(peft_model, prompt_ids)
    expected = want[:-1].gather(1, torch.tensor(prompt_ids[1:])[:, None]).squeeze(1).tolist()
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=TOLERANCE)
    greedy = [int(want[j].argmax()) == prompt_ids[j + 1] for j in range(len(prompt_ids) - 1)]
    shown = [
        max(top, key=top.get) == token
        for top, token in zip(choice.logprobs.top_logprobs[1:], choice.logprobs.tokens[1:], strict=True)
    ]
    assert shown == greedy  # lm-eval's is_greedy reads the best of top_logprobs


def test_streamed_logprobs_cover_every_token(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=TASK, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0)
    chunks = list(
        client.completions.create(
            model=TASK, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0, stream=True
        )
    )
    streamed = [
        lp for chunk in chunks for c in chunk.choices if c.logprobs for lp in c.logprobs.token_logprobs
    ]
    assert streamed == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)


def test_chat_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=TASK,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob and c.logprob <= 0 for c in content)
    assert content[0].top_logprobs[0].token == content[0].token  # greedy: the best is the one picked


def test_json_schema_output_parses_and_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "digit": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "digit"],
        "additionalProperties": False,
    }
    answer = client.chat.completions.create(
        model=TASK,
        messages=[{"role": "user", "content": "Reply in JSON."}],
        max_tokens=40,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "reply", "schema": schema, "strict": True},
        },
    )
    document = json.loads(answer.choices[0].message.content)
    assert (
        set(document) == {"ok", "digit"} and isinstance(document["ok"], bool) and 0 <= document["digit"] <= 9
    )
    loose = client.chat.completions.create(
        model=TASK,
        messages=[{"role": "user", "content": "JSON"}],
        max_tokens=40,
        response_format={"type": "json_object"},
    )
    content, reason = loose.choices[0].message.content, loose.choices[0].finish_reason
    assert content.startswith("{") and (reason == "length" or isinstance(json.loads(content), dict))


def test_bad_structured_and_sampling_fields_are_400(client: openai.OpenAI, llama_base: BaseModel) -> None:
    deep: dict = {"type": "integer"}
    for _ in range(100):
        deep = {"type": "array", "items": deep}
    bad_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": deep}}
    cases = [
        ({"response_format": bad_format}, "response_format"),
        ({"extra_body": {"stop_token_ids": [llama_base.model.config.vocab_size]}}, None),
        ({"extra_body": {"min_tokens": 50}}, None),  # over max_tokens
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(
                model=TASK, messages=[{"role": "user", "content": "hi"}], max_tokens=5, **fields
            )
        if param is not None:
            assert raised.value.body["param"] == param


def test_sampling_extras_reach_the_engine(client: openai.OpenAI, llama_base: BaseModel) -> None:
    plain = client.completions.create(model=TASK, prompt=PROMPT, max_tokens=8, temperature=0)
    first = llama_base.tokenizer(plain.choices[0].text, add_special_tokens=False).input_ids[0]
    stopped = client.completions.create(
        model=TASK, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"stop_token_ids": [first]}
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    biased = client.completions.create(
        model=TASK, prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={"7": 100}
    )
    assert biased.choices[0].text == llama_base.tokenizer.decode([7, 7, 7])


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_penalties_become_the_rows_sampling_params(route: str) -> None:
    fields = {"model": "m", "presence_penalty": 0.5, "frequency_penalty": -1.0, "logit_bias": {"12": -3.5}}
    fields |= {"repetition_penalty": 1.3, "top_k": 4, "temperature": 0.7, "seed": 3}
    if route == "chat":
        body = ChatCompletionRequest.model_validate(
            {**fields, "messages": [{"role": "user", "content": "x"}]}
        )
    else:
        body = CompletionRequest.model_validate({**fields, "prompt": "x"})
    assert sampling_params(body) == SamplingParams(
        0.7,
        4,
        1.0,
        3,
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        repetition_penalty=1.3,
        logit_bias=((12, -3.5),),
    )
