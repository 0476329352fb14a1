"""Log-probabilities the model gives tokens: each generated token's (with the most likely alternatives at
its position), and a prompt's tokens' (OpenAI's ``echo``). They are the model's own log-softmax of its raw
logits for the row's prefix, in float32, before temperature or any top-k / top-p cut."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # alternatives a request may ask for per position (OpenAI's bound)


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-probability, and the ``top`` most likely tokens (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, top: Sequence[int]) -> list[TokenLogprob]:
    """``logits`` ``[N, V]`` at N positions, ``token_ids`` ``[N]`` the tokens there, ``top[i]`` how many
    alternatives position ``i`` reports."""
    logprobs = logits.float().log_softmax(dim=-1)  # [N, V]
    chosen = logprobs.gather(1, token_ids.view(-1, 1)).squeeze(1).tolist()
    most = max(top, default=0)
    best_values, best_ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0])
    best_values, best_ids = best_values.tolist(), best_ids.long().tolist()
    return [
        TokenLogprob(token, value, tuple(zip(best_ids[i][:k], best_values[i][:k], strict=True)))
        for i, (token, value, k) in enumerate(zip(token_ids.tolist(), chosen, top, strict=True))
    ]
