"""The OpenAI-compatible endpoints over real HTTP, driven by the official ``openai`` client: a server
process with API keys (two tenants), the demo model and a filesystem store. What they return is
checked against the native ``/v1/generate`` for the same prompt and parameters."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from prefix_store.formats.native import encode_native
from server.api.errors import ApiError
from server.api.openai.protocol import ChatMessage
from server.api.openai.translation import render_chat
from server.engine.base_model import BaseModel
from testing.waiting import wait_until
from tests.server.api.live_server import live_server, openai_client, write_keys_file
from tests.server.engine.helpers import random_prefix

pytestmark = pytest.mark.e2e  # starts servers or other processes

PROMPT = "Once upon a time there was a little model"
MESSAGES = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Summarize the following text in one sentence."},
]
TASK = "summarize"
KEYS = {  # key -> (tenant, role), written to the keys file as SHA-256 hashes only
    "acme-admin-key": ("acme", "admin"),
    "acme-user-key": ("acme", "user"),
    "globex-user-key": ("globex", "user"),
}
OPENAI_FINISH = {"length": "length", "stop": "stop", "eos": "stop"}


@pytest.fixture(scope="module")
def server_url(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """No --max-new-tokens: requests may ask for what the model's context leaves."""
    root = tmp_path_factory.mktemp("openai")
    env = {"PREFIX_SERVE_API_KEYS": str(write_keys_file(root / "keys.json", KEYS))}
    with live_server(demo_model_dir, root / "store", env=env) as url:
        yield url


@pytest.fixture(scope="module")
def admin(server_url: str) -> Iterator[httpx.Client]:
    """Native API, acme's admin key."""
    headers = {"Authorization": "Bearer acme-admin-key"}
    with httpx.Client(base_url=server_url, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def acme(server_url: str) -> openai.OpenAI:
    return openai_client(server_url, "acme-user-key")


@pytest.fixture(scope="module")
def globex(server_url: str) -> openai.OpenAI:
    return openai_client(server_url, "globex-user-key")


@pytest.fixture(scope="module")
def task(admin: httpx.Client, llama_base: BaseModel) -> str:
    blob = encode_native(random_prefix(llama_base, 6, seed=41), llama_base.geometry)
    uploaded = admin.put(f"/v1/admin/prefixes/{TASK}", files={"file": ("p.safetensors", blob)})
    assert uploaded.status_code == 201, uploaded.text
    return TASK


@pytest.fixture(scope="module")
def base_id(llama_base: BaseModel) -> str:
    return llama_base.model_id  # the server loads the same folder


def _native(admin: httpx.Client, prompt: str, task_id: str | None, **params: object) -> dict:
    body = {"prompt": prompt, "task_id": task_id, "max_new_tokens": 8, "temperature": 0.0, **params}
    answer = admin.post("/v1/generate", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _model(name: str, task: str, base_id: str) -> str:
    return task if name == "task" else base_id


def test_models_list_shows_the_base_model_and_only_the_callers_tasks(
    acme: openai.OpenAI, globex: openai.OpenAI, task: str, base_id: str
) -> None:
    models = acme.models.list().data
    assert [m.id for m in models] == [base_id, task]
    assert {m.object for m in models} == {"model"}
    assert acme.models.retrieve(task).id == task
    assert [m.id for m in globex.models.list().data] == [base_id]  # acme's task stays acme's
    with pytest.raises(openai.NotFoundError):
        globex.models.retrieve(task)


@pytest.mark.parametrize("model", ["task", "base"])
def test_completion_equals_native_generate(
    acme: openai.OpenAI, admin: httpx.Client, task: str, base_id: str, model: str
) -> None:
    task_id = task if model == "task" else None
    native = _native(admin, PROMPT, task_id)
    completion = acme.completions.create(
        model=_model(model, task, base_id), prompt=PROMPT, max_tokens=8, temperature=0
    )
    choice = completion.choices[0]
    assert choice.text == native["text"]
    assert choice.finish_reason == OPENAI_FINISH[native["finish_reason"]]
    assert completion.model == _model(model, task, base_id)
    assert completion.system_fingerprint == native["prefix_version"]  # None for the base model
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        native["usage"]["prompt_tokens"],
        native["usage"]["completion_tokens"],
    )
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_the_prefix_changes_the_completion(acme: openai.OpenAI, task: str, base_id: str) -> None:
    texts = {
        model: acme.completions.create(model=model, prompt=[PROMPT], max_tokens=8, temperature=0)
        .choices[0]
        .text
        for model in (task, base_id)
    }
    assert texts[task] != texts[base_id]


def test_streamed_completion_equals_the_whole_one(acme: openai.OpenAI, task: str) -> None:
    whole = acme.completions.create(model=task, prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(
        acme.completions.create(
            model=task,
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_chunks_are_ascii_lines_whatever_the_text(
    acme: openai.OpenAI, server_url: str, base_id: str, route: str
) -> None:
    """Non-ASCII text arrives escaped: one line per chunk for any line-splitting client, same text."""
    chat = route == "/v1/chat/completions"
    body = {"model": base_id, "max_tokens": 24, "temperature": 1.5}
    body |= {"messages": MESSAGES} if chat else {"prompt": PROMPT}
    create = acme.chat.completions.create if chat else acme.completions.create
    seed, whole = next(
        (seed, text) for seed in range(50) if not (text := _text(create(**body, seed=seed), chat)).isascii()
    )
    headers = {"Authorization": "Bearer acme-user-key"}
    with httpx.stream(
        "POST", f"{server_url}{route}", json={**body, "seed": seed, "stream": True}, headers=headers
    ) as response:
        raw = response.read()
    assert raw.isascii()
    events = [line.removeprefix("data: ") for line in raw.decode().splitlines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event)["choices"][0] for event in events[:-1]]
    assert "".join(c["delta"].get("content", "") if chat else c["text"] for c in chunks) == whole


def _text(answer: object, chat: bool) -> str:
    choice = answer.choices[0]  # type: ignore[attr-defined]
    return choice.message.content if chat else choice.text


@pytest.mark.parametrize("model", ["task", "base"])
def test_chat_equals_native_generate_on_the_chat_template(
    acme: openai.OpenAI, admin: httpx.Client, llama_base: BaseModel, task: str, base_id: str, model: str
) -> None:
    prompt = llama_base.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    native = _native(admin, prompt, task if model == "task" else None)
    chat = acme.chat.completions.create(
        model=_model(model, task, base_id), messages=MESSAGES, max_tokens=8, temperature=0
    )
    choice = chat.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", native["text"])
    assert choice.finish_reason == OPENAI_FINISH[native["finish_reason"]]
    assert chat.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    assert chat.usage.completion_tokens == native["usage"]["completion_tokens"]


def test_streamed_chat_equals_the_whole_one(acme: openai.OpenAI, task: str) -> None:
    params = {"model": task, "messages": MESSAGES, "max_completion_tokens": 8, "temperature": 0}
    whole = acme.chat.completions.create(**params)
    chunks = list(acme.chat.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert "".join(d.delta.content or "" for d in deltas) == whole.choices[0].message.content
    assert deltas[-1].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stop_sequences_and_seeded_sampling_match_native(
    acme: openai.OpenAI, admin: httpx.Client, task: str
) -> None:
    text = _native(admin, PROMPT, task, max_new_tokens=12)["text"]
    stop = text[4:7]
    native = _native(admin, PROMPT, task, max_new_tokens=12, stop=[stop])
    assert native["finish_reason"] == "stop"
    stopped = acme.completions.create(model=task, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop)
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (native["text"], "stop")

    sampling = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
    native = _native(admin, PROMPT, task, max_new_tokens=10, **sampling)
    sampled = acme.completions.create(model=task, prompt=PROMPT, max_tokens=10, **sampling)
    assert sampled.choices[0].text == native["text"]


def test_unknown_or_foreign_model_is_not_found(acme: openai.OpenAI, globex: openai.OpenAI, task: str) -> None:
    calls = [
        lambda: acme.completions.create(model="never-uploaded", prompt=PROMPT, max_tokens=2),
        lambda: acme.chat.completions.create(model="org/not-a-task", messages=MESSAGES, max_tokens=2),
        lambda: globex.completions.create(model=task, prompt=PROMPT, max_tokens=2),  # acme's task
        lambda: globex.chat.completions.create(model=task, messages=MESSAGES, max_tokens=2, stream=True),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as raised:
            call()
        error = raised.value
        assert (error.type, error.code, error.param) == ("invalid_request_error", "model_not_found", "model")
        assert "does not exist" in error.message


def test_a_missing_or_wrong_key_is_refused(server_url: str, base_id: str) -> None:
    wrong = openai_client(server_url, "not-a-key")
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=base_id, prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    missing = httpx.post(f"{server_url}/v1/chat/completions", json={"model": base_id, "messages": MESSAGES})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json() == {
        "error": {
            "message": "a valid API key is required",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"suffix": "end"}, "suffix", "unsupported_parameter"),
        ({"prompt": [1, -2, 3]}, "prompt", "invalid_type"),  # neither a text nor token ids
        ({"logprobs": 21}, "logprobs", "invalid_value"),
        ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias", "invalid_value"),
        ({"temperature": 2.5}, "temperature", "invalid_value"),
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"max_tokens": -1}, "max_tokens", "invalid_value"),
        ({"stop": ["x" * 500]}, "stop", "invalid_value"),
        ({"model": None}, "model", "invalid_type"),
        ({"extra_body": {"not_an_openai_field": 1}}, "not_an_openai_field", "unknown_parameter"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty", "invalid_value"),
        ({"extra_body": {"stream_options": {"x": 1}}}, "stream_options.x", "unknown_parameter"),
    ],
    ids=lambda value: str(value)[:40] if isinstance(value, dict) else None,
)
def test_bad_completion_params_are_a_bad_request_naming_the_field(
    acme: openai.OpenAI, base_id: str, params: dict, param: str, code: str
) -> None:
    call = {"model": base_id, "prompt": PROMPT, "max_tokens": 4, **params}
    with pytest.raises(openai.BadRequestError) as raised:
        acme.completions.create(**call)
    error = raised.value
    assert (error.status_code, error.type, error.param, error.code) == (
        400,
        "invalid_request_error",
        param,
        code,
    )
    assert param in error.body["message"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"messages": []}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content",
        ),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages.0.role"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    ],
    ids=[
        "no-messages",
        "image",
        "no-content",
        "tool-role",
        "tools",
        "json-without-schema",
        "logprobs",
        "two-max",
    ],
)
def test_bad_chat_params_are_a_bad_request_naming_the_field(
    acme: openai.OpenAI, base_id: str, params: dict, param: str
) -> None:
    call = {"model": base_id, "messages": MESSAGES, "max_tokens": 4, **params}
    with pytest.raises(openai.BadRequestError) as raised:
        acme.chat.completions.create(**call)
    assert (raised.value.type, raised.value.param) == ("invalid_request_error", param)


def test_harmless_openai_fields_are_accepted(acme: openai.OpenAI, base_id: str) -> None:
    chat = acme.chat.completions.create(
        model=base_id,
        messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, *MESSAGES[1:]],
        max_tokens=3,
        temperature=0,
        n=1,
        user="someone",
        store=False,
        metadata={"purpose": "test"},
        stream_options=None,
        frequency_penalty=0,
        response_format={"type": "text"},
    )
    assert chat.usage.completion_tokens <= 3


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_client_that_leaves_a_stream_aborts_its_request(server_url: str, base_id: str) -> None:
    aborted = ("prefix_serve_generation_finished_total", (("reason", "aborted"),))
    before = _scrape(server_url).get(aborted, 0.0)
    body = {"model": base_id, "prompt": PROMPT, "max_tokens": 500, "temperature": 0, "stream": True}
    headers = {"Authorization": "Bearer acme-user-key"}
    with httpx.stream("POST", f"{server_url}/v1/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: "))  # one chunk, then hang up
    wait_until(  # 500 tokens would end as "length": "aborted" says the engine stopped for the client
        lambda: _scrape(server_url).get(aborted, 0.0) >= before + 1, "the request the client left is aborted"
    )
    assert _scrape(server_url)[("prefix_serve_running_requests", ())] == 0


def test_a_model_without_a_chat_template_is_refused(llama_base: BaseModel, demo_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    tokenizer.chat_template = None
    no_template = dataclasses.replace(llama_base, tokenizer=tokenizer)
    with pytest.raises(ApiError) as raised:
        render_chat(no_template, [ChatMessage(role="user", content="hi")])
    assert raised.value.status == 400 and "no chat template" in raised.value.message
