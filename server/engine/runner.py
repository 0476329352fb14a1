"""The model runner: one forward pass of the frozen base model over a batch."""

from __future__ import annotations

import torch

from server.engine.base_model import BaseModel
from server.engine.lora_rows import LoraProjections
from server.engine.model_kind import ModelInputs
from server.engine.paged_attention import reading_pool, use_paged_attention


class ModelRunner:
    """Executes forward passes; owns no scheduling or sampling decisions."""

    def __init__(self, base: BaseModel) -> None:
        """Switches the model to ``paged_attention`` (plain SDPA for anything but a ``PagedBatch``); raises
        ``ValueError`` for a model whose attention cannot be switched."""
        use_paged_attention(base.model)
        self.base = base
        self.lora = LoraProjections(base.model)

    @torch.inference_mode()
    def forward(self, batch: ModelInputs, *, every_position: bool = False) -> torch.Tensor:
        """Run the batch's inputs through the model, growing its cache; returns next-token logits ``[B, V]``
        in float32, taken at each row's last input (``batch.last_inputs``), or with ``every_position`` the
        logits at every input, ``[B, Q, V]`` (a packed batch: ``[1, N, V]``)."""
        with reading_pool(batch.paged), self.lora.applying(batch.lora):
            return self.base.kind.logits(batch, every_position=every_position)
