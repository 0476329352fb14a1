"""The training forward pass, through the engine's own prefix injection.

Each example becomes a ``BatchRow`` whose "prompt" is prompt + completion and whose prefix is the
trainable prefix; ``PrefillBatch.from_rows`` then lays out exactly what the server lays out at prefill —
prefix keys/values in a transformers cache ``[B, kv_heads, P, head_dim]`` per layer, left padding,
position ``P + k`` for token ``k``, the 4-D additive mask — and the frozen model runs on it unmodified.
Its copies of the prefix into the cache are ordinary tensor writes, so gradients reach the prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from prefix_store.prefix import Prefix
from server.engine.base_model import BaseModel
from server.engine.prefill_batch import BatchRow, PrefillBatch
from server.training.data import Example

IGNORE = -100  # target of positions that carry no loss (prompt, padding)


def completion_logits(
    base: BaseModel, prefix: Prefix, examples: Sequence[Example]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for every completion token of ``examples`` under ``prefix`` (teacher forcing).

    Returns ``(logits [B, C, V] float32, targets [B, C] long)``, ``C`` the longest completion; targets of
    positions outside a row's completion are ``IGNORE``. Rows are right-aligned (left padding), so every
    completion ends in the last column and only the last ``C + 1`` positions' logits are computed.
    """
    rows = [
        BatchRow(str(i), example.prompt_ids + example.completion_ids, prefix)
        for i, example in enumerate(examples)
    ]
    batch = PrefillBatch.from_rows(rows, base.geometry, base.device, base.dtype)
    longest = max(len(example.completion_ids) for example in examples)
    output = base.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask(base.dtype),
        position_ids=batch.input_positions,
        cache=batch.cache,
        use_cache=True,
        logits_to_keep=longest + 1,
    )
    logits = output.logits[:, :-1].float()  # [B, C, V]: column j predicts input column Q - C + j
    targets = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    for i, example in enumerate(examples):
        targets[i, longest - len(example.completion_ids) :] = torch.tensor(example.completion_ids)
    return logits, targets.to(logits.device)


def completion_loss(base: BaseModel, prefix: Prefix, examples: Sequence[Example]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the completion tokens of ``examples``, and how many tokens that is."""
    logits, targets = completion_logits(base, prefix, examples)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())
