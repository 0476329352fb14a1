"""``--method prompt-tuning``: a soft prompt learns with the base frozen, starts from real tokens'
embeddings, resumes exactly, and is served as trained: PEFT's forward loop on the exported adapter and the
engine on the exported native file give the same greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.source import load_prefix_source
from prefix_store.soft_prompt import SoftPrompt
from server.cli import main
from server.engine.base_model import BaseModel
from server.engine.generation import generate
from server.engine.soft_prompts import soft_prompt_prefix
from server.training.checkpoint import load_checkpoint
from server.training.errors import CheckpointError, TrainingError
from server.training.init_text import init_text_token_ids
from server.training.run import RunResult
from testing.peft_reference import peft_greedy_tokens
from tests.server.engine.helpers import request
from tests.server.training.helpers import (
    PROMPTS,
    assert_only_the_adapter_learned,
    fixed_answer_data,
    frozen_weights,
    train,
)

PROMPT_TUNING = {"method": "prompt-tuning", "lr": 0.05}  # over helpers.FAST; a soft prompt wants a lower lr
NEW_TOKENS = 12
HELD_OUT = "our team seems happy"  # not a training prompt


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixed_answer_data(tmp_path_factory.mktemp("data") / "fixed.jsonl")


def _soft_prompt(result: RunResult) -> SoftPrompt:
    assert isinstance(result.adapter, SoftPrompt)
    return result.adapter


def _engine_tokens(base: BaseModel, soft_prompt: SoftPrompt, prompt: str) -> list[int]:
    """The engine's greedy tokens, the soft prompt served as the prefix its virtual tokens leave."""
    prefix = soft_prompt_prefix(base, soft_prompt)
    return generate(base, [request(base, "r", prompt, prefix, max_new_tokens=NEW_TOKENS)])[0].token_ids


def test_only_the_soft_prompt_learns_and_the_loss_falls(
    llama_base: BaseModel, data: Path, tmp_path: Path
) -> None:
    before = frozen_weights(llama_base)
    options = {**PROMPT_TUNING, "lr_schedule": "constant", "num_virtual_tokens": 8}
    result = train(llama_base, data, tmp_path / "out", eval_data=data, epochs=4, **options)
    assert_only_the_adapter_learned(before, llama_base, result, epochs=4, below=0.85)
    embedding_dim = llama_base.geometry.embedding_dim
    assert _soft_prompt(result).embeddings.shape == (8, embedding_dim)
    assert result.summary["trainable_parameters"] == 8 * embedding_dim  # the prompt's numbers alone
    assert result.summary["prefix_parameters"] == 2 * 4 * 2 * 16 * 8  # what the engine serves it as


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "qwen2"])
def test_peft_loads_the_export_and_agrees_with_the_engine(
    request: pytest.FixtureRequest, data: Path, tmp_path: Path, architecture: str
) -> None:
    base: BaseModel = request.getfixturevalue(f"{architecture}_base")
    result = train(base, data, tmp_path / "out", epochs=2, **PROMPT_TUNING)
    native, native_format = load_prefix_source(result.native_path, base.geometry, PrefixLimits())
    assert native_format == "native" and isinstance(native, SoftPrompt)
    assert torch.equal(native.embeddings, _soft_prompt(result).embeddings)
    model = AutoModelForCausalLM.from_pretrained(base.model.name_or_path, dtype="float32").eval()
    peft_model = PeftModel.from_pretrained(model, result.peft_dir).eval()
    config = peft_model.peft_config["default"]
    assert (config.peft_type, config.num_virtual_tokens) == ("PROMPT_TUNING", 4)
    for prompt in (PROMPTS[0], HELD_OUT):
        prompt_ids = base.tokenizer(prompt).input_ids
        assert peft_greedy_tokens(peft_model, prompt_ids, NEW_TOKENS) == _engine_tokens(base, native, prompt)


def test_it_starts_from_real_tokens_embeddings(llama_base: BaseModel, data: Path, tmp_path: Path) -> None:
    """``--init-text``: the text's token embeddings, one virtual token per token (PEFT's TEXT); without it,
    the embeddings of tokens sampled from the vocabulary by the seed (PEFT's SAMPLE_VOCAB)."""
    table = llama_base.model.get_input_embeddings().weight.detach()  # [vocab, embedding_dim]
    untrained = {"max_steps": 1, "lr": 1e-9, "warmup_steps": 0, "method": "prompt-tuning"}
    text = "Answer the question."
    from_text = train(
        llama_base, data, tmp_path / "text", init_text=text, num_virtual_tokens=None, **untrained
    )
    ids = init_text_token_ids(llama_base.tokenizer, text, None)
    assert from_text.config.num_virtual_tokens == len(ids)
    torch.testing.assert_close(_soft_prompt(from_text).embeddings, table[ids], rtol=0, atol=1e-6)

    sampled = [
        _soft_prompt(train(llama_base, data, tmp_path / f"s{i}", seed=seed, **untrained))
        for i, seed in enumerate((1, 1, 2))
    ]
    for soft in sampled:  # each virtual token starts as some token's embedding
        distances = torch.cdist(soft.embeddings, table, compute_mode="donot_use_mm_for_euclid_dist")
        assert distances.min(dim=1).values.max() < 1e-6
    assert torch.equal(sampled[0].embeddings, sampled[1].embeddings)  # the seed alone decides
    assert not torch.allclose(sampled[0].embeddings, sampled[2].embeddings)


def test_resume_after_an_interruption_continues_exactly(
    llama_base: BaseModel, data: Path, tmp_path: Path
) -> None:
    straight = train(llama_base, data, tmp_path / "straight", epochs=2, **PROMPT_TUNING)
    steps_per_epoch = straight.state.global_step // 2
    out = tmp_path / "resumed"
    stopped = train(llama_base, data, out, epochs=2, max_steps=steps_per_epoch + 1, **PROMPT_TUNING)
    assert not stopped.finished and load_checkpoint(out).config.method == "prompt-tuning"
    # no --method: the checkpoint's (lr only overrides helpers.FAST's with the run's own)
    resumed = train(llama_base, data, out, resume=True, lr=0.05)
    assert resumed.finished and resumed.state.global_step == straight.state.global_step
    assert torch.equal(_soft_prompt(resumed).embeddings, _soft_prompt(straight).embeddings)
    assert [r.train_loss for r in resumed.state.history] == [r.train_loss for r in straight.state.history]
    with pytest.raises(CheckpointError, match=r"--method 'prefix' \(the run has 'prompt-tuning'\)"):
        train(llama_base, data, out, resume=True, lr=0.05, method="prefix")


def test_options_of_the_prefix_method_are_refused(llama_base: BaseModel, data: Path, tmp_path: Path) -> None:
    for option in ({"prefix_projection": True}, {"projection_hidden": 16}, {"init_std": 0.5}):
        with pytest.raises(TrainingError, match=f"{next(iter(option))}: options of the prefix method only"):
            train(llama_base, data, tmp_path / "out", **PROMPT_TUNING, **option)
    assert not (tmp_path / "out").exists()


def test_the_cli_writes_both_outputs(demo_model_dir: Path, data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["train", "--model", str(demo_model_dir), "--data", str(data), "--out", str(out), "--no-progress"]
    argv += ["--method", "prompt-tuning", "--num-virtual-tokens", "4", "--epochs", "1", "--lr", "0.05"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "soft prompt: 4 virtual tokens = 256 parameters" in printed and "epoch 1/1  train loss" in printed
    with safetensors.safe_open(str(out / "prefix.safetensors"), framework="pt") as native:
        assert native.metadata()["kind"] == "soft_prompt"
        assert native.get_slice("embeddings").get_shape() == [4, 64]
    adapter_config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert (adapter_config["peft_type"], adapter_config["token_dim"]) == ("PROMPT_TUNING", 64)
    assert (out / "peft" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "training.json").read_text())
    assert summary["config"]["method"] == "prompt-tuning" and summary["outputs"]["peft"] == "peft/"


def test_the_cli_refuses_an_unknown_method(demo_model_dir: Path, data: Path, tmp_path: Path, capsys) -> None:
    argv = ["train", "--model", str(demo_model_dir), "--data", str(data), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--method", "ia3"])
    assert exited.value.code == 2
    assert "argument --method: invalid choice: 'ia3'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
