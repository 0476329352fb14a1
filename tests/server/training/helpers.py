"""Tiny data sets and runs shared by the training tests (the demo model trains in well under a second)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from server.engine.base_model import BaseModel
from server.training.model_facts import ModelFacts
from server.training.run import RunPaths, RunResult, prepare_run, run_training

PROMPTS = [
    f"{subject} {verb} {adjective}"
    for subject in ("the cat", "a dog", "my friend", "the model")
    for verb in ("is", "was")
    for adjective in ("good", "bad", "sunny", "cold")
]  # 32 prompts
FAST = {"num_virtual_tokens": 4, "batch_size": 8, "lr": 0.1, "warmup_steps": 2}  # a few steps, clear effects


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def fixed_answer_data(path: Path, answer: str = " OK: done.", prompts: list[str] = PROMPTS) -> Path:
    """A task the tiny random model learns fast: answer every prompt the same way."""
    return write_jsonl(path, [{"prompt": p, "completion": answer} for p in prompts])


def train(
    base: BaseModel,
    data: Path,
    out_dir: Path,
    *,
    eval_data: Path | None = None,
    resume: bool = False,
    **options: Any,
) -> RunResult:
    """A run as the CLI makes it, with ``FAST`` options; an option given as None is left out (its default)."""
    given = {name: value for name, value in {**FAST, **options}.items() if value is not None}
    paths = RunPaths(model=str(base.model.name_or_path), data=data, eval_data=eval_data, out_dir=out_dir)
    run = prepare_run(paths, given, lambda: ModelFacts.of(base), resume=resume)
    return run_training(base, run, progress=False)


def frozen_weights(base: BaseModel) -> dict[str, torch.Tensor]:
    """A copy of the base model's weights, to compare with after training (``assert_only_the_adapter_learned``)."""
    return {name: p.detach().clone() for name, p in base.model.named_parameters()}


def assert_only_the_adapter_learned(
    before: dict[str, torch.Tensor], base: BaseModel, result: RunResult, *, epochs: int, below: float
) -> None:
    """The base model is bit-identical and has no gradients; the train loss fell every epoch, to under
    ``below`` × the first; the eval loss fell."""
    after = dict(base.model.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(not p.requires_grad and p.grad is None for p in after.values())
    losses = [record.train_loss for record in result.state.history]
    assert (
        len(losses) == epochs and losses == sorted(losses, reverse=True) and losses[-1] < below * losses[0]
    ), losses
    assert result.state.history[-1].eval_loss < result.state.history[0].eval_loss
