"""The trainable LoRA task (``--method lora``, Hu et al., 2021): ``A`` ``[r, in]`` and ``B`` ``[out, r]`` per
target projection of the frozen base model, which computes ``base(x) + (alpha / r) · B(A x)`` — PEFT's
``LoraConfig`` parametrisation and initialisation (``A`` Kaiming-uniform, ``B`` zero: training starts from
the base model). What is exported is a ``LoraAdapter``: served by the engine in its batches, written as a
PEFT ``LORA`` folder that ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from prefix_store.geometry import ModelGeometry, Projection
from prefix_store.lora import LoraAdapter, LoraModule
from server.engine.base_model import BaseModel
from server.training.data import Example
from server.training.forward import completion_loss
from server.training.trained_params import TrainedParams


def target_projections(geometry: ModelGeometry, target_modules: Sequence[str] | None) -> list[Projection]:
    """The projections ``target_modules`` names as PEFT matches a list (a module path equal to a name or
    ending in ``.`` + name); None: every projection inside an attention block (a path component with
    ``attn`` or ``attention`` in it: Llama's q/k/v/o, GPT-2's ``c_attn`` and ``attn.c_proj``). Raises
    ``ValueError`` naming what matches nothing."""
    if target_modules is None:
        chosen = [
            p
            for p in geometry.projections
            if any("attn" in part or "attention" in part for part in p.name.split("."))
        ]
    else:
        chosen = [p for p in geometry.projections if any(_matches(p.name, t) for t in target_modules)]
        unmatched = [t for t in target_modules if not any(_matches(p.name, t) for p in geometry.projections)]
        if unmatched:
            known = sorted({p.name.rsplit(".", 1)[-1] for p in geometry.projections})
            raise ValueError(
                f"target modules {', '.join(unmatched)} match no projection of the model (its projections "
                f"end in: {', '.join(known)})"
            )
    if not chosen:
        raise ValueError("no projection of the model to train a LoRA on")
    return chosen


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


class TrainableLora(TrainedParams):
    """``A`` and ``B`` of each target projection as parameters, in the order of ``projections``."""

    def __init__(
        self,
        geometry: ModelGeometry,
        projections: Sequence[Projection],
        *,
        rank: int,
        alpha: float,
        seed: int,
    ) -> None:
        super().__init__()
        self.geometry, self.num_virtual_tokens = geometry, 0
        self.names = [p.name for p in projections]
        self.scaling, self.alpha = alpha / rank, alpha
        generator = torch.Generator().manual_seed(seed)
        self.a = nn.ParameterList(
            nn.Parameter(_kaiming_uniform(rank, p.in_features, generator)) for p in projections
        )  # each [r, in]
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(p.out_features, rank)) for p in projections)

    def completion_loss(self, base: BaseModel, examples: Sequence[Example]) -> tuple[torch.Tensor, int]:
        """The base model's own forward on the examples (no prefix), each target projection updated."""
        with self.applied(base.model):
            return completion_loss(base, None, examples)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Within the block, every target projection of ``model`` adds ``scaling · B(A x)`` (differentiably)."""
        handles = [
            model.get_submodule(name).register_forward_hook(self._hook(i))
            for i, name in enumerate(self.names)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, index: int):
        def add_update(
            _module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor:
            x = args[0].to(self.a[index].dtype)
            return output + ((x @ self.a[index].T) @ self.b[index].T * self.scaling).to(output.dtype)

        return add_update

    @torch.no_grad()
    def export(self) -> LoraAdapter:
        modules = {
            name: LoraModule(a.detach().float().cpu().clone(), b.detach().float().cpu().clone(), self.alpha)
            for name, a, b in zip(self.names, self.a, self.b, strict=True)
        }
        return LoraAdapter(modules)


def _kaiming_uniform(rows: int, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``lora_A`` initialisation: ``kaiming_uniform_(a=sqrt(5))``, a bound of ``1/sqrt(fan_in)``."""
    bound = 1 / math.sqrt(fan_in)
    return (torch.rand(rows, fan_in, generator=generator) * 2 - 1) * bound


def build_trainable_lora(
    base: BaseModel, target_modules: Sequence[str] | None, *, rank: int, alpha: float, seed: int
) -> TrainableLora:
    """The trainable LoRA of a new run on ``base``'s projections (``ValueError``: targets that match none)."""
    return TrainableLora(
        base.geometry, target_projections(base.geometry, target_modules), rank=rank, alpha=alpha, seed=seed
    )
