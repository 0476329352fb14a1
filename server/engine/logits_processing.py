"""What changes a row's logits before its token is picked, on the rows that ask (each row's work vectorised):
OpenAI's presence and frequency penalties and ``logit_bias``, the repetition penalty of vLLM and
transformers, a grammar's allowed tokens (structured output), and the tokens a row may not end with yet
(end-of-sequence and stop tokens before its ``min_tokens``). Rows that ask for none of it are returned
untouched, at no cost. Logprobs are taken before any of this: they are the model's own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from server.engine.sampling import SamplingParams


@dataclass(frozen=True)
class RowHistory:
    """What a row has seen: its prompt and the tokens generated so far, and the tokens it may not pick now."""

    prompt_ids: Sequence[int]
    generated_ids: Sequence[int]
    banned_ids: frozenset[int] = frozenset()
    allowed: torch.Tensor | None = None  # [V] bool: the only tokens its grammar allows now


def process_logits(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[RowHistory]
) -> torch.Tensor:
    """``logits`` ``[B, V]`` float32 with each row's penalties, bias and bans applied (a new tensor when any
    row has some, else ``logits`` itself)."""
    rows = [
        i
        for i, (p, h) in enumerate(zip(params, histories, strict=True))
        if p.shapes_logits or h.banned_ids or h.allowed is not None
    ]
    if not rows:
        return logits
    logits = logits.clone()
    vocab, device = logits.shape[-1], logits.device
    for i in rows:  # per row: each row's histories differ in length; the work per row is vectorised
        p, h, row = params[i], histories[i], logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({*h.prompt_ids, *h.generated_ids}), dtype=torch.long, device=device)
            scores = row[seen]
            row[seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and h.generated_ids:
            counts = torch.bincount(torch.tensor(h.generated_ids, device=device), minlength=vocab).float()
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if p.logit_bias:
            ids = torch.tensor([token for token, _ in p.logit_bias], dtype=torch.long, device=device)
            row.index_add_(0, ids, torch.tensor([bias for _, bias in p.logit_bias], device=device))
        if h.banned_ids:
            row[torch.tensor(sorted(h.banned_ids), dtype=torch.long, device=device)] = float("-inf")
        if h.allowed is not None:
            row.masked_fill_(~h.allowed, float("-inf"))
    return logits
