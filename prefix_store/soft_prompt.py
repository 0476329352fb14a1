"""The in-memory value of one task's soft prompt, and what a task's learned conditioning is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from prefix_store.errors import PrefixValidationError
from prefix_store.formats.safetensors_check import all_finite
from prefix_store.geometry import ModelGeometry
from prefix_store.lora import LoraAdapter
from prefix_store.prefix import Prefix


@dataclass(frozen=True)
class SoftPrompt:
    """Learned input embeddings (PEFT ``PROMPT_TUNING`` / ``P_TUNING``) put before a row's prompt: the
    virtual tokens take positions 0…P-1 and the prompt follows, at P onwards.

    A row's virtual tokens see only each other (causal attention), so their keys and values are the same
    in every row of the task: the engine computes them once, as a ``Prefix`` (``server.engine.soft_prompts``).
    """

    embeddings: torch.Tensor  # [P, embedding_dim]

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def nbytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()

    def fits(self, geometry: ModelGeometry) -> bool:
        return self.embeddings.dim() == 2 and self.embeddings.shape[1] == geometry.embedding_dim

    def to(self, device: torch.device | str, dtype: torch.dtype) -> SoftPrompt:
        """A copy on ``device`` in ``dtype``; ``PrefixValidationError`` if a value does not survive the cast."""
        placed = SoftPrompt(self.embeddings.to(device=device, dtype=dtype))
        if self.embeddings.dtype != dtype and not all_finite(placed.embeddings):
            raise PrefixValidationError(
                f"the soft prompt has values too large for the server's dtype {dtype}"
            )
        return placed


Adapter = Prefix | SoftPrompt | LoraAdapter  # what a task conditions its rows with
Resident = Prefix | LoraAdapter  # what a task's rows read on the device (a soft prompt's are a prefix)
AdapterKind = Literal["prefix", "soft_prompt", "lora"]


def kind_of(adapter: Adapter) -> AdapterKind:
    """The ``kind`` docs/API.md names: ``prefix`` (keys and values of every layer), ``soft_prompt`` or
    ``lora`` (low-rank updates of projections)."""
    if isinstance(adapter, LoraAdapter):
        return "lora"
    return "soft_prompt" if isinstance(adapter, SoftPrompt) else "prefix"
