"""The quality benchmark's baselines: trained like a prefix, and served exactly as PEFT runs them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from bench.quality.baseline_training import main as train_baseline
from bench.quality.baseline_training import right_padded
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.source import load_prefix_source
from prefix_store.lora import LoraAdapter
from server.engine.base_model import load_base_model
from server.engine.generation import generate
from server.training.data import Example
from server.training.forward import IGNORE
from testing.peft_reference import peft_greedy_tokens
from tests.server.engine.helpers import request

PROMPTS = ["hello", "Once upon a time there was a little model that wanted to learn many tasks."]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quality") / "train.jsonl"
    lines = [
        {"prompt": f"Data: name[Cafe {i}]\nSentence:", "completion": f" Cafe {i} is nice."} for i in range(8)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _train(method: str, model_dir: Path, data: Path, out: Path, *extra: str) -> dict:
    common = ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--epochs", "2"]
    train_baseline(["--method", method, *common, "--lr", "0.05", "--batch-size", "4", *extra])
    return json.loads((out / "training.json").read_text())


@pytest.mark.parametrize("model_fixture", ["demo_model_dir", "gpt2_model_dir"])
def test_a_soft_prompt_served_as_a_prefix_matches_peft(
    model_fixture: str, data: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Prompt tuning's soft prompt, turned into per-layer keys and values, conditions a row exactly as
    PEFT's forward does (rotary positions on Llama, absolute positions on GPT-2), in one batch with a
    bare row and a second prompt length."""
    model_dir = request.getfixturevalue(model_fixture)
    summary = _train("prompt-tuning", model_dir, data, tmp_path, "--num-virtual-tokens", "6")
    assert (
        summary["steps"] == 4 and summary["history"][-1]["train_loss"] < summary["history"][0]["train_loss"]
    )
    base = load_base_model(model_dir, device="cpu", dtype="float32")
    prefix, _ = load_prefix_source(tmp_path / "prefix.safetensors", base.geometry, PrefixLimits())
    assert prefix.num_virtual_tokens == 6
    rows = [request_for(base, f"soft-{i}", prompt, prefix) for i, prompt in enumerate(PROMPTS)]
    results = generate(base, [*rows, request_for(base, "bare", PROMPTS[0], None)])
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "peft").eval()
    for row, result in zip(rows, results, strict=False):
        assert result.token_ids == peft_greedy_tokens(peft_model, list(row.prompt_ids), 12)
    assert results[0].token_ids != results[2].token_ids  # the soft prompt changed what the model says


def test_a_lora_is_saved_as_a_peft_adapter_the_engine_serves_as_peft_runs_it(
    demo_model_dir: Path, data: Path, tmp_path: Path
) -> None:
    summary = _train("lora", demo_model_dir, data, tmp_path)
    base = load_base_model(demo_model_dir, device="cpu", dtype="float32")
    original = sum(p.numel() for p in base.model.parameters())
    assert 0 < summary["trainable_parameters"] < original // 10
    lora, source_format = load_prefix_source(tmp_path / "peft", base.geometry, PrefixLimits())
    assert source_format == "peft" and isinstance(lora, LoraAdapter)
    assert {name.rsplit(".", 1)[-1] for name in lora.modules} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    rows = [replace(request_for(base, f"lora-{i}", p, None), lora=lora) for i, p in enumerate(PROMPTS)]
    results = generate(base, [*rows, request_for(base, "bare", PROMPTS[0], None)])
    reference = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype="float32").eval()
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "peft").eval()
    for row, result in zip(rows, results, strict=False):
        assert result.token_ids == peft_greedy_tokens(peft_model, list(row.prompt_ids), 12)


def test_a_fine_tuned_model_is_saved_as_a_servable_folder(
    demo_model_dir: Path, data: Path, tmp_path: Path
) -> None:
    method = "full"
    summary = _train(method, demo_model_dir, data, tmp_path)
    trained = load_base_model(tmp_path / "model", device="cpu", dtype="float32")
    original = load_base_model(demo_model_dir, device="cpu", dtype="float32")
    changed = {
        name
        for (name, new), (_, old) in zip(
            trained.model.state_dict().items(), original.model.state_dict().items(), strict=True
        )
        if not torch.equal(new, old)
    }
    assert changed, "training changed no weight"
    assert summary["trainable_parameters"] == sum(p.numel() for p in original.model.parameters())


def request_for(base, request_id: str, prompt: str, prefix):
    return request(base, request_id, prompt, prefix, max_new_tokens=12)


def test_right_padding_puts_targets_on_completion_tokens_only() -> None:
    examples = [Example(1, (5, 6), (7, 8, 2)), Example(2, (9,), (3, 2))]
    input_ids, mask, targets = right_padded(examples, pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7, 8, 2], [9, 3, 2, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert targets.tolist() == [[IGNORE, 7, 8, 2, IGNORE], [3, 2, IGNORE, IGNORE, IGNORE]]
