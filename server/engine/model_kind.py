"""What differs between a decoder-only and an encoder-decoder base model, for the engine: one seam.

The engine asks a model's kind what a row's decoder is fed as its prompt, what (if anything) a row's
prompt becomes before its first pass (an encoder-decoder's source: cross-attention keys and values), and
for the logits of a forward pass. ``DecoderOnly`` is every causal LM; ``EncoderDecoder``
(``encoder_decoder``) is T5 and BART.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from server.engine.lora_rows import LoraRows
from server.engine.paged_attention import PagedAttention


class ModelInputs(Protocol):
    """What a forward pass needs: the engine's ``PagedBatch`` (or a dense ``PrefillBatch``)."""

    cache: Cache
    paged: PagedAttention | None  # what attention reads from the KV pool; None: the cache holds it all
    lora: LoraRows | None  # the rows' LoRA updates (``lora_rows``); None: no row is on a LoRA task

    @property
    def input_ids(self) -> torch.Tensor: ...  # [B, Q]

    @property
    def input_positions(self) -> torch.Tensor: ...  # [B, Q]

    # the inputs whose logits are the rows' next-token logits (``logits_to_keep``): 1 (each row's last
    # column, dense) or ``[B]`` indices into one packed sequence
    last_inputs: int | torch.Tensor

    def model_kwargs(self, dtype: torch.dtype) -> dict[str, object]: ...  # the mask


class ModelKind(Protocol):
    """How the engine feeds one kind of base model."""

    extra_blocks_per_row: int  # KV blocks a row may take beyond its own tokens' and its prefix's

    def decoder_prompt(self, prompt_ids: Sequence[int]) -> Sequence[int]:
        """The tokens a row's decoder is fed before it generates."""
        ...

    def source(self, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the row keeps in the pool besides its own tokens: an encoder-decoder's cross-attention keys
        and values of the prompt, ``[layers, heads, S, head_dim]`` each; None for a decoder-only model."""
        ...

    def logits(self, batch: ModelInputs, *, every_position: bool) -> torch.Tensor:
        """One forward pass (inside ``reading_pool``): the rows' next-token logits ``[B, V]`` in float32,
        or with ``every_position`` every input's, ``[B, Q, V]`` (packed: ``[1, N, V]``)."""
        ...


@dataclass(frozen=True)
class DecoderOnly:
    """A causal LM: its prompt is its decoder's, and nothing else is kept."""

    model: PreTrainedModel
    extra_blocks_per_row: int = 0

    def decoder_prompt(self, prompt_ids: Sequence[int]) -> Sequence[int]:
        return prompt_ids

    def source(self, prompt_ids: Sequence[int]) -> None:
        return None

    def logits(self, batch: ModelInputs, *, every_position: bool) -> torch.Tensor:
        output = self.model(
            input_ids=batch.input_ids,
            position_ids=batch.input_positions,
            cache=batch.cache,
            use_cache=True,
            logits_to_keep=0 if every_position else batch.last_inputs,
            **batch.model_kwargs(self.model.dtype),
        )
        logits = output.logits  # [B, 1, V] dense, [1, B, V] packed, or every position's
        return logits.float() if every_position else logits.reshape(-1, logits.shape[-1]).float()
