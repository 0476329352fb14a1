"""The training loop: AdamW on the method's parameters only, the base model frozen and checked to stay so.

One step: teacher-forced completion loss of the trained parameters (``TrainedParams.completion_loss``: a
prefix, through the MLP if reparameterised, through the engine's injection; a soft prompt before the
tokens' embeddings) → backward → check that no base parameter received a gradient → clip → set the
learning rate for this step (linear warm-up, then constant or linear decay) → AdamW step. After every
epoch: evaluation loss on ``--eval-data``, a checkpoint, a report. The data order depends on the seed and
the epoch only, and the learning rate on the step only, so a resumed run continues exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from server.engine.base_model import BaseModel
from server.training.checkpoint import EpochRecord, RunIdentity, TrainState, save_checkpoint
from server.training.config import TrainConfig
from server.training.data import Dataset, Example, epoch_batches, in_order_batches
from server.training.trained_params import TrainedParams


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of 0-based optimiser step ``step``: warm-up, then constant or linear decay."""
    warmup = config.effective_warmup_steps(total_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_schedule == "linear":
        remaining = max(0, total_steps - step)
        return config.lr * remaining / max(1, total_steps - warmup)
    return config.lr


def build_optimizer(module: TrainedParams, config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )


def assert_base_untouched(base_parameters: Sequence[torch.nn.Parameter]) -> None:
    """The method's one invariant: only its own parameters learn. A base parameter that could learn, or
    that received a gradient, is a bug, and training stops rather than go on with a moving base."""
    touched = sum(1 for p in base_parameters if p.requires_grad or p.grad is not None)
    if touched:
        raise RuntimeError(f"{touched} base-model parameters received gradients; the base must stay frozen")


@dataclass(frozen=True)
class LoopResult:
    state: TrainState
    finished: bool  # all epochs done (False: stopped by max_steps)


class PrefixTrainer:
    """Trains one prefix or soft prompt; owns the optimiser and the run's state, writes per-epoch checkpoints."""

    def __init__(
        self,
        base: BaseModel,
        config: TrainConfig,
        module: TrainedParams,
        optimizer: torch.optim.Optimizer,
        train: Dataset,
        evaluation: Dataset | None,
        *,
        out_dir: Path,
        identity: RunIdentity,
        state: TrainState | None = None,
        progress: bool = True,
        on_epoch: Callable[[EpochRecord, int], None] | None = None,
    ) -> None:
        self.base = base
        self.config = config
        self.module = module
        self.optimizer = optimizer
        self.train = train
        self.evaluation = evaluation
        self.out_dir = out_dir
        self.identity = identity
        self.state = state or TrainState()
        self.progress = progress
        self.on_epoch = on_epoch
        self.total_steps = config.total_steps(len(train))
        self._base_parameters = list(base.model.parameters())
        base.model.eval().requires_grad_(False)  # frozen, and no dropout: the served model is in eval mode

    def run(self) -> LoopResult:
        """Train until ``config.epochs`` epochs are done or ``config.max_steps`` steps are taken."""
        state, config = self.state, self.config
        while state.epoch < config.epochs:
            batches = epoch_batches(
                self.train.examples, config.batch_size, seed=config.seed, epoch=state.epoch
            )
            with tqdm(
                total=len(batches),
                initial=state.batch_in_epoch,
                desc=f"epoch {state.epoch + 1}/{config.epochs}",
                unit="step",
                disable=not self.progress,
                leave=False,
                dynamic_ncols=True,
            ) as bar:
                for batch in batches[state.batch_in_epoch :]:
                    if self._step_limit_reached():
                        self._save()
                        return LoopResult(state, finished=False)
                    self._train_step(batch)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{state.epoch_loss_sum / max(1, state.epoch_loss_tokens):.4f}",
                        tok_s=f"{state.epoch_tokens / max(state.epoch_seconds, 1e-9):,.0f}",
                        lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                    )
            self._finish_epoch()
        return LoopResult(state, finished=True)

    def _step_limit_reached(self) -> bool:
        return self.config.max_steps is not None and self.state.global_step >= self.config.max_steps

    def _train_step(self, batch: list[Example]) -> None:
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, num_targets = self.module.completion_loss(self.base, batch)
        (loss_sum / num_targets).backward()
        assert_base_untouched(self._base_parameters)
        parameters = [p for p in self.module.parameters() if p.requires_grad]
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, self.config.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, self.state.global_step, self.total_steps)
        self.optimizer.step()
        state = self.state
        state.global_step += 1
        state.batch_in_epoch += 1
        state.epoch_loss_sum += float(loss_sum.detach())
        state.epoch_loss_tokens += num_targets
        state.epoch_tokens += sum(example.num_tokens for example in batch)
        state.epoch_seconds += time.perf_counter() - started

    def _finish_epoch(self) -> None:
        state = self.state
        record = EpochRecord(
            epoch=state.epoch + 1,
            train_loss=state.epoch_loss_sum / max(1, state.epoch_loss_tokens),
            eval_loss=self.evaluate() if self.evaluation is not None else None,
            tokens_per_second=state.epoch_tokens / max(state.epoch_seconds, 1e-9),
            seconds=state.epoch_seconds,
        )
        state.history.append(record)
        state.epoch += 1
        state.batch_in_epoch = 0
        state.epoch_loss_sum, state.epoch_loss_tokens = 0.0, 0
        state.epoch_tokens, state.epoch_seconds = 0, 0.0
        self._save()
        if self.on_epoch is not None:
            self.on_epoch(record, self.config.epochs)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean completion-token cross-entropy on the evaluation data under the current parameters."""
        assert self.evaluation is not None
        total, tokens = 0.0, 0
        for batch in in_order_batches(self.evaluation.examples, self.config.batch_size):
            loss_sum, num_targets = self.module.completion_loss(self.base, batch)
            total += float(loss_sum)
            tokens += num_targets
        return total / max(1, tokens)

    def _save(self) -> None:
        save_checkpoint(self.out_dir, self.config, self.state, self.identity, self.module, self.optimizer)
