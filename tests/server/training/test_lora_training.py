"""``--method lora``: a LoRA learns with the base frozen (A Kaiming-uniform, B zero, as PEFT starts), resumes
exactly, and is served as trained: PEFT's forward loop on the exported ``LORA`` folder and the engine on the
exported native file give the same greedy tokens, on Llama, GPT-2 and Qwen2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.source import load_prefix_source
from prefix_store.lora import LoraAdapter
from server.cli import main
from server.engine.base_model import BaseModel
from server.engine.generation import generate
from server.engine.request import GenerationRequest
from server.training.errors import TrainingError
from server.training.run import RunResult
from testing.peft_reference import peft_greedy_tokens
from tests.server.engine.helpers import request as engine_request
from tests.server.training.helpers import (
    PROMPTS,
    assert_only_the_adapter_learned,
    fixed_answer_data,
    frozen_weights,
    train,
)

LORA = {"method": "lora", "num_virtual_tokens": None, "lr": 0.02, "lora_r": 4}  # over helpers.FAST
NEW_TOKENS = 12
HELD_OUT = "our team seems happy"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixed_answer_data(tmp_path_factory.mktemp("data") / "fixed.jsonl")


def _lora(result: RunResult) -> LoraAdapter:
    assert isinstance(result.adapter, LoraAdapter)
    return result.adapter


def _engine_tokens(base: BaseModel, lora: LoraAdapter, prompt: str) -> list[int]:
    plain = engine_request(base, "r", prompt, max_new_tokens=NEW_TOKENS)
    served = GenerationRequest(**{**plain.__dict__, "lora": lora.to(base.device, base.dtype)})
    return generate(base, [served])[0].token_ids


def test_only_the_lora_learns_and_the_loss_falls(llama_base: BaseModel, data: Path, tmp_path: Path) -> None:
    before = frozen_weights(llama_base)
    result = train(
        llama_base, data, tmp_path / "out", eval_data=data, epochs=4, lr_schedule="constant", **LORA
    )
    assert_only_the_adapter_learned(before, llama_base, result, epochs=4, below=0.85)
    lora = _lora(result)
    # the default targets: the attention projections of the demo model's 4 layers (hidden 64, 2 kv heads of 16)
    assert sorted({name.rsplit(".", 1)[-1] for name in lora.modules}) == [
        "k_proj",
        "o_proj",
        "q_proj",
        "v_proj",
    ]
    assert len(lora.modules) == 4 * 4 and {m.rank for m in lora.modules.values()} == {4}
    assert result.summary["trainable_parameters"] == 4 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))
    assert result.summary["prefix_parameters"] == result.summary["trainable_parameters"]


def test_training_starts_from_the_base_model(llama_base: BaseModel, data: Path, tmp_path: Path) -> None:
    """B starts at zero, so before a step the LoRA changes nothing; A starts within PEFT's Kaiming bound."""
    untrained = train(
        llama_base, data, tmp_path / "out", max_steps=1, warmup_steps=0, **{**LORA, "lr": 1e-12}
    )
    lora = _lora(untrained)
    first = lora.modules["model.layers.0.self_attn.q_proj"]
    assert first.a.abs().max() <= 1 / 64**0.5 and first.b.abs().max() < 1e-9
    base_tokens = generate(
        llama_base, [engine_request(llama_base, "r", HELD_OUT, max_new_tokens=NEW_TOKENS)]
    )[0].token_ids
    assert _engine_tokens(llama_base, lora, HELD_OUT) == base_tokens


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "qwen2"])
def test_peft_loads_the_export_and_agrees_with_the_engine(
    request: pytest.FixtureRequest, data: Path, tmp_path: Path, architecture: str
) -> None:
    base: BaseModel = request.getfixturevalue(f"{architecture}_base")
    targets = ("c_attn", "c_fc") if architecture == "gpt2" else ("q_proj", "v_proj", "down_proj")
    result = train(base, data, tmp_path / "out", epochs=2, target_modules=targets, lora_alpha=8.0, **LORA)
    native, native_format = load_prefix_source(result.native_path, base.geometry, PrefixLimits())
    assert native_format == "native" and isinstance(native, LoraAdapter)
    assert all(torch.equal(native.modules[k].b, m.b) for k, m in _lora(result).modules.items())
    model = AutoModelForCausalLM.from_pretrained(base.model.name_or_path, dtype="float32").eval()
    peft_model = PeftModel.from_pretrained(model, result.peft_dir).eval()
    config = peft_model.peft_config["default"]
    assert (config.peft_type, config.r, config.lora_alpha) == ("LORA", 4, 8)
    changed = False
    for prompt in (PROMPTS[0], HELD_OUT):
        prompt_ids = base.tokenizer(prompt).input_ids
        served = _engine_tokens(base, native, prompt)
        assert peft_greedy_tokens(peft_model, prompt_ids, NEW_TOKENS) == served
        changed |= (
            served
            != generate(base, [engine_request(base, "b", prompt, max_new_tokens=NEW_TOKENS)])[0].token_ids
        )
    assert changed  # the LoRA learned something that shows


def test_options_of_other_methods_and_unknown_targets_are_refused(
    llama_base: BaseModel, data: Path, tmp_path: Path
) -> None:
    for option, match in (
        ({"prefix_projection": True}, r"prefix_projection: options of the prefix method only"),
        ({"num_virtual_tokens": 8}, r"num_virtual_tokens: options of the virtual-token methods"),
        ({"init_text": "hello"}, r"init_text: options of the virtual-token methods"),
        ({"target_modules": ("q_proj", "w_gate")}, r"target modules w_gate match no projection"),
        ({"lora_r": 0}, r"lora_r must be at least 1"),
    ):
        with pytest.raises(TrainingError, match=match):
            train(llama_base, data, tmp_path / "out", **{**LORA, **option})
    with pytest.raises(TrainingError, match=r"lora_r: options of the lora method only"):
        train(llama_base, data, tmp_path / "out", lora_r=4)


def test_the_cli_trains_a_lora(demo_model_dir: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    argv = ["train", "--model", str(demo_model_dir), "--data", str(data), "--out", str(out), "--no-progress"]
    argv += ["--method", "lora", "--lora-r", "2", "--target-modules", "q_proj,v_proj", "--epochs", "1"]
    assert main(argv) == 0
    config = (out / "peft" / "adapter_config.json").read_text()
    assert '"peft_type": "LORA"' in config and '"r": 2' in config
