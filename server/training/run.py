"""A whole training run: check everything, then train and export.

``prepare_run`` checks whatever can be refused (the output folder, every line of the data, the options,
the checkpoint's match with the model and the data), cheapest first and before the model's weights are
loaded; nothing is written until it has passed. ``run_training`` then trains on the loaded model, with
the thread settings pinned for a bit-identical rerun, and exports the prefix or soft prompt. The method is
chosen in one place, ``_trained_params``; everything after it sees a ``TrainedParams``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefix_store.geometry import ModelGeometry
from prefix_store.soft_prompt import Adapter
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
from server.training.config import (
    MAX_DEFAULT_WARMUP_STEPS,
    RESUMABLE_CHANGES,
    TrainConfig,
    default_warmup_steps,
)
from server.training.data import Dataset, RecordFile, read_records, tokenize_records
from server.training.determinism import pinned_threads
from server.training.errors import CheckpointError, TrainingError
from server.training.export import NATIVE_NAME, PEFT_DIR_NAME, export_adapter, write_summary
from server.training.init_text import init_text_token_ids, prefix_from_text
from server.training.loop import PrefixTrainer, build_optimizer
from server.training.lora_params import build_trainable_lora
from server.training.model_facts import ModelFacts
from server.training.prefix_params import build_trainable_prefix
from server.training.sizes import prefix_parameter_count
from server.training.soft_prompt_params import build_trainable_soft_prompt
from server.training.trained_params import TrainedParams


@dataclass(frozen=True)
class RunPaths:
    model: str  # the base model as given (recorded in the PEFT adapter's base_model_name_or_path)
    data: Path  # training JSONL
    eval_data: Path | None  # evaluation JSONL
    out_dir: Path


@dataclass(frozen=True)
class PreparedRun:
    """A run whose every check has passed; nothing has been written yet."""

    paths: RunPaths
    config: TrainConfig  # the warm-up resolved to a number of steps
    train: Dataset
    evaluation: Dataset | None
    identity: RunIdentity  # what a checkpoint of this run must agree with
    checkpoint: Checkpoint | None  # the run to continue; None for a new run

    @property
    def total_steps(self) -> int:
        return self.config.total_steps(len(self.train))


@dataclass(frozen=True)
class RunResult:
    config: TrainConfig
    state: TrainState
    finished: bool  # all epochs done (False: stopped by max_steps; resume to continue)
    adapter: Adapter  # the exported prefix, soft prompt (--method prompt-tuning) or LoRA, float32 on the CPU
    native_path: Path  # out_dir/prefix.safetensors
    peft_dir: Path  # out_dir/peft
    summary: dict[str, Any]  # what out_dir/training.json holds


def prepare_run(
    paths: RunPaths,
    options: dict[str, Any],
    model_facts: Callable[[], ModelFacts],
    *,
    resume: bool = False,
) -> PreparedRun:
    """Check a run before any weights are loaded; raises ``TrainingError`` subclasses with a message for
    the user.

    ``options`` are the ``TrainConfig`` fields the user gave (absent = default, or the resumed run's).
    ``model_facts`` (the tokenizer and the config) is called only once the output folder and every line
    of the data files have passed the checks that need no model.
    """
    checkpoint = _existing_run(paths.out_dir, resume)
    train_file = read_records(paths.data)
    eval_file = read_records(paths.eval_data) if paths.eval_data is not None else None
    model = model_facts()
    config = _resumed_config(checkpoint.config, options) if checkpoint else _new_config(model, options)
    _check_method(model.geometry, config)
    train = _tokenize(train_file, model, config)
    evaluation = _tokenize(eval_file, model, config) if eval_file is not None else None
    identity = RunIdentity(
        model.geometry.fingerprint, train.sha256, evaluation.sha256 if evaluation else None
    )
    if checkpoint:  # which keeps the warm-up it started with, even when extended
        _check_identity(checkpoint.identity, identity)
    else:
        config = _resolve_warmup(config, len(train))
    return PreparedRun(paths, config, train, evaluation, identity, checkpoint)


def run_training(
    base: BaseModel,
    run: PreparedRun,
    *,
    threads: int | None = None,
    progress: bool = True,
    on_epoch: Callable[[EpochRecord, int], None] | None = None,
) -> RunResult:
    """Train (or resume) ``run`` on ``base``, the model its checks were made against, and export the prefix
    or soft prompt into ``run.paths.out_dir``. ``threads``: CPU threads (None: torch's current count)."""
    if base.geometry.fingerprint != run.identity.model_fingerprint:
        raise TrainingError(
            f"the run was checked against base model {run.identity.model_fingerprint}, "
            f"not {base.geometry.fingerprint}"
        )
    config, checkpoint = run.config, run.checkpoint
    with pinned_threads(threads) as thread_count:
        module = _trained_params(base, config, fresh=checkpoint is None)
        optimizer = build_optimizer(module, config)
        if checkpoint:
            restore(checkpoint, module, optimizer)
        trainer = PrefixTrainer(
            base,
            config,
            module,
            optimizer,
            run.train,
            run.evaluation,
            out_dir=run.paths.out_dir,
            identity=run.identity,
            state=checkpoint.state if checkpoint else None,
            progress=progress,
            on_epoch=on_epoch,
        )
        outcome = trainer.run()
        adapter = module.export()
    out_dir = run.paths.out_dir
    native = export_adapter(adapter, base.geometry, out_dir, base_model_name=run.paths.model)
    summary = _summary(base, run, outcome.state, outcome.finished, module, thread_count)
    write_summary(out_dir, summary)
    return RunResult(
        config, outcome.state, outcome.finished, adapter, native, out_dir / PEFT_DIR_NAME, summary
    )


def _tokenize(file: RecordFile, model: ModelFacts, config: TrainConfig) -> Dataset:
    return tokenize_records(
        file,
        model.tokenizer,
        num_virtual_tokens=0 if config.method == "lora" else config.num_virtual_tokens,
        max_positions=model.max_positions,
    )


def _resolve_warmup(config: TrainConfig, num_examples: int) -> TrainConfig:
    """``config`` with its warm-up in steps: by default a share of the run; a given one must end within it.

    A warm-up that does not end before the last step leaves the learning rate below ``lr`` for the whole
    run (and a linear schedule never decays): refused, before any weights are loaded, rather than a
    warning that scrolls by while the run is wasted.
    """
    total = config.total_steps(num_examples)
    if config.warmup_steps is None:
        return dataclasses.replace(config, warmup_steps=default_warmup_steps(total))
    if config.warmup_steps >= total:
        raise TrainingError(
            f"--warmup-steps {config.warmup_steps} is not less than the run's {total} optimizer steps "
            f"({num_examples} examples in batches of {config.batch_size}: "
            f"{config.steps_per_epoch(num_examples)} per epoch × {config.epochs} epochs), so the learning "
            f"rate would never reach --lr {config.lr:g}; give at most {total - 1} (0: no warm-up), or leave "
            f"it out (a tenth of the steps, at most {MAX_DEFAULT_WARMUP_STEPS})"
        )
    return config


def _existing_run(out_dir: Path, resume: bool) -> Checkpoint | None:
    if resume:
        return load_checkpoint(out_dir)
    if (out_dir / CHECKPOINT_NAME).exists() or (out_dir / NATIVE_NAME).exists():
        raise TrainingError(
            f"{out_dir} already holds a training run; pass --resume to continue it, or choose another --out"
        )
    return None


def _new_config(model: ModelFacts, options: dict[str, Any]) -> TrainConfig:
    options = dict(options)
    try:
        if options.get("init_text") and options.get("num_virtual_tokens") is None:
            # one virtual token per token of the text: the prefix is then exactly the text's activations
            options["num_virtual_tokens"] = len(
                init_text_token_ids(model.tokenizer, options["init_text"], None)
            )
        return TrainConfig(**options)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None


def _check_method(geometry: ModelGeometry, config: TrainConfig) -> None:
    """An encoder-decoder trains a prefix (PEFT's SEQ_2_SEQ_LM one), and from random values: the engine
    serves no soft prompt on one, and ``--init-text`` reads a decoder-only model's activations."""
    if not geometry.encoder_decoder:
        return
    if config.method != "prefix":
        raise TrainingError(
            f"{geometry.model_type} is an encoder-decoder model: --method {config.method} is for decoder-only "
            "models; train a prefix (--method prefix)"
        )
    if config.init_text is not None:
        raise TrainingError(
            f"{geometry.model_type} is an encoder-decoder model: --init-text initialises a decoder-only model's "
            "prefix; leave it out (the prefix starts random)"
        )


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


def _trained_params(base: BaseModel, config: TrainConfig, *, fresh: bool) -> TrainedParams:
    """The run's trained parameters (the method's prefix, soft prompt or LoRA) on the model's device;
    initialised from ``--init-text`` only for a fresh run (a resumed one is overwritten by its checkpoint)."""
    if config.method == "lora":
        try:
            lora = build_trainable_lora(
                base, config.target_modules, rank=config.lora_r, alpha=config.lora_alpha, seed=config.seed
            )
        except ValueError as exc:
            raise TrainingError(f"--target-modules: {exc}") from None
        return lora.to(device=base.device, dtype=torch.float32)
    init_ids = None
    if fresh and config.init_text is not None:
        init_ids = init_text_token_ids(base.tokenizer, config.init_text, config.num_virtual_tokens)
    if config.method == "prompt-tuning":
        soft_prompt = build_trainable_soft_prompt(
            base, config.num_virtual_tokens, seed=config.seed, init_token_ids=init_ids
        )
        return soft_prompt.to(device=base.device, dtype=torch.float32)
    initial = prefix_from_text(base, init_ids) if init_ids is not None else None
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
    run: PreparedRun,
    state: TrainState,
    finished: bool,
    module: TrainedParams,
    threads: int,
) -> dict[str, Any]:
    config, train, evaluation = run.config, run.train, run.evaluation
    # the numbers served: a soft prompt is served as the prefix its virtual tokens leave, a LoRA as itself
    prefix_parameters = (
        module.num_trainable_parameters
        if config.method == "lora"
        else prefix_parameter_count(base.geometry, config.num_virtual_tokens)
    )
    base_parameters = sum(p.numel() for p in base.model.parameters())
    return {
        "model": run.paths.model,
        "base_model": base.geometry.fingerprint,
        "config": config.to_json(),  # warmup_steps: the warm-up used, defaulted or given
        "data": {"path": str(run.paths.data), "sha256": train.sha256, "examples": len(train)},
        "eval_data": (
            {"path": str(run.paths.eval_data), "sha256": evaluation.sha256, "examples": len(evaluation)}
            if evaluation
            else None
        ),
        "finished": finished,
        "epochs_done": state.epoch,
        "steps": state.global_step,
        "total_steps": run.total_steps,  # of the whole schedule (max_steps may stop the run earlier)
        "threads": threads,  # CPU threads; a bit-identical rerun needs the same count
        "history": [dataclasses.asdict(record) for record in state.history],
        "prefix_parameters": prefix_parameters,
        "trainable_parameters": module.num_trainable_parameters,
        "base_parameters": base_parameters,
        "prefix_fraction_of_base": prefix_parameters / base_parameters,
        "outputs": {"native": NATIVE_NAME, "peft": PEFT_DIR_NAME + "/"},
    }
