"""vLLM's tokenizer routes (``/tokenizer_info``, ``/tokenize``, ``/detokenize``) over real HTTP with the real
engine on the demo model: the ids are the model tokenizer's, messages get the chat template as
``/v1/chat/completions`` gives it, auth and ``model`` as on the generate routes, and the requests lm-eval's
remote tokenizer sends (no ``model``, ``add_special_tokens: false``) get what it reads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from prefix_store.formats.native import encode_native
from prefix_store.storage.excerpt import excerpt_int
from server.api.auth import Role, create_key
from server.api.openai.protocol import MAX_PROMPT_CHARS
from server.demo_model import DEMO_CHAT_TEMPLATE
from server.engine.base_model import BaseModel
from tests.server.api.live_server import live_server
from tests.server.engine.helpers import random_prefix

pytestmark = pytest.mark.e2e  # starts a server

MAX_PROMPT_TOKENS, MAX_NEW_TOKENS = 1000, 24  # max_model_len: 1024, under the demo model's 2048 positions
TEXT = "The quick brown fox jumps over the lazy dog. Prefix tuning keeps the model frozen!"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Summarize the following text in one sentence."},
]


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys") / "keys.json"


@pytest.fixture(scope="module")
def keys(keys_file: Path) -> dict[str, str]:
    """``tenant-role`` -> a key of that tenant and role, in ``keys_file``."""
    return {
        f"{tenant}-{role}": create_key(keys_file, tenant, Role(role))
        for tenant in ("acme", "globex")
        for role in ("admin", "user")
    }


@pytest.fixture(scope="module")
def server(
    demo_model_dir: Path, keys_file: Path, keys: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    env = {
        "PREFIX_SERVE_API_KEYS": str(keys_file),
        "PREFIX_SERVE_MAX_PROMPT_TOKENS": str(MAX_PROMPT_TOKENS),
        "PREFIX_SERVE_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
    }
    with live_server(demo_model_dir, tmp_path_factory.mktemp("store"), env=env) as url:
        yield url


def _client(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def acme(server: str, keys: dict[str, str]) -> Iterator[httpx.Client]:
    """acme's user key: tokenizing needs no admin role."""
    with _client(server, keys["acme-user"]) as client:
        yield client


@pytest.fixture(scope="module")
def base_id(acme: httpx.Client) -> str:
    return acme.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def globex_task(server: str, keys: dict[str, str], llama_base: BaseModel) -> str:
    """A task of the other tenant: acme must not be able to name it."""
    blob = encode_native(random_prefix(llama_base, 4, seed=5), llama_base.geometry)
    with _client(server, keys["globex-admin"]) as admin:
        upload = admin.put("/v1/admin/prefixes/theirs", files={"file": ("p.safetensors", blob)})
    assert upload.status_code == 201, upload.text
    return "theirs"


def _error(response: httpx.Response, status: int, error_type: str) -> str:
    """The message of an API error body with ``status`` and ``error_type``."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type and isinstance(error["message"], str)
    return error["message"]


def test_tokenizer_info_is_the_models_tokenizer(acme: httpx.Client, llama_base: BaseModel) -> None:
    response = acme.get("/tokenizer_info")
    assert response.status_code == 200, response.text
    info = response.json()
    tokenizer = llama_base.tokenizer
    assert info == {
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": None,
        "chat_template": DEMO_CHAT_TEMPLATE,
    }


def test_a_prompt_is_the_tokenizers_ids_with_vllms_special_tokens_default(
    acme: httpx.Client, llama_base: BaseModel
) -> None:
    tokenizer = llama_base.tokenizer
    for extra, special in (
        ({}, True),
        ({"add_special_tokens": True}, True),
        ({"add_special_tokens": False}, False),
    ):
        response = acme.post("/tokenize", json={"prompt": TEXT, **extra})
        assert response.status_code == 200, response.text
        expected = tokenizer(TEXT, add_special_tokens=special).input_ids
        assert response.json() == {
            "tokens": expected,
            "count": len(expected),
            "max_model_len": MAX_PROMPT_TOKENS + MAX_NEW_TOKENS,
            "token_strs": None,
        }
    strs = acme.post("/tokenize", json={"prompt": TEXT, "return_token_strs": True}).json()["token_strs"]
    assert strs == tokenizer.convert_ids_to_tokens(tokenizer(TEXT).input_ids)
    assert acme.post("/tokenize", json={"prompt": ""}).json()["tokens"] == tokenizer("").input_ids


def test_messages_get_the_chat_template_as_chat_completions_does(
    acme: httpx.Client, llama_base: BaseModel, base_id: str
) -> None:
    tokenizer = llama_base.tokenizer
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>")
    expected = tokenizer(rendered, add_special_tokens=False).input_ids
    answer = acme.post("/tokenize", json={"model": base_id, "messages": MESSAGES}).json()
    assert answer["tokens"] == expected and answer["count"] == len(expected)
    with_special = acme.post("/tokenize", json={"messages": MESSAGES, "add_special_tokens": True}).json()
    assert with_special["tokens"] == tokenizer(rendered, add_special_tokens=True).input_ids

    chat = acme.post("/v1/chat/completions", json={"model": base_id, "messages": MESSAGES, "max_tokens": 1})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] == answer["count"]


def test_detokenize_round_trips_and_is_the_tokenizers_decode(
    acme: httpx.Client, llama_base: BaseModel
) -> None:
    tokens = acme.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False}).json()["tokens"]
    response = acme.post("/detokenize", json={"tokens": tokens})
    assert response.status_code == 200, response.text
    assert response.json() == {"prompt": TEXT}
    some = [0, 5, 300, llama_base.tokenizer.eos_token_id, 511]
    assert acme.post("/detokenize", json={"tokens": some}).json() == {
        "prompt": llama_base.tokenizer.decode(some)
    }
    assert acme.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_lm_evals_remote_tokenizer_requests(acme: httpx.Client, llama_base: BaseModel) -> None:
    """What lm-eval 0.4.13's ``RemoteTokenizer`` sends and reads: ``eos_token`` in the info, the EOS id as
    the first id of its text encoded without special tokens, ``tokens`` and ``prompt`` back."""
    info = acme.get("/tokenizer_info").json()
    assert "eos_token" in info and isinstance(info["chat_template"], str)
    eos = acme.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos.json()["tokens"][0] == llama_base.tokenizer.eos_token_id
    probe = acme.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()
    assert isinstance(probe["tokens"], list) and probe["tokens"]
    decoded = acme.post("/detokenize", json={"tokens": probe["tokens"]}).json()["prompt"]
    assert decoded == "test"


def test_model_is_the_base_or_a_task_of_the_caller(
    server: str,
    keys: dict[str, str],
    acme: httpx.Client,
    base_id: str,
    globex_task: str,
    llama_base: BaseModel,
) -> None:
    blob = encode_native(random_prefix(llama_base, 4, seed=6), llama_base.geometry)
    with _client(server, keys["acme-admin"]) as admin:
        assert (
            admin.put("/v1/admin/prefixes/ours", files={"file": ("p.safetensors", blob)}).status_code == 201
        )
    plain = acme.post("/tokenize", json={"prompt": TEXT}).json()
    for model in (base_id, "ours"):  # the task changes nothing: the tokenizer is the base model's
        assert acme.post("/tokenize", json={"model": model, "prompt": TEXT}).json() == plain
        assert acme.post("/detokenize", json={"model": model, "tokens": plain["tokens"]}).status_code == 200
    for model in (globex_task, "missing", "team/summarize", ".hidden"):
        for path, body in (("/tokenize", {"prompt": TEXT}), ("/detokenize", {"tokens": [1]})):
            response = acme.post(path, json={"model": model, **body})
            assert model in _error(response, 404, "not_found"), (path, model)


def test_every_route_needs_a_valid_key(server: str, keys: dict[str, str]) -> None:
    calls = (
        ("GET", "/tokenizer_info", None),
        ("POST", "/tokenize", {"prompt": TEXT}),
        ("POST", "/detokenize", {"tokens": [1]}),
    )
    for key in (None, "ps-not-a-real-key"):
        with _client(server, key) as client:
            for method, path, body in calls:
                response = client.request(method, path, json=body)
                _error(response, 401, "authentication_error")
                assert response.headers["www-authenticate"] == "Bearer"
    with _client(server, keys["globex-user"]) as client:
        assert all(client.request(m, p, json=b).status_code == 200 for m, p, b in calls)


def test_ids_outside_the_vocabulary_are_a_400(acme: httpx.Client, llama_base: BaseModel) -> None:
    size = len(llama_base.tokenizer)
    for outside in (size, 2**63 - 1, 10**30):
        message = _error(acme.post("/detokenize", json={"tokens": [1, outside]}), 400, "invalid_request")
        assert (
            excerpt_int(outside) in message and str(size - 1) in message
        )  # a long id, cut: 1000…(31 digits)
    _error(acme.post("/detokenize", json={"tokens": [-1]}), 422, "validation_error")


def test_bad_and_over_long_bodies_are_4xx_with_the_error_body(acme: httpx.Client) -> None:
    over = "a" * (MAX_PROMPT_CHARS + 1)
    refused = [
        {"prompt": over},
        {"messages": [{"role": "user", "content": "a" * (MAX_PROMPT_CHARS // 2 + 1)}] * 2},
        {"messages": [{"role": "user", "content": "hi"}] * 1025},
        {"prompt": TEXT, "messages": MESSAGES},
        {},
        {"prompt": None},
        {"messages": []},
        {"prompt": TEXT, "temperature": 0},  # unknown field
        {"prompt": 5},
        {"prompt": TEXT, "add_special_tokens": 1},
    ]
    for body in refused:
        _error(acme.post("/tokenize", json=body), 422, "validation_error")
    for body in (
        {"tokens": [0] * (MAX_PROMPT_CHARS + 1)},
        {"tokens": ["1"]},
        {"tokens": [1.5]},
        {},
        {"tokens": [1], "x": 1},
    ):
        _error(acme.post("/detokenize", json=body), 422, "validation_error")
    assert (
        acme.post("/detokenize", json={"tokens": [5.0]}).status_code == 200
    )  # JSON's 5.0 is 5, as elsewhere
    message = _error(
        acme.post("/tokenize", json={"prompt": TEXT, "messages": MESSAGES}), 422, "validation_error"
    )
    assert "exactly one of prompt" in message
    _error(
        acme.post("/tokenize", content=b"{not json", headers={"content-type": "application/json"}),
        422,
        "validation_error",
    )


def test_a_prompt_longer_than_the_model_still_tokenizes_with_its_count(acme: httpx.Client) -> None:
    """As in vLLM, ``count`` against ``max_model_len`` tells the client to truncate (lm-eval encodes whole
    documents, then left-truncates them): the route does not refuse it."""
    long_text = " ".join(["fox"] * 3000)
    answer = acme.post("/tokenize", json={"prompt": long_text}).json()
    assert answer["count"] == len(answer["tokens"]) > answer["max_model_len"] > MAX_PROMPT_TOKENS


def test_max_model_len_is_the_context_when_the_server_sets_no_new_token_cap() -> None:
    from types import SimpleNamespace

    from server.api.routes.tokenizer import max_model_len

    def state(max_new_tokens: int | None, positions: int | None) -> SimpleNamespace:
        settings = SimpleNamespace(
            max_new_tokens=max_new_tokens, max_prompt_tokens=2048, max_batch_tokens=32768
        )
        return SimpleNamespace(settings=settings, base=SimpleNamespace(max_positions=positions))

    assert max_model_len(state(None, 8192)) == 8192  # the default settings
    assert max_model_len(state(24, 8192)) == 2048 + 24
    assert max_model_len(state(None, None)) == 32768
