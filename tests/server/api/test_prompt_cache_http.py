"""Prompt caching over real HTTP (demo model, auth on, two tenants): what a request found cached is
reported (native ``usage.cached_tokens``; OpenAI ``usage.prompt_tokens_details.cached_tokens``, streamed
usage chunk included) and changes no token; a hot swap never finds the old version's blocks; the base
model never finds a task's, nor the reverse; another tenant with the same task name, prefix bytes and
prompt finds nothing; different ``cache_salt``s never share; the admin's view and reset see and drop only
the caller's tenant's blocks; the counters move."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from prefix_store.formats.native import encode_native
from server.engine.base_model import BaseModel
from server.engine.generation import generate
from server.engine.kv_pool import BLOCK_SIZE
from testing.server_process import metric
from tests.server.api.live_server import live_server, write_keys_file
from tests.server.engine.helpers import random_prefix, request

pytestmark = pytest.mark.e2e  # starts servers or other processes

KEYS = {"acme-admin": ("acme", "admin"), "acme-user": ("acme", "user"), "globex-admin": ("globex", "admin")}
PROMPT = " the" * 40  # 40 tokens: two full blocks can be found, the third holds the last token
# (" the", " a", " b", " of", " and", " to", " in": one token each in the demo tokenizer, however repeated)
CACHED = 2 * BLOCK_SIZE
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def server_url(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("prompt-cache")
    keys = write_keys_file(root / "keys.json", KEYS)
    with live_server(demo_model_dir, root / "store", env={"PREFIX_SERVE_API_KEYS": str(keys)}) as url:
        yield url


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def acme(server_url: str) -> Iterator[httpx.Client]:
    with client(server_url, "acme-admin") as http:
        yield http


@pytest.fixture(scope="module")
def globex(server_url: str) -> Iterator[httpx.Client]:
    with client(server_url, "globex-admin") as http:
        yield http


def upload(http: httpx.Client, task: str, base: BaseModel, seed: int) -> None:
    blob = encode_native(random_prefix(base, 4, seed=seed), base.geometry)
    answer = http.put(f"/v1/admin/prefixes/{task}", files={"file": ("p.safetensors", blob)})
    assert answer.status_code in (200, 201), answer.text


def native(http: httpx.Client, task: str | None = None, prompt: str = PROMPT, **body: object) -> dict:
    answer = http.post(
        "/v1/generate", json={"prompt": prompt, "task_id": task, "max_new_tokens": NEW_TOKENS, **body}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def engine_tokens(base: BaseModel, seed: int | None) -> list[int]:
    prefix = None if seed is None else random_prefix(base, 4, seed=seed)
    row = request(base, "r", PROMPT, prefix, max_new_tokens=NEW_TOKENS, ignore_eos=False)
    return generate(base, [row])[0].token_ids


def test_a_repeated_prompt_is_found_cached_and_generates_the_same(
    acme: httpx.Client, llama_base: BaseModel
) -> None:
    prompt = " a" * 40
    first, second = native(acme, prompt=prompt), native(acme, prompt=prompt)
    assert (first["usage"]["cached_tokens"], second["usage"]["cached_tokens"]) == (0, CACHED)
    assert first["token_ids"] == second["token_ids"]


def test_openai_reports_cached_tokens_in_its_usage_and_the_streamed_usage_chunk(
    acme: httpx.Client,
) -> None:
    model = acme.get("/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": " b" * 40, "max_tokens": 3, "temperature": 0}
    first = acme.post("/v1/completions", json=body).json()
    second = acme.post("/v1/completions", json=body).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": CACHED}
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with acme.stream("POST", "/v1/completions", json=streamed) as events:
        chunks = [json.loads(line[6:]) for line in events.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": CACHED}


def test_a_hot_swap_never_finds_the_old_versions_blocks(acme: httpx.Client, llama_base: BaseModel) -> None:
    upload(acme, "swap", llama_base, seed=1)
    native(acme, "swap")
    assert native(acme, "swap")["usage"]["cached_tokens"] == CACHED
    upload(acme, "swap", llama_base, seed=2)  # the same name, the same prompt, other numbers
    swapped = native(acme, "swap")
    assert swapped["usage"]["cached_tokens"] == 0
    assert swapped["token_ids"] == engine_tokens(llama_base, seed=2)


def test_the_base_model_and_a_task_never_find_each_others_blocks(
    acme: httpx.Client, llama_base: BaseModel
) -> None:
    upload(acme, "mine", llama_base, seed=3)
    prompt = " of" * 40
    native(acme, prompt=prompt)
    on_task = native(acme, "mine", prompt=prompt)
    assert on_task["usage"]["cached_tokens"] == 0
    prompt = " and" * 40
    native(acme, "mine", prompt=prompt)
    assert native(acme, prompt=prompt)["usage"]["cached_tokens"] == 0


def test_another_tenant_with_the_same_task_bytes_and_prompt_finds_nothing(
    acme: httpx.Client, globex: httpx.Client, llama_base: BaseModel
) -> None:
    upload(acme, "shared-name", llama_base, seed=4)
    upload(globex, "shared-name", llama_base, seed=4)  # the same bytes: the same sha256
    native(acme, "shared-name")
    assert native(acme, "shared-name")["usage"]["cached_tokens"] == CACHED
    theirs = native(globex, "shared-name")
    assert theirs["usage"]["cached_tokens"] == 0 and theirs["token_ids"] == engine_tokens(llama_base, seed=4)


def test_different_cache_salts_never_share(acme: httpx.Client) -> None:
    prompt = " to" * 40
    native(acme, prompt=prompt, cache_salt="alpha")
    assert native(acme, prompt=prompt, cache_salt="beta")["usage"]["cached_tokens"] == 0
    assert native(acme, prompt=prompt)["usage"]["cached_tokens"] == 0  # no salt is a salt of its own
    assert native(acme, prompt=prompt, cache_salt="alpha")["usage"]["cached_tokens"] == CACHED


def test_the_admins_view_and_reset_are_the_callers_tenants(
    server_url: str, acme: httpx.Client, globex: httpx.Client
) -> None:
    prompt = " in" * 40
    native(acme, prompt=prompt)
    native(globex, prompt=prompt)
    hits = metric(server_url, "prefix_serve_prompt_cache_hit_tokens_total")
    view = acme.get("/v1/admin/cache").json()
    assert view["prompt_cache"] is True and view["block_size"] == BLOCK_SIZE and view["blocks"] >= 2
    with client(server_url, "acme-user") as user:
        assert user.post("/v1/admin/cache/reset").status_code == 403
    reset = acme.post("/v1/admin/cache/reset")
    assert reset.status_code == 200 and reset.json()["dropped_blocks"] == view["blocks"]
    assert acme.get("/v1/admin/cache").json()["blocks"] == 0
    assert native(acme, prompt=prompt)["usage"]["cached_tokens"] == 0
    assert native(globex, prompt=prompt)["usage"]["cached_tokens"] == CACHED
    assert metric(server_url, "prefix_serve_prompt_cache_hit_tokens_total") - hits == CACHED
