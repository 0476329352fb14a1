"""The model runner: one forward pass of the frozen base model over a batch."""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.cache_utils import Cache

from server.engine.base_model import BaseModel


class ModelInputs(Protocol):
    """What a forward pass needs: the engine's ``PagedBatch`` (or a dense ``PrefillBatch``)."""

    cache: Cache

    @property
    def input_ids(self) -> torch.Tensor: ...  # [B, Q]

    @property
    def input_positions(self) -> torch.Tensor: ...  # [B, Q]

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor: ...  # [B, 1, Q, S + Q] additive


class ModelRunner:
    """Executes forward passes; owns no scheduling or sampling decisions."""

    def __init__(self, base: BaseModel) -> None:
        self.base = base

    @torch.inference_mode()
    def forward(self, batch: ModelInputs) -> torch.Tensor:
        """Run the batch's inputs through the model, growing its cache; returns next-token logits ``[B, V]``
        in float32, taken at each row's last input (always a real token: inputs are left-padded)."""
        output = self.base.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask(self.base.dtype),
            position_ids=batch.input_positions,
            cache=batch.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1, :].float()
