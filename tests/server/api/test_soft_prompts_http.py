"""Soft-prompt tasks over real HTTP: PEFT PROMPT_TUNING and P_TUNING uploads serve PEFT's tokens, say
their kind, download as native soft prompts, and hot swap (to and from a prefix) and delete as prefixes do."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefix_store.formats.native import encode_native
from prefix_store.soft_prompt import SoftPrompt
from server.engine.base_model import BaseModel
from testing.peft_reference import make_peft_soft_prompt, peft_greedy_tokens
from tests.server.api.live_server import live_server
from tests.server.engine.helpers import random_prefix

pytestmark = pytest.mark.e2e  # starts a server process

PROMPT = "Once upon a time there was a little model"
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with (
        live_server(demo_model_dir, tmp_path_factory.mktemp("store")) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def _soft_prompt_adapter(demo_model_dir: Path, out: Path, method: str, tokens: int, seed: int) -> Path:
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype="float32")
    return make_peft_soft_prompt(model, out, num_virtual_tokens=tokens, method=method, seed=seed)


def _peft_files(adapter: Path) -> dict[str, tuple[str, bytes]]:
    return {
        "adapter_config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes()),
    }


def _peft_tokens(base: BaseModel, demo_model_dir: Path, adapter: Path) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype="float32").eval()
    reference = PeftModel.from_pretrained(model, adapter).eval()
    prompt_ids = base.tokenizer(PROMPT).input_ids
    return peft_greedy_tokens(reference, prompt_ids, NEW_TOKENS, eos_token_id=base.tokenizer.eos_token_id)


def _generate(client: httpx.Client, task_id: str) -> httpx.Response:
    return client.post(
        "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "task_id": task_id}
    )


@pytest.mark.parametrize(("method", "tokens"), [("PROMPT_TUNING", 4), ("P_TUNING", 7)])
def test_a_peft_soft_prompt_serves_pefts_tokens_and_downloads_as_a_native_soft_prompt(
    server: httpx.Client,
    llama_base: BaseModel,
    demo_model_dir: Path,
    tmp_path: Path,
    method: str,
    tokens: int,
) -> None:
    adapter = _soft_prompt_adapter(demo_model_dir, tmp_path / "adapter", method, tokens, seed=tokens)
    task = f"soft-{method.lower()}"
    uploaded = server.put(f"/v1/admin/prefixes/{task}", files=_peft_files(adapter))
    assert uploaded.status_code == 201
    body = uploaded.json()
    assert (body["kind"], body["source_format"], body["num_virtual_tokens"]) == (
        "soft_prompt",
        "peft",
        tokens,
    )

    expected = _peft_tokens(llama_base, demo_model_dir, adapter)
    answer = _generate(server, task).json()
    assert answer["token_ids"] == expected and answer["prefix_version"] == body["version"]
    assert answer["usage"]["prompt_tokens"] == len(
        llama_base.tokenizer(PROMPT).input_ids
    )  # virtual tokens aside

    listed = {p["task_id"]: p for p in server.get("/v1/admin/prefixes").json()["prefixes"]}
    assert (
        listed[task]["kind"] == "soft_prompt"
        and server.get(f"/v1/admin/prefixes/{task}").json()["kind"] == "soft_prompt"
    )
    downloaded = server.get(f"/v1/admin/prefixes/{task}/download").content
    copy = server.put(f"/v1/admin/prefixes/{task}-copy", files={"file": ("s.safetensors", downloaded)})
    assert copy.status_code == 201 and (copy.json()["kind"], copy.json()["source_format"]) == (
        "soft_prompt",
        "native",
    )
    assert _generate(server, f"{task}-copy").json()["token_ids"] == expected


def test_a_task_hot_swaps_between_a_prefix_and_a_soft_prompt_and_is_deleted(
    server: httpx.Client, llama_base: BaseModel, demo_model_dir: Path, tmp_path: Path
) -> None:
    geometry = llama_base.geometry
    prefix_blob = encode_native(random_prefix(llama_base, 5, seed=3), geometry)
    first = server.put("/v1/admin/prefixes/swapping", files={"file": ("p.safetensors", prefix_blob)}).json()
    as_prefix = _generate(server, "swapping").json()
    assert first["kind"] == "prefix" and as_prefix["prefix_version"] == first["version"]

    adapter = _soft_prompt_adapter(demo_model_dir, tmp_path / "soft", "PROMPT_TUNING", 6, seed=9)
    swapped = server.put("/v1/admin/prefixes/swapping", files=_peft_files(adapter))
    assert swapped.status_code == 200 and swapped.json()["kind"] == "soft_prompt"
    as_soft = _generate(server, "swapping").json()
    assert as_soft["prefix_version"] == swapped.json()["version"] != first["version"]
    assert as_soft["token_ids"] == _peft_tokens(llama_base, demo_model_dir, adapter) != as_prefix["token_ids"]

    narrow = replace(geometry, embedding_dim=geometry.embedding_dim // 2)  # a model of another width
    wrong_width = encode_native(SoftPrompt(torch.randn(2, narrow.embedding_dim)), narrow)
    refused = server.put("/v1/admin/prefixes/swapping", files={"file": ("s.safetensors", wrong_width)})
    assert refused.status_code == 400 and "embedding width" in refused.json()["error"]["message"]
    still = _generate(server, "swapping").json()
    assert (still["prefix_version"], still["token_ids"]) == (as_soft["prefix_version"], as_soft["token_ids"])

    back = server.put("/v1/admin/prefixes/swapping", files={"file": ("p.safetensors", prefix_blob)}).json()
    assert (
        back["kind"] == "prefix"
        and _generate(server, "swapping").json()["token_ids"] == as_prefix["token_ids"]
    )

    assert server.delete("/v1/admin/prefixes/swapping").status_code == 204
    assert _generate(server, "swapping").status_code == 404
