"""Per-epoch checkpoints: everything a resumed run needs to continue exactly, in one safetensors file.

``DIR/checkpoint.safetensors`` holds the trained parameters (``prefix.*``, a soft prompt's as well) and
AdamW's state (``optimizer.<param index>.<name>``); its metadata holds the run as JSON (options, the
method among them, progress, history, digests of the data and the model geometry). No pickle: a checkpoint is data, never code. Written to a
temporary file, fsynced and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from server.training.config import TrainConfig
from server.training.errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "prefix-serve-train/1"


@dataclass(frozen=True)
class EpochRecord:
    """What one finished epoch reports."""

    epoch: int  # 1-based
    train_loss: float  # mean cross-entropy per completion token
    eval_loss: float | None  # the same on --eval-data, after the epoch
    tokens_per_second: float  # prompt + completion tokens trained on per second
    seconds: float


@dataclass
class TrainState:
    """Where a run stands; advanced by the loop, saved with every checkpoint."""

    global_step: int = 0  # optimiser steps taken
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of the current epoch already trained on
    epoch_loss_sum: float = 0.0  # summed completion-token loss in the current epoch
    epoch_loss_tokens: int = 0  # completion tokens in the current epoch
    epoch_tokens: int = 0  # all tokens in the current epoch (throughput)
    epoch_seconds: float = 0.0  # time spent in the current epoch
    history: list[EpochRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        data = dict(data)
        data["history"] = [EpochRecord(**record) for record in data.get("history", [])]
        return cls(**data)


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must agree with to be resumed: the base model and the data."""

    model_fingerprint: str
    train_sha256: str
    eval_sha256: str | None


@dataclass(frozen=True)
class Checkpoint:
    config: TrainConfig
    state: TrainState
    identity: RunIdentity
    prefix_state: dict[str, torch.Tensor]
    optimizer_state: dict[int, dict[str, torch.Tensor]]


def save_checkpoint(
    out_dir: Path,
    config: TrainConfig,
    state: TrainState,
    identity: RunIdentity,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> Path:
    """Write the checkpoint atomically; returns its path."""
    tensors = {f"prefix.{name}": t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    for index, entries in optimizer.state_dict()["state"].items():
        for name, value in entries.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous().clone()
    run = {"config": config.to_json(), "state": state.to_json(), "identity": asdict(identity)}
    metadata = {"format": CHECKPOINT_FORMAT, "run": json.dumps(run)}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CHECKPOINT_NAME
    write_atomically(path, safetensors.torch.save(tensors, metadata=metadata))
    return path


def load_checkpoint(out_dir: Path) -> Checkpoint:
    """Read ``out_dir``'s checkpoint; raises ``CheckpointError`` if it is missing or not one of ours."""
    path = out_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist")
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path} is not a prefix-serve training checkpoint")
        run = json.loads(metadata["run"])
        config = TrainConfig.from_json(run["config"])
        state = TrainState.from_json(run["state"])
        identity = RunIdentity(**run["identity"])
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged file: any parse error becomes one clear message
        raise CheckpointError(f"{path} is damaged and cannot be resumed ({exc})") from None
    prefix_state = {name[len("prefix.") :]: t for name, t in tensors.items() if name.startswith("prefix.")}
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            optimizer_state.setdefault(int(index), {})[key] = tensor
    return Checkpoint(config, state, identity, prefix_state, optimizer_state)


def restore(checkpoint: Checkpoint, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the checkpoint's parameters into ``module`` and its AdamW state into ``optimizer``; raises
    ``CheckpointError`` if they are not the module's (other names or shapes)."""
    try:
        module.load_state_dict(checkpoint.prefix_state)
    except RuntimeError as exc:  # a model whose fingerprint matches but whose embeddings differ, say
        raise CheckpointError(f"the checkpoint's parameters do not fit this run: {exc}") from None
    groups = optimizer.state_dict()["param_groups"]  # the run's hyperparameters, rebuilt from its config
    optimizer.load_state_dict({"state": checkpoint.optimizer_state, "param_groups": groups})


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, fsync it, and rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
