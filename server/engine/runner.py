"""The model runner: one forward pass of the frozen base model over a batch."""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.cache_utils import Cache

from server.engine.base_model import BaseModel
from server.engine.paged_attention import PagedAttention, reading_pool, use_paged_attention


class ModelInputs(Protocol):
    """What a forward pass needs: the engine's ``PagedBatch`` (or a dense ``PrefillBatch``)."""

    cache: Cache
    paged: PagedAttention | None  # what attention reads from the KV pool; None: the cache holds it all

    @property
    def input_ids(self) -> torch.Tensor: ...  # [B, Q]

    @property
    def input_positions(self) -> torch.Tensor: ...  # [B, Q]

    # the inputs whose logits are the rows' next-token logits (``logits_to_keep``): 1 (each row's last
    # column, dense) or ``[B]`` indices into one packed sequence
    last_inputs: int | torch.Tensor

    def model_kwargs(self, dtype: torch.dtype) -> dict[str, object]: ...  # the mask


class ModelRunner:
    """Executes forward passes; owns no scheduling or sampling decisions."""

    def __init__(self, base: BaseModel) -> None:
        """Switches the model to ``paged_attention`` (plain SDPA for anything but a ``PagedBatch``); raises
        ``ValueError`` for a model whose attention cannot be switched."""
        use_paged_attention(base.model)
        self.base = base

    @torch.inference_mode()
    def forward(self, batch: ModelInputs, *, every_position: bool = False) -> torch.Tensor:
        """Run the batch's inputs through the model, growing its cache; returns next-token logits ``[B, V]``
        in float32, taken at each row's last input (``batch.last_inputs``), or with ``every_position`` the
        logits at every input, ``[B, Q, V]`` (a packed batch: ``[1, N, V]``)."""
        with reading_pool(batch.paged):
            output = self.base.model(
                input_ids=batch.input_ids,
                position_ids=batch.input_positions,
                cache=batch.cache,
                use_cache=True,
                logits_to_keep=0 if every_position else batch.last_inputs,
                **batch.model_kwargs(self.base.dtype),
            )
        logits = output.logits  # [B, 1, V] dense, [1, B, V] packed, or every position's
        return logits.float() if every_position else logits.reshape(-1, logits.shape[-1]).float()
