"""The training forward passes: a prefix through the engine's own injection, a soft prompt as PEFT runs it.

Prefix: each example becomes a ``BatchRow`` whose "prompt" is prompt + completion and whose prefix is the
trainable prefix; ``PrefillBatch.from_rows`` then lays out exactly what the server lays out at prefill —
prefix keys/values in a transformers cache ``[B, kv_heads, P, head_dim]`` per layer, left padding,
position ``P + k`` for token ``k``, the 4-D additive mask — and the frozen model runs on it unmodified.
Its copies of the prefix into the cache are ordinary tensor writes, so gradients reach the prefix.

Encoder-decoder prefix: PEFT's ``SEQ_2_SEQ_LM`` forward. The prompt is the encoder's source; the decoder
is fed its start token and the completion but its last token, each row's prefix keys and values already in
its self-attention cache (the cross-attention cache starts empty, as PEFT leaves it), so the decoder's
positions start after the prefix, as they do when the engine serves the prefix.

Soft prompt: PEFT's ``PROMPT_TUNING`` forward, ``inputs_embeds = cat(soft prompt, embed(tokens))``, with
the virtual tokens at positions ``0 … P-1`` and token ``k`` at ``P + k`` — the positions the engine gives
a soft prompt served as its prefix (``server.engine.soft_prompts``). Gradients reach the embeddings
through the model's own attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, EncoderDecoderCache

from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import SoftPrompt
from server.engine.base_model import BaseModel
from server.training.data import Example
from server.training.prefill_batch import BatchRow, PrefillBatch

IGNORE = -100  # target of positions that carry no loss (prompt, padding)


def completion_logits(
    base: BaseModel, prefix: Prefix, examples: Sequence[Example]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for every completion token of ``examples`` under ``prefix`` (teacher forcing).

    Returns ``(logits [B, C, V] float32, targets [B, C] long)``, ``C`` the longest completion; targets of
    positions outside a row's completion are ``IGNORE``. Rows are right-aligned (left padding), so every
    completion ends in the last column and only the last ``C + 1`` positions' logits are computed.
    """
    if base.encoder_decoder is not None:
        return _seq2seq_completion_logits(base, prefix, examples)
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
    return logits, _completion_targets(examples, longest).to(logits.device)


def _seq2seq_completion_logits(
    base: BaseModel, prefix: Prefix, examples: Sequence[Example]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``completion_logits`` of an encoder-decoder: sources and decoder inputs left-aligned (right padding,
    masked in the source, after every real input in the causal decoder), so targets are too."""
    device, batch_size = base.device, len(examples)
    starts = base.encoder_decoder.decoder_start_ids
    pad = base.model.config.pad_token_id or 0
    sources, source_mask = _left_aligned([example.prompt_ids for example in examples], pad)  # [B, S] each
    decoder_inputs, _ = _left_aligned(
        [(*starts, *example.completion_ids[:-1]) for example in examples], pad
    )  # [B, C + len(starts) - 1]
    self_attention = DynamicCache()
    for layer, (keys, values) in enumerate(zip(prefix.keys, prefix.values, strict=True)):
        shape = (batch_size, *keys.shape)  # [B, heads, P, head_dim]
        self_attention.update(keys.to(base.dtype).expand(shape), values.to(base.dtype).expand(shape), layer)
    output = base.model(
        input_ids=sources.to(device),
        attention_mask=source_mask.to(device),
        decoder_input_ids=decoder_inputs.to(device),
        cache=EncoderDecoderCache(self_attention, DynamicCache()),
        use_cache=True,
    )
    skip = len(starts) - 1  # the start tokens but the last predict nothing
    logits = output.logits[:, skip:].float()  # [B, C, V]: column j predicts completion token j
    targets = torch.full(logits.shape[:2], IGNORE, dtype=torch.long)
    for i, example in enumerate(examples):
        targets[i, : len(example.completion_ids)] = torch.tensor(example.completion_ids)
    return logits, targets.to(logits.device)


def _left_aligned(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, longest]`` each: the rows from column 0 with ``pad`` after them, and ones where a row is."""
    aligned = torch.full((len(rows), max(len(row) for row in rows)), pad, dtype=torch.long)
    mask = torch.zeros_like(aligned)
    for i, row in enumerate(rows):
        aligned[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return aligned, mask


def completion_loss(base: BaseModel, prefix: Prefix, examples: Sequence[Example]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the completion tokens of ``examples``, and how many tokens that is."""
    return _summed_loss(*completion_logits(base, prefix, examples))


def soft_prompt_completion_logits(
    base: BaseModel, soft_prompt: SoftPrompt, examples: Sequence[Example]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for every completion token of ``examples`` after ``soft_prompt`` (teacher forcing); returns
    what ``completion_logits`` returns.

    Row layout ``[ soft prompt (P) | pad | prompt + completion ]``: the virtual tokens fill the first P
    columns of every row (attention mask ones), so every query has a real key to attend to and no row of
    the mask is empty; the tokens are right-aligned, so every completion ends in the last column.
    """
    num_virtual_tokens, batch_size = soft_prompt.num_virtual_tokens, len(examples)
    width = max(example.num_tokens for example in examples)
    input_ids = torch.zeros(batch_size, width, dtype=torch.long)  # [B, T]
    token_mask = torch.zeros(batch_size, width, dtype=torch.long)
    positions = torch.zeros(batch_size, width, dtype=torch.long)  # 0 for padding
    for i, example in enumerate(examples):
        ids = example.prompt_ids + example.completion_ids
        start = width - len(ids)
        input_ids[i, start:] = torch.tensor(ids)
        token_mask[i, start:] = 1
        positions[i, start:] = torch.arange(num_virtual_tokens, num_virtual_tokens + len(ids))
    virtual = soft_prompt.embeddings.to(base.device, base.dtype)
    virtual = virtual.unsqueeze(0).expand(batch_size, -1, -1)  # [B, P, embedding_dim]
    tokens = base.model.get_input_embeddings()(input_ids.to(base.device))  # [B, T, embedding_dim]
    virtual_positions = torch.arange(num_virtual_tokens).expand(batch_size, -1)  # [B, P]
    longest = max(len(example.completion_ids) for example in examples)
    output = base.model(
        inputs_embeds=torch.cat([virtual, tokens], dim=1),
        attention_mask=torch.cat([torch.ones_like(virtual_positions), token_mask], dim=1).to(base.device),
        position_ids=torch.cat([virtual_positions, positions], dim=1).to(base.device),
        use_cache=False,
        logits_to_keep=longest + 1,
    )
    logits = output.logits[:, :-1].float()  # [B, C, V]: column j predicts input column P + T - C + j
    return logits, _completion_targets(examples, longest).to(logits.device)


def soft_prompt_completion_loss(
    base: BaseModel, soft_prompt: SoftPrompt, examples: Sequence[Example]
) -> tuple[torch.Tensor, int]:
    """``completion_loss`` after a soft prompt."""
    return _summed_loss(*soft_prompt_completion_logits(base, soft_prompt, examples))


def _completion_targets(examples: Sequence[Example], longest: int) -> torch.Tensor:
    """``[B, C]``: each row's completion right-aligned, ``IGNORE`` before it."""
    targets = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    for i, example in enumerate(examples):
        targets[i, longest - len(example.completion_ids) :] = torch.tensor(example.completion_ids)
    return targets


def _summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())
