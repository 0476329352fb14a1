"""Initialisation by real-word activations (Li & Liang, 2021, §7.2): the frozen model's own K/V of a text.

The text is tokenised as a prompt would be and run through the frozen model with the engine's batch and
runner (no prefix, positions ``0 .. P-1``); each layer's cached keys (after rotary, as the cache stores
them) and values become the prefix. A prompt served after this prefix therefore sees exactly what it
would see after the text itself — training starts from a meaningful point instead of noise.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedTokenizerBase

from prefix_store.prefix import Prefix
from server.engine.base_model import BaseModel
from server.engine.runner import ModelRunner
from server.training.prefill_batch import BatchRow, PrefillBatch


def init_text_token_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, num_virtual_tokens: int | None
) -> list[int]:
    """The text's tokens, repeated or cut to ``num_virtual_tokens`` (PEFT's rule for text initialisation);
    all of them when ``num_virtual_tokens`` is None. Needs only the tokenizer, not the model's weights."""
    ids = list(tokenizer(text).input_ids)
    if not ids:
        raise ValueError("the init text has no tokens")
    if num_virtual_tokens is None:
        return ids
    return (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]


def prefix_from_text(base: BaseModel, token_ids: list[int]) -> Prefix:
    """The frozen model's per-layer keys and values of ``token_ids``: ``[layers, kv_heads, P, head_dim]``."""
    batch = PrefillBatch.from_rows(
        [BatchRow("init-text", token_ids, None)], base.geometry, base.device, base.dtype
    )
    ModelRunner(base).forward(batch)  # grows the cache by the text's keys and values
    # built outside inference mode: plain tensors that may become parameters
    keys = torch.stack([layer[0] for layer in batch.layer_keys]).float().cpu()
    values = torch.stack([layer[0] for layer in batch.layer_values]).float().cpu()
    return Prefix(keys.clone(), values.clone())
