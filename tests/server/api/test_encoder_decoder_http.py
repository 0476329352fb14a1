"""An encoder-decoder base model (a tiny random T5) behind a real server: a PEFT SEQ_2_SEQ_LM upload serves
PEFT's tokens over the native and the OpenAI API (the prompt is the encoder's source), a hot swap to a
second version serves its own, a soft prompt is refused and the old version keeps serving, and chat on a
model without a chat template is a clear 400."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM

from server.demo_model import build_demo_tokenizer
from testing.peft_reference import make_peft_adapter, make_peft_soft_prompt, peft_seq2seq_greedy_tokens
from tests.server.api.live_server import live_server, openai_client
from tests.server.engine.test_encoder_decoder import FAMILIES

pytestmark = pytest.mark.e2e  # starts a server process

PROMPT = "Once upon a time there was a little model"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_demo_tokenizer()
    tokenizer.chat_template = None  # a plain text-to-text model
    out = tmp_path_factory.mktemp("t5") / "t5-tiny"
    AutoModelForSeq2SeqLM.from_config(FAMILIES["t5"](len(tokenizer), tokenizer.eos_token_id)).save_pretrained(
        out
    )
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(t5_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, httpx.Client]]:
    with (
        live_server(t5_dir, tmp_path_factory.mktemp("store")) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield url, client


def _upload(client: httpx.Client, task: str, adapter: Path) -> httpx.Response:
    files = {
        name: (f"{name}{suffix}", (adapter / f"{name}{suffix}").read_bytes())
        for name, suffix in (("adapter_config", ".json"), ("adapter_model", ".safetensors"))
    }
    return client.put(f"/v1/admin/prefixes/{task}", files=files)


def _peft_tokens(t5_dir: Path, adapter: Path) -> list[int]:
    tokenizer = build_demo_tokenizer()
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(t5_dir, dtype="float32"), adapter)
    source = tokenizer(PROMPT).input_ids
    return peft_seq2seq_greedy_tokens(model.eval(), source, NEW_TOKENS, eos_token_id=tokenizer.eos_token_id)


def test_a_peft_seq2seq_prefix_serves_pefts_tokens_and_hot_swaps(
    server: tuple[str, httpx.Client], t5_dir: Path, tmp_path: Path
) -> None:
    url, client = server
    first = make_peft_adapter(
        AutoModelForSeq2SeqLM.from_pretrained(t5_dir), tmp_path / "a", num_virtual_tokens=5, seed=1
    )
    uploaded = _upload(client, "summarize", first)
    assert uploaded.status_code == 201 and uploaded.json()["num_virtual_tokens"] == 5
    expected = _peft_tokens(t5_dir, first)
    answer = client.post(
        "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "task_id": "summarize"}
    )
    body = answer.json()
    assert body["token_ids"] == expected
    assert body["usage"]["prompt_tokens"] == len(build_demo_tokenizer()(PROMPT).input_ids)  # the source's

    completion = openai_client(url, "unused").completions.create(
        model="summarize", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0
    )
    assert completion.choices[0].text == body["text"]

    second = make_peft_adapter(
        AutoModelForSeq2SeqLM.from_pretrained(t5_dir),
        tmp_path / "b",
        num_virtual_tokens=3,
        prefix_projection=True,
        seed=2,
    )
    swapped = _upload(client, "summarize", second)
    assert swapped.status_code == 200 and swapped.json()["version"] != uploaded.json()["version"]
    again = client.post(
        "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "task_id": "summarize"}
    )
    assert again.json()["token_ids"] == _peft_tokens(t5_dir, second)

    soft = make_peft_soft_prompt(
        AutoModelForSeq2SeqLM.from_pretrained(t5_dir), tmp_path / "soft", num_virtual_tokens=3
    )
    refused = _upload(client, "summarize", soft)
    assert (
        refused.status_code == 400
        and "soft prompts are served on decoder-only" in refused.json()["error"]["message"]
    )
    still = client.post(
        "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "task_id": "summarize"}
    )
    assert still.json()["prefix_version"] == swapped.json()["version"]


def test_chat_on_a_model_without_a_chat_template_is_a_clear_400(server: tuple[str, httpx.Client]) -> None:
    url, _ = server
    with pytest.raises(openai.BadRequestError, match="has no chat template: use /v1/completions"):
        openai_client(url, "unused").chat.completions.create(
            model="t5-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
