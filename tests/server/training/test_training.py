"""The method: only the prefix learns, the loss falls, runs are reproducible, resume continues exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.source import load_prefix_source
from server.engine.base_model import BaseModel
from server.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from server.training.config import TrainConfig, default_warmup_steps
from server.training.errors import CheckpointError, TrainingError
from server.training.loop import assert_base_untouched, learning_rate
from server.training.prefix_params import ProjectedPrefix, build_trainable_prefix
from server.training.run import RunResult
from tests.server.training.helpers import (
    PROMPTS,
    assert_only_the_adapter_learned,
    fixed_answer_data,
    frozen_weights,
    train,
    write_jsonl,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fixed_answer_data(tmp_path_factory.mktemp("data") / "fixed.jsonl")


def _same_prefix(a: RunResult, b: RunResult) -> bool:
    return torch.equal(a.adapter.keys, b.adapter.keys) and torch.equal(a.adapter.values, b.adapter.values)


def test_only_the_prefix_learns_and_the_loss_falls(llama_base: BaseModel, data: Path, tmp_path: Path) -> None:
    before = frozen_weights(llama_base)
    result = train(
        llama_base,
        data,
        tmp_path / "out",
        eval_data=data,
        epochs=5,
        lr_schedule="constant",
        num_virtual_tokens=8,
        lr=0.3,
    )
    assert_only_the_adapter_learned(before, llama_base, result, epochs=5, below=0.6)
    assert result.summary["trainable_parameters"] == result.summary["prefix_parameters"] == 2 * 4 * 2 * 16 * 8


def test_a_base_parameter_that_could_learn_stops_training(llama_base: BaseModel) -> None:
    parameters = list(llama_base.model.parameters())
    assert_base_untouched(parameters)  # as loaded: frozen
    parameters[0].requires_grad_(True)
    try:
        with pytest.raises(RuntimeError, match="1 base-model parameters received gradients"):
            assert_base_untouched(parameters)
    finally:
        parameters[0].requires_grad_(False)


def test_same_seed_same_prefix_other_seed_other_prefix(
    llama_base: BaseModel, data: Path, tmp_path: Path
) -> None:
    first = train(llama_base, data, tmp_path / "a", epochs=1, seed=5)
    again = train(llama_base, data, tmp_path / "b", epochs=1, seed=5)
    other = train(llama_base, data, tmp_path / "c", epochs=1, seed=6)
    assert _same_prefix(first, again)
    assert not _same_prefix(first, other)


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "projection"])
def test_exports_have_the_models_geometry(
    base: BaseModel, data: Path, tmp_path: Path, projection: bool
) -> None:
    result = train(base, data, tmp_path / "out", epochs=1, prefix_projection=projection, projection_hidden=32)
    native, native_format = load_prefix_source(result.native_path, base.geometry, PrefixLimits())
    peft, peft_format = load_prefix_source(result.peft_dir, base.geometry, PrefixLimits())
    assert (native_format, peft_format) == ("native", "peft")
    assert native.keys.shape == base.geometry.prefix_shape(4) and native.fits(base.geometry)
    for loaded in (native, peft):
        assert torch.equal(loaded.keys, result.adapter.keys) and torch.equal(
            loaded.values, result.adapter.values
        )
    if projection:  # trained through the MLP: more trainable numbers than are served
        assert result.summary["trainable_parameters"] > result.summary["prefix_parameters"]


def test_projection_folds_into_plain_keys_and_values(llama_base: BaseModel) -> None:
    geometry = llama_base.geometry
    module = build_trainable_prefix(geometry, 3, projection=True, projection_hidden=8, seed=0, init_std=1.0)
    assert isinstance(module, ProjectedPrefix)
    with torch.no_grad():
        module.embedding.add_(1.0)
    exported, live = module.export(), module()
    assert exported.keys.shape == geometry.prefix_shape(3) and not exported.keys.requires_grad
    assert torch.equal(exported.keys, live.keys.detach()) and torch.equal(
        exported.values, live.values.detach()
    )
    # the fold follows PEFT's row layout: [P, layers, key|value, kv_heads, head_dim]
    rows = (
        module.mlp(module.embedding)
        .detach()
        .view(3, geometry.num_layers, 2, geometry.num_kv_heads, geometry.head_dim)
    )
    assert torch.equal(exported.keys[1, :, 2], rows[2, 1, 0])


def test_init_text_starts_from_the_texts_activations_with_and_without_projection(
    llama_base: BaseModel, data: Path, tmp_path: Path
) -> None:
    from server.training.init_text import init_text_token_ids, prefix_from_text

    text = "Answer the question."
    expected = prefix_from_text(llama_base, init_text_token_ids(llama_base.tokenizer, text, None))
    for projection in (False, True):
        result = train(
            llama_base, data, tmp_path / f"p{projection}", init_text=text, num_virtual_tokens=None,
            prefix_projection=projection, projection_hidden=16, max_steps=1, lr=1e-9, warmup_steps=0,
        )  # fmt: skip
        assert result.config.num_virtual_tokens == expected.num_virtual_tokens  # one per token of the text
        torch.testing.assert_close(result.adapter.keys, expected.keys, rtol=0, atol=1e-6)
        torch.testing.assert_close(result.adapter.values, expected.values, rtol=0, atol=1e-6)


def test_resume_after_an_interruption_continues_exactly(
    llama_base: BaseModel, data: Path, tmp_path: Path
) -> None:
    """Linear decay (the default): stopped after one epoch's steps, resumed, equal to the straight run."""
    straight = train(llama_base, data, tmp_path / "straight", eval_data=data, epochs=2)
    steps_per_epoch = straight.state.global_step // 2
    stopped = train(
        llama_base, data, tmp_path / "resumed", eval_data=data, epochs=2, max_steps=steps_per_epoch + 1
    )
    assert (
        not stopped.finished and load_checkpoint(tmp_path / "resumed").state.batch_in_epoch == 1
    )  # mid-epoch
    resumed = train(llama_base, data, tmp_path / "resumed", eval_data=data, resume=True)
    assert resumed.finished and resumed.state.global_step == straight.state.global_step
    assert _same_prefix(straight, resumed)
    for record in ("train_loss", "eval_loss"):
        assert [getattr(r, record) for r in resumed.state.history] == [
            getattr(r, record) for r in straight.state.history
        ]


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "projection"])
def test_resume_with_more_epochs_equals_the_longer_run(
    llama_base: BaseModel, data: Path, tmp_path: Path, projection: bool
) -> None:
    """Constant schedule: 1 epoch, then --resume --epochs 2, is the 2-epoch run (optimizer state included)."""
    options = {"lr_schedule": "constant", "prefix_projection": projection, "projection_hidden": 16}
    straight = train(llama_base, data, tmp_path / "straight", epochs=2, **options)
    train(llama_base, data, tmp_path / "resumed", epochs=1, **options)
    resumed = train(llama_base, data, tmp_path / "resumed", resume=True, epochs=2)
    assert _same_prefix(straight, resumed)


def test_resume_refuses_what_would_not_continue_the_run(
    llama_base: BaseModel, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(llama_base, data, out, resume=True)
    train(llama_base, data, out, epochs=1)
    assert (out / CHECKPOINT_NAME).is_file()
    with pytest.raises(TrainingError, match="already holds a training run; pass --resume"):
        train(llama_base, data, out, epochs=1)
    with pytest.raises(CheckpointError, match=r"--lr 0.5 \(the run has 0.1\)"):
        train(llama_base, data, out, resume=True, lr=0.5)
    with pytest.raises(CheckpointError, match="decays its learning rate linearly over 1 epochs"):
        train(llama_base, data, out, resume=True, epochs=2)
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "a", "completion": " b"}])
    with pytest.raises(CheckpointError, match="the training data changed"):
        train(llama_base, other, out, resume=True)


def test_the_default_warmup_is_a_tenth_of_the_run_at_most_ten_steps() -> None:
    assert [default_warmup_steps(total) for total in (1, 4, 9, 10, 45, 100, 5000)] == [0, 0, 0, 1, 4, 10, 10]


@pytest.mark.parametrize(
    ("examples", "epochs", "total", "warmup"),
    [(10, 2, 4, 0), (32, 10, 40, 4), (32, 40, 160, 10)],
    ids=["4-steps", "40-steps", "160-steps"],
)
def test_a_run_without_warmup_steps_warms_up_within_it_and_records_it(
    llama_base: BaseModel, tmp_path: Path, examples: int, epochs: int, total: int, warmup: int
) -> None:
    """10 lines × 2 epochs in batches of 8 is 4 steps: the old fixed 10-step warm-up never reached the peak."""
    data = fixed_answer_data(tmp_path / "data.jsonl", prompts=(PROMPTS * 2)[:examples])
    result = train(llama_base, data, tmp_path / "out", epochs=epochs, warmup_steps=None, max_steps=1)
    assert result.config.warmup_steps == warmup
    recorded = json.loads((tmp_path / "out" / "training.json").read_text())
    assert recorded["config"]["warmup_steps"] == warmup and recorded["total_steps"] == total
    assert max(learning_rate(result.config, step, total) for step in range(total)) == result.config.lr


def test_a_warmup_the_run_never_finishes_is_refused_with_both_numbers(
    llama_base: BaseModel, tmp_path: Path
) -> None:
    data = fixed_answer_data(tmp_path / "data.jsonl", prompts=PROMPTS[:10])  # 2 steps per epoch
    out = tmp_path / "out"
    for warmup in (4, 10):
        with pytest.raises(TrainingError) as caught:
            train(llama_base, data, out, epochs=2, warmup_steps=warmup)
        message = str(caught.value)
        assert message.startswith(f"--warmup-steps {warmup} is not less than the run's 4 optimizer steps")
        assert "give at most 3" in message and "\n" not in message
    assert not out.exists()
    assert train(llama_base, data, out, epochs=2, warmup_steps=3).config.warmup_steps == 3  # ends in time


def test_a_resumed_run_keeps_the_warmup_it_started_with(llama_base: BaseModel, tmp_path: Path) -> None:
    """Extending a constant run to 4 epochs does not move its warm-up to a tenth of the longer run."""
    data = fixed_answer_data(tmp_path / "data.jsonl")  # 32 lines in batches of 1: 32 steps per epoch
    options = {"batch_size": 1, "lr_schedule": "constant", "warmup_steps": None}
    assert train(llama_base, data, tmp_path / "out", epochs=1, **options).config.warmup_steps == 3
    resumed = train(llama_base, data, tmp_path / "out", resume=True, epochs=4, max_steps=33, **options)
    assert resumed.config.warmup_steps == 3


def test_learning_rate_warms_up_then_decays_or_stays() -> None:
    linear = TrainConfig(lr=1.0, warmup_steps=4, lr_schedule="linear")
    assert [learning_rate(linear, s, 12) for s in (0, 3, 4, 8, 11)] == [0.25, 1.0, 1.0, 0.5, 0.125]
    constant = TrainConfig(lr=1.0, warmup_steps=0, lr_schedule="constant")
    assert {learning_rate(constant, s, 12) for s in range(20)} == {1.0}
