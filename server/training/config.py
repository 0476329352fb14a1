"""The options of one training run, as a frozen value (built at the CLI edge, stored in checkpoints)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

LrSchedule = Literal["constant", "linear"]
Method = Literal["prefix", "prompt-tuning", "lora"]
METHODS: tuple[Method, ...] = ("prefix", "prompt-tuning", "lora")

# Options of the prefix method alone: a soft prompt has no projection MLP and starts from token embeddings.
PREFIX_ONLY = ("prefix_projection", "projection_hidden", "init_std")
# Options of the virtual-token methods (a LoRA adds no tokens), and of the LoRA method alone.
VIRTUAL_TOKEN_ONLY = ("num_virtual_tokens", "init_text")
LORA_ONLY = ("lora_r", "lora_alpha", "target_modules")
_METHOD_OPTIONS = (  # options, the methods they belong to, why another method refuses them
    (
        PREFIX_ONLY,
        ("prefix",),
        "options of the prefix method only (a soft prompt has no projection MLP and starts from token "
        "embeddings; a LoRA has no prefix)",
    ),
    (
        VIRTUAL_TOKEN_ONLY,
        ("prefix", "prompt-tuning"),
        "options of the virtual-token methods (a LoRA adds no tokens)",
    ),
    (LORA_ONLY, ("lora",), "options of the lora method only"),
)

# A run that gives no warm-up warms up over a tenth of its steps, at most this many: long runs keep the
# old fixed 10 steps, short ones still reach the peak learning rate (4 steps: no warm-up at all).
MAX_DEFAULT_WARMUP_STEPS = 10

# Options that may differ when a run is resumed: how long to go on, not what is trained.
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps"})


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a training run. Defaults suit small tasks on the demo model."""

    method: Method = "prefix"  # what is learned: a prefix (keys, values per layer), a soft prompt or a LoRA
    num_virtual_tokens: int = 20  # P: prefix length per layer, or the soft prompt's
    epochs: int = 3  # passes over the training data (the total, counting resumed epochs)
    lr: float = 1e-2  # peak learning rate of AdamW
    batch_size: int = 8  # examples per optimiser step
    seed: int = 0  # initialisation and data order
    warmup_steps: int | None = None  # linear warm-up from 0 to `lr`; None: default_warmup_steps of the run
    lr_schedule: LrSchedule = "linear"  # after warm-up: linear decay to 0 at the last step, or constant
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm); 0 = no clipping
    prefix_projection: bool = False  # reparameterise through an MLP (folded away at export)
    projection_hidden: int = 512  # hidden width of that MLP (the paper's 512)
    init_text: str | None = None  # from the frozen model's K/V (soft prompt: embeddings) of this text
    init_std: float = 1.0  # std of a random prefix (PEFT's nn.Embedding default)
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimiser steps in total
    lora_r: int = 8  # --method lora: the rank of every update
    lora_alpha: float = 16.0  # --method lora: the updates are scaled by lora_alpha / lora_r
    # --method lora: projections by name, as PEFT's target_modules list (None: the attention projections)
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        positive = ("num_virtual_tokens", "epochs", "batch_size", "projection_hidden", "lora_r")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must not be negative, got {self.warmup_steps}")
        if self.lr_schedule not in ("constant", "linear"):
            raise ValueError(f"lr_schedule must be 'constant' or 'linear', got {self.lr_schedule!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError("init_text must not be empty")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha}")
        if self.target_modules is not None and not all(name.strip() for name in self.target_modules):
            raise ValueError("target_modules must name projections (no empty names)")
        defaults = {field.name: field.default for field in fields(self)}
        for options, owners, why in _METHOD_OPTIONS:  # given to another method, they would be ignored
            changed = [name for name in options if getattr(self, name) != defaults[name]]
            if self.method not in owners and changed:
                raise ValueError(f"{', '.join(changed)}: {why}; leave them out with method {self.method}")

    def steps_per_epoch(self, num_examples: int) -> int:
        return math.ceil(num_examples / self.batch_size)

    def total_steps(self, num_examples: int) -> int:
        """Optimiser steps of the whole schedule (``max_steps`` may stop the run earlier)."""
        return self.steps_per_epoch(num_examples) * self.epochs

    def effective_warmup_steps(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else default_warmup_steps(total_steps)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {field.name for field in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if values.get("target_modules") is not None:
            values["target_modules"] = tuple(values["target_modules"])  # JSON keeps a list
        return cls(**values)


def default_warmup_steps(total_steps: int) -> int:
    """The warm-up of a run that gives none: a tenth of its steps, at most ``MAX_DEFAULT_WARMUP_STEPS``."""
    return min(MAX_DEFAULT_WARMUP_STEPS, total_steps // 10)
