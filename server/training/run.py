"""A whole training run: check the output folder and the data, initialise or resume, train, export.

Everything that can be refused (options, the output folder, every line of the data, the checkpoint's
match with the model and the data) is checked before the first file is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefix_store import Prefix
from server.engine.base_model import BaseModel
from server.training.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    EpochRecord,
    RunIdentity,
    TrainState,
    load_checkpoint,
    restore,
)
from server.training.config import RESUMABLE_CHANGES, TrainConfig
from server.training.data import Dataset, load_dataset
from server.training.errors import CheckpointError, TrainingError
from server.training.export import NATIVE_NAME, PEFT_DIR_NAME, export_prefix, write_summary
from server.training.init_text import init_text_token_ids, prefix_from_text
from server.training.loop import PrefixTrainer, build_optimizer
from server.training.prefix_params import TrainablePrefix, build_trainable_prefix
from server.training.sizes import prefix_parameter_count


@dataclass(frozen=True)
class RunPaths:
    model: str  # the base model as given (recorded in the PEFT adapter's base_model_name_or_path)
    data: Path  # training JSONL
    eval_data: Path | None  # evaluation JSONL
    out_dir: Path


@dataclass(frozen=True)
class RunResult:
    config: TrainConfig
    state: TrainState
    finished: bool  # all epochs done (False: stopped by max_steps; resume to continue)
    prefix: Prefix  # the exported prefix, float32 on the CPU
    native_path: Path  # out_dir/prefix.safetensors
    peft_dir: Path  # out_dir/peft
    summary: dict[str, Any]  # what out_dir/training.json holds


def run_training(
    base: BaseModel,
    paths: RunPaths,
    options: dict[str, Any],
    *,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[EpochRecord, int], None] | None = None,
) -> RunResult:
    """Train (or resume) a prefix for ``base`` and export it into ``paths.out_dir``.

    ``options`` are the ``TrainConfig`` fields the user gave (absent = default, or the resumed run's).
    Raises ``TrainingError`` subclasses with a message for the user; nothing is written before every
    check has passed.
    """
    checkpoint = _existing_run(paths.out_dir, resume)
    config = _resumed_config(checkpoint.config, options) if checkpoint else _new_config(base, options)
    train = load_dataset(
        paths.data,
        base.tokenizer,
        num_virtual_tokens=config.num_virtual_tokens,
        max_positions=base.max_positions,
    )
    evaluation = None
    if paths.eval_data is not None:
        evaluation = load_dataset(
            paths.eval_data,
            base.tokenizer,
            num_virtual_tokens=config.num_virtual_tokens,
            max_positions=base.max_positions,
        )
    identity = RunIdentity(base.geometry.fingerprint, train.sha256, evaluation.sha256 if evaluation else None)
    if checkpoint:
        _check_identity(checkpoint.identity, identity)
    module = _trainable_prefix(base, config, fresh=checkpoint is None)
    optimizer = build_optimizer(module, config)
    if checkpoint:
        restore(checkpoint, module, optimizer)
    trainer = PrefixTrainer(
        base,
        config,
        module,
        optimizer,
        train,
        evaluation,
        out_dir=paths.out_dir,
        identity=identity,
        state=checkpoint.state if checkpoint else None,
        progress=progress,
        on_epoch=on_epoch,
    )
    outcome = trainer.run()
    prefix = module.export()
    native = export_prefix(prefix, base.geometry, paths.out_dir, base_model_name=paths.model)
    summary = _summary(base, paths, config, outcome.state, outcome.finished, module, train, evaluation)
    write_summary(paths.out_dir, summary)
    return RunResult(
        config, outcome.state, outcome.finished, prefix, native, paths.out_dir / PEFT_DIR_NAME, summary
    )


def _existing_run(out_dir: Path, resume: bool) -> Checkpoint | None:
    if resume:
        return load_checkpoint(out_dir)
    if (out_dir / CHECKPOINT_NAME).exists() or (out_dir / NATIVE_NAME).exists():
        raise TrainingError(
            f"{out_dir} already holds a training run; pass --resume to continue it, or choose another --out"
        )
    return None


def _new_config(base: BaseModel, options: dict[str, Any]) -> TrainConfig:
    options = dict(options)
    try:
        if options.get("init_text") and options.get("num_virtual_tokens") is None:
            # one virtual token per token of the text: the prefix is then exactly the text's activations
            options["num_virtual_tokens"] = len(init_text_token_ids(base, options["init_text"], None))
        return TrainConfig(**options)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


def _resumed_config(saved: TrainConfig, options: dict[str, Any]) -> TrainConfig:
    """The checkpoint's options; the user may extend ``epochs`` and set a new ``max_steps``, nothing else."""
    changed = [
        name
        for name, value in options.items()
        if name not in RESUMABLE_CHANGES and getattr(saved, name) != value
    ]
    if changed:
        shown = ", ".join(
            f"--{name.replace('_', '-')} {options[name]!r} (the run has {getattr(saved, name)!r})"
            for name in changed
        )
        raise CheckpointError(
            f"a resumed run keeps the options it started with; these differ: {shown}. "
            "Leave them out or repeat the run's values (only --epochs and --max-steps may change)"
        )
    epochs = options.get("epochs", saved.epochs)
    if epochs != saved.epochs and saved.lr_schedule == "linear":
        raise CheckpointError(
            f"the run decays its learning rate linearly over {saved.epochs} epochs; it cannot be "
            f"resumed with --epochs {epochs} (the schedule would change). Use --lr-schedule constant to extend runs"
        )
    if epochs < saved.epochs:
        raise CheckpointError(f"--epochs {epochs} is fewer than the run's {saved.epochs}")
    return dataclasses.replace(saved, epochs=epochs, max_steps=options.get("max_steps"))


def _check_identity(saved: RunIdentity, current: RunIdentity) -> None:
    if saved.model_fingerprint != current.model_fingerprint:
        raise CheckpointError(
            f"the checkpoint was trained on base model {saved.model_fingerprint}, not {current.model_fingerprint}"
        )
    if saved.train_sha256 != current.train_sha256:
        raise CheckpointError(
            "the training data changed since the checkpoint was written; a resumed run needs the same data"
        )
    if saved.eval_sha256 != current.eval_sha256:
        raise CheckpointError(
            "the evaluation data changed since the checkpoint was written (or was added or left out)"
        )


def _trainable_prefix(base: BaseModel, config: TrainConfig, *, fresh: bool) -> TrainablePrefix:
    """The run's trainable prefix on the model's device; initialised only for a fresh run (a resumed one
    is overwritten by its checkpoint)."""
    initial = None
    if fresh and config.init_text is not None:
        initial = prefix_from_text(
            base, init_text_token_ids(base, config.init_text, config.num_virtual_tokens)
        )
    module = build_trainable_prefix(
        base.geometry,
        config.num_virtual_tokens,
        projection=config.prefix_projection,
        projection_hidden=config.projection_hidden,
        seed=config.seed,
        init_std=config.init_std,
        initial=initial,
    )
    return module.to(device=base.device, dtype=torch.float32)


def _summary(
    base: BaseModel,
    paths: RunPaths,
    config: TrainConfig,
    state: TrainState,
    finished: bool,
    module: TrainablePrefix,
    train: Dataset,
    evaluation: Dataset | None,
) -> dict[str, Any]:
    prefix_parameters = prefix_parameter_count(base.geometry, config.num_virtual_tokens)
    base_parameters = sum(p.numel() for p in base.model.parameters())
    return {
        "model": paths.model,
        "base_model": base.geometry.fingerprint,
        "config": config.to_json(),
        "data": {"path": str(paths.data), "sha256": train.sha256, "examples": len(train)},
        "eval_data": (
            {"path": str(paths.eval_data), "sha256": evaluation.sha256, "examples": len(evaluation)}
            if evaluation
            else None
        ),
        "finished": finished,
        "epochs_done": state.epoch,
        "steps": state.global_step,
        "history": [dataclasses.asdict(record) for record in state.history],
        "prefix_parameters": prefix_parameters,
        "trainable_parameters": module.num_trainable_parameters,
        "base_parameters": base_parameters,
        "prefix_fraction_of_base": prefix_parameters / base_parameters,
        "outputs": {"native": NATIVE_NAME, "peft": PEFT_DIR_NAME + "/"},
    }
