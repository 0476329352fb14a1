"""What is trained is what is served: the exported PEFT adapter under PEFT's forward loop, the native prefix
in the engine, and the prefix pushed to a real server all give the same greedy tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.source import load_prefix_source
from server.cli import main
from server.engine.base_model import BaseModel
from server.engine.generation import generate
from server.training.errors import PushError
from server.training.push import _push_with_httpx, push_prefix
from testing.peft_reference import peft_greedy_tokens
from tests.server.api.live_server import free_port, live_server
from tests.server.engine.helpers import request
from tests.server.training.helpers import PROMPTS, fixed_answer_data, train

NEW_TOKENS = 12
ANSWER = " OK: done."
HELD_OUT = "our team seems happy"  # not a training prompt


def _engine_tokens(base: BaseModel, native: Path, prompt: str) -> list[int]:
    prefix, _ = load_prefix_source(native, base.geometry, PrefixLimits())
    return generate(base, [request(base, "r", prompt, prefix, max_new_tokens=NEW_TOKENS)])[0].token_ids


@pytest.mark.parametrize(
    ("architecture", "projection"),
    [("llama", False), ("llama", True), ("gpt2", False)],
    ids=["llama", "llama-projection", "gpt2"],
)
def test_peft_loads_the_export_and_agrees_with_the_engine(
    request: pytest.FixtureRequest, tmp_path: Path, architecture: str, projection: bool
) -> None:
    base: BaseModel = request.getfixturevalue(f"{architecture}_base")
    data = fixed_answer_data(tmp_path / "data.jsonl", ANSWER)
    result = train(base, data, tmp_path / "out", epochs=2, prefix_projection=projection, projection_hidden=32)
    model = AutoModelForCausalLM.from_pretrained(base.model.name_or_path, dtype="float32").eval()
    peft_model = PeftModel.from_pretrained(model, result.peft_dir).eval()
    assert peft_model.peft_config["default"].num_virtual_tokens == 4
    for prompt in (PROMPTS[0], HELD_OUT):
        prompt_ids = base.tokenizer(prompt).input_ids
        assert peft_greedy_tokens(peft_model, prompt_ids, NEW_TOKENS) == _engine_tokens(
            base, result.native_path, prompt
        )


@pytest.fixture(scope="module")
def server_url(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with live_server(demo_model_dir, tmp_path_factory.mktemp("store")) as url:
        yield url


@pytest.mark.e2e
def test_train_push_generate_through_a_real_server(
    server_url: str, demo_model_dir: Path, llama_base: BaseModel, tmp_path: Path, capsys
) -> None:
    data = fixed_answer_data(tmp_path / "data.jsonl", ANSWER)
    out = tmp_path / "out"
    command = [
        "train",
        "--model",
        str(demo_model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-progress",
    ]
    command += [
        "--num-virtual-tokens",
        "8",
        "--epochs",
        "20",
        "--lr",
        "0.3",
        "--push",
        "fixed",
        "--server",
        server_url,
    ]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "epoch 20/20  train loss" in printed and "pushed task fixed" in printed
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype="float32").eval()
    peft_model = PeftModel.from_pretrained(model, out / "peft").eval()
    for prompt in (PROMPTS[0], HELD_OUT):
        body = {"task_id": "fixed", "prompt": prompt, "max_new_tokens": NEW_TOKENS, "temperature": 0.0}
        answer = httpx.post(f"{server_url}/v1/generate", json=body, timeout=30).json()
        peft_tokens = peft_greedy_tokens(peft_model, llama_base.tokenizer(prompt).input_ids, NEW_TOKENS)
        engine_tokens = _engine_tokens(llama_base, out / "prefix.safetensors", prompt)
        served = answer["token_ids"]  # up to and with the EOS it stops at; the reference runs go on past it
        assert served == engine_tokens[: len(served)] == peft_tokens[: len(served)]
        assert answer["finish_reason"] == "eos" and served[-1] == llama_base.tokenizer.eos_token_id
        if prompt == PROMPTS[0]:
            assert answer["text"] == ANSWER  # a training prompt: the task was learned, and it stops there


@pytest.mark.e2e
def test_push_reports_the_servers_refusal_and_unreachable_servers(
    server_url: str, gpt2_base: BaseModel, tmp_path: Path
) -> None:
    data = fixed_answer_data(tmp_path / "data.jsonl")
    gpt2_prefix = train(gpt2_base, data, tmp_path / "gpt2", max_steps=1).native_path  # not the served model
    with pytest.raises(PushError, match=r"failed: 400 .*base model"):
        _push_with_httpx(gpt2_prefix, "wrong-model", server_url=server_url, api_key=None)
    with pytest.raises(PushError, match=r"upload of task 'x' to http://127\.0\.0\.1:\d+ failed"):
        push_prefix(gpt2_prefix, "x", server_url=f"http://127.0.0.1:{free_port()}", api_key=None)


def test_a_bad_task_id_is_refused_before_training(demo_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = fixed_answer_data(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                "--model",
                str(demo_model_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--push",
                "../x",
            ]
        )
        == 1
    )
    assert "--push: task_id must be" in capsys.readouterr().err
    assert not out.exists()
