"""The in-memory value of one LoRA task: low-rank updates of some of the base model's projections.

A wrapped projection computes ``base(x) + scaling · B(A x)`` (PEFT's unmerged LoRA forward), with
``scaling`` = ``alpha / r``, or ``alpha / sqrt(r)`` under rank-stabilised LoRA (``use_rslora``).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch

from prefix_store.errors import PrefixValidationError
from prefix_store.formats.safetensors_check import all_finite
from prefix_store.geometry import ModelGeometry

_uids = itertools.count()


@dataclass(frozen=True)
class LoraModule:
    """One projection's update."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA task: an update per adapted projection, by module path (``Projection.name``)."""

    modules: Mapping[str, LoraModule]
    use_rslora: bool = False
    # names this object among the adapters of a pass (the engine keys its stacked weights by it)
    uid: int = field(default_factory=lambda: next(_uids), compare=False, repr=False)

    num_virtual_tokens = 0  # a LoRA task adds no tokens to its rows

    def scaling(self, module: LoraModule) -> float:
        """What ``B(A x)`` is multiplied by for ``module`` (PEFT's ``LoraLayer.scaling``)."""
        return module.alpha / (math.sqrt(module.rank) if self.use_rslora else module.rank)

    @property
    def max_rank(self) -> int:
        return max(module.rank for module in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(
            m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in self.modules.values()
        )

    @cached_property
    def digest(self) -> str:
        """A sha256 of every module's name, alpha, shapes, dtype and bytes: what names an in-process
        adapter's content (a stored version's sha256 names a task's). Computed once."""
        content = hashlib.sha256(f"rslora={self.use_rslora}".encode())
        for name in sorted(self.modules):
            module = self.modules[name]
            content.update(f"{name}|{module.alpha!r}|{tuple(module.a.shape)}|{module.a.dtype}".encode())
            for tensor in (module.a, module.b):
                content.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return content.hexdigest()

    def fits(self, geometry: ModelGeometry) -> bool:
        """Whether every module is a projection of the model with shapes ``[r, in]`` and ``[out, r]``."""
        for name, module in self.modules.items():
            projection = geometry.projection_by_name.get(name)
            if projection is None or module.a.dim() != 2 or module.b.dim() != 2:
                return False
            if tuple(module.a.shape) != (module.rank, projection.in_features):
                return False
            if tuple(module.b.shape) != (projection.out_features, module.rank):
                return False
        return bool(self.modules)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraAdapter:
        """A copy on ``device`` in ``dtype`` (same ``uid``: the same adapter); ``PrefixValidationError`` if
        a value does not survive the cast."""
        placed = {
            name: LoraModule(m.a.to(device=device, dtype=dtype), m.b.to(device=device, dtype=dtype), m.alpha)
            for name, m in self.modules.items()
        }
        if any(m.a.dtype != dtype or m.b.dtype != dtype for m in self.modules.values()) and not all(
            all_finite(m.a) and all_finite(m.b) for m in placed.values()
        ):
            raise PrefixValidationError(f"the LoRA task has values too large for the server's dtype {dtype}")
        return LoraAdapter(placed, self.use_rslora, self.uid)
