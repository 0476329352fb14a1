"""LoRA tasks over real HTTP: a PEFT LORA upload serves PEFT's tokens beside prefix tasks, says its kind,
downloads as a native LoRA file that uploads again, hot swaps to and from a prefix (a replaced LoRA never
hits the prompt blocks cached under it), counts in the tenant's usage, and hostile LoRA uploads are 400s
that leave the old version serving."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from peft import PeftModel
from prefix_client import Client
from transformers import AutoModelForCausalLM

from prefix_store.formats.native import encode_native
from server.engine.base_model import BaseModel
from testing.peft_reference import make_peft_lora, peft_greedy_tokens
from tests.server.api.live_server import live_server
from tests.server.engine.helpers import random_prefix

pytestmark = pytest.mark.e2e  # starts a server process

PROMPT = "Once upon a time there was a little model that wanted to learn many tasks, one after another."
NEW_TOKENS = 8
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with (
        live_server(demo_model_dir, tmp_path_factory.mktemp("store")) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def _lora(demo_model_dir: Path, out: Path, seed: int, **options: object) -> Path:
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype="float32")
    return make_peft_lora(model, out, seed=seed, **{"target_modules": ATTENTION, "r": 8, **options})


def _files(adapter: Path, config: dict | None = None, model: bytes | None = None) -> dict:
    config_bytes = json.dumps(config).encode() if config else (adapter / "adapter_config.json").read_bytes()
    return {
        "adapter_config": ("adapter_config.json", config_bytes),
        "adapter_model": (
            "adapter_model.safetensors",
            model or (adapter / "adapter_model.safetensors").read_bytes(),
        ),
    }


def _peft_tokens(base: BaseModel, demo_model_dir: Path, adapter: Path) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype="float32").eval()
    reference = PeftModel.from_pretrained(model, adapter).eval()
    prompt_ids = base.tokenizer(PROMPT).input_ids
    return peft_greedy_tokens(reference, prompt_ids, NEW_TOKENS, eos_token_id=base.tokenizer.eos_token_id)


def _generate(client: httpx.Client, task_id: str) -> dict:
    answer = client.post(
        "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "task_id": task_id}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_peft_lora_serves_pefts_tokens_lists_as_lora_and_downloads_as_a_native_lora(
    server: httpx.Client, llama_base: BaseModel, demo_model_dir: Path, tmp_path: Path
) -> None:
    adapter = _lora(demo_model_dir, tmp_path / "lora", seed=3, use_rslora=True)
    uploaded = server.put("/v1/admin/prefixes/lora-task", files=_files(adapter))
    assert uploaded.status_code == 201, uploaded.text
    body = uploaded.json()
    assert (body["kind"], body["source_format"], body["num_virtual_tokens"]) == ("lora", "peft", 0)

    expected = _peft_tokens(llama_base, demo_model_dir, adapter)
    answer = _generate(server, "lora-task")
    assert answer["token_ids"] == expected and answer["prefix_version"] == body["version"]
    completion = server.post(  # the OpenAI route names the task as its model
        "/v1/completions",
        json={"model": "lora-task", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0},
    ).json()
    assert completion["choices"][0]["text"] == answer["text"]
    assert answer["usage"]["prompt_tokens"] == len(llama_base.tokenizer(PROMPT).input_ids)

    page = server.get("/v1/admin/prefixes").json()
    listed = {p["task_id"]: p for p in page["prefixes"]}
    assert listed["lora-task"]["kind"] == "lora" and page["usage"]["bytes"] >= body["bytes"]
    downloaded = server.get("/v1/admin/prefixes/lora-task/download").content
    assert len(downloaded) == body["bytes"]
    copy = server.put("/v1/admin/prefixes/lora-copy", files={"file": ("l.safetensors", downloaded)})
    assert copy.status_code == 201 and (copy.json()["kind"], copy.json()["source_format"]) == (
        "lora",
        "native",
    )
    assert copy.json()["sha256"] == body["sha256"]  # the same content: the same blob
    assert _generate(server, "lora-copy")["token_ids"] == expected

    with Client(str(server.base_url)) as client:  # the PEFT form, through the SDK: PEFT loads it as it is
        folder = client.download_prefix("lora-task", tmp_path / "back", peft=True)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert _peft_tokens(llama_base, demo_model_dir, folder) == expected
    again = server.put("/v1/admin/prefixes/lora-back", files=_files(folder))
    assert again.status_code == 201 and again.json()["sha256"] == body["sha256"]


def test_a_task_hot_swaps_between_a_prefix_and_a_lora_without_reusing_cached_blocks(
    server: httpx.Client, llama_base: BaseModel, demo_model_dir: Path, tmp_path: Path
) -> None:
    prefix_blob = encode_native(random_prefix(llama_base, 5, seed=3), llama_base.geometry)
    first = server.put("/v1/admin/prefixes/swap", files={"file": ("p.safetensors", prefix_blob)}).json()
    as_prefix = _generate(server, "swap")

    one = _lora(demo_model_dir, tmp_path / "one", seed=5)
    swapped = server.put("/v1/admin/prefixes/swap", files=_files(one))
    assert swapped.status_code == 200 and swapped.json()["kind"] == "lora"
    as_lora = _generate(server, "swap")
    assert as_lora["prefix_version"] == swapped.json()["version"] != first["version"]
    assert as_lora["token_ids"] == _peft_tokens(llama_base, demo_model_dir, one) != as_prefix["token_ids"]
    assert as_lora["usage"]["cached_tokens"] == 0
    again = _generate(server, "swap")
    assert again["token_ids"] == as_lora["token_ids"] and again["usage"]["cached_tokens"] > 0

    two = _lora(demo_model_dir, tmp_path / "two", seed=6)
    replaced = server.put("/v1/admin/prefixes/swap", files=_files(two)).json()
    as_two = _generate(server, "swap")
    assert as_two["prefix_version"] == replaced["version"] and as_two["usage"]["cached_tokens"] == 0
    assert as_two["token_ids"] == _peft_tokens(llama_base, demo_model_dir, two)

    back = server.put("/v1/admin/prefixes/swap", files={"file": ("p.safetensors", prefix_blob)}).json()
    assert back["kind"] == "prefix" and _generate(server, "swap")["token_ids"] == as_prefix["token_ids"]
    assert server.delete("/v1/admin/prefixes/swap").status_code == 204
    assert server.post("/v1/generate", json={"prompt": PROMPT, "task_id": "swap"}).status_code == 404


def test_hostile_lora_uploads_are_400s_and_the_old_version_keeps_serving(
    server: httpx.Client, demo_model_dir: Path, tmp_path: Path
) -> None:
    good = _lora(demo_model_dir, tmp_path / "good", seed=8)
    first = server.put("/v1/admin/prefixes/guarded", files=_files(good)).json()
    serving = _generate(server, "guarded")
    config = json.loads((good / "adapter_config.json").read_text())
    dora = _lora(demo_model_dir, tmp_path / "dora", seed=9, use_dora=True)
    wide = _lora(demo_model_dir, tmp_path / "wide", seed=10, r=65)
    cases = {
        "DoRA": (_files(dora), r"DoRA"),
        "modules_to_save": (_files(good, {**config, "modules_to_save": ["lm_head"]}), r"modules_to_save"),
        "bias": (_files(good, {**config, "bias": "all"}), r"biases are not served"),
        "lm_head": (_files(good, {**config, "target_modules": ["lm_head"]}), r"embedding and lm_head"),
        "rank over the limit": (_files(wide), r"from 1 to 64"),
        "shapes": (_files(good, {**config, "r": 4}), r"lora_A has shape \[8, 64\]; expected \[4, 64\]"),
    }
    for name, (files, match) in cases.items():
        refused = server.put("/v1/admin/prefixes/guarded", files=files)
        assert refused.status_code == 400, name
        error = refused.json()["error"]
        assert error["type"] == "invalid_prefix" and re.search(match, error["message"]), (name, error)
    still = _generate(server, "guarded")
    assert (still["prefix_version"], still["token_ids"]) == (first["version"], serving["token_ids"])
