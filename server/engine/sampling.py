"""Vectorised next-token sampling with per-row parameters and per-row random generators."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1.0 = no nucleus cut
    seed: int | None = None  # fixes the random stream of a sampled request, whatever its batch
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far (OpenAI)
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated so far (OpenAI)
    repetition_penalty: float = 1.0  # divides positive, multiplies negative logits of prompt and new tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def shapes_logits(self) -> bool:
        """Whether any penalty or bias changes the logits before the token is picked."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
        )

    def new_generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own random stream (None for greedy requests)."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return generator


def sample_next_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Pick one token per row from ``logits`` ``[B, V]`` (float32); returns ``[B]`` long.

    Each sampled row draws exactly one uniform number from its own generator per step and inverts
    its filtered distribution's CDF, so its tokens depend only on its own logits and seed, never on
    which rows share the batch.
    """
    greedy_tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy_tokens
    device = logits.device
    temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)

    sorted_logits, sorted_ids = torch.sort(logits / temperature[:, None], dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(logits.shape[-1], device=device)[None, :]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of all better-ranked tokens
    drop = (ranks >= top_k[:, None]) | (mass_before >= top_p[:, None])
    drop[:, 0] = False  # the best token always survives
    probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(dim=-1)  # [B, V], unnormalised

    uniforms = torch.stack(
        [
            torch.rand((), generator=g, device=device) if g is not None else torch.zeros((), device=device)
            for g in generators
        ]
    )  # [B]
    thresholds = (uniforms * cdf[:, -1]).unsqueeze(-1)
    picked_rank = torch.searchsorted(cdf, thresholds, right=True).clamp_(max=logits.shape[-1] - 1)
    sampled_tokens = sorted_ids.gather(-1, picked_rank).squeeze(-1)
    is_greedy = torch.tensor([p.greedy for p in params], device=device)
    return torch.where(is_greedy, greedy_tokens, sampled_tokens)
