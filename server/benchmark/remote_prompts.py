"""Prompts of a chosen length in the tokens of a server whose tokenizer the client does not have.

A few probes calibrate it: the server counts `` the`` once and 16 times, then each further probe word
16 times (``usage.prompt_tokens`` of a one-token request). That gives the tokens it adds to every
prompt (BOS, a leading-space token) and each probe word's tokens after a space; a prompt is then a
random sequence of those words whose counts add up to the length wanted. Byte-level BPE and
SentencePiece tokenizers count space-separated words additively, so the lengths are exact; the run
checks them against the usage the server reports for every request.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

# common English words, in the order they are probed: one token each for most English tokenizers
PROBE_WORDS = ("the", "of", "and", "to", "in", "is", "for", "with", "at", "you", "can", "do", "one", "no")
PROBE_REPEATS = 16  # times a probe word is repeated in its probe
ONE_TOKEN_WORDS = 4  # probing stops once this many words count as one token each

CountTokens = Callable[[str], Awaitable[int]]  # the server's prompt token count of a prompt


@dataclass(frozen=True)
class PromptBuilder:
    """Builds prompts of a given server-side token count out of words the server has counted."""

    offset: int  # tokens the server adds to every prompt
    word_tokens: dict[str, int]  # each palette word's tokens, after a space
    additive: bool  # every probe agreed with counting word by word (else lengths are approximate)
    probes: int  # requests the calibration sent

    @property
    def shortest(self) -> int:
        """The fewest tokens a prompt can have (one word)."""
        return self.offset + min(self.word_tokens.values())

    def prompt(self, tokens: int, rng: random.Random) -> str:
        """Random palette words counting ``tokens`` with the offset, or the nearest count below that
        the palette can make (never fewer than one word)."""
        costs = self.word_tokens
        left = tokens - self.offset
        makeable = [True] + [False] * max(left, 0)  # makeable[n]: some words count exactly n tokens
        for n in range(1, len(makeable)):
            makeable[n] = any(c <= n and makeable[n - c] for c in costs.values())
        n = next((n for n in range(max(left, 0), 0, -1) if makeable[n]), 0)
        words = []
        while n > 0:
            word = rng.choice([w for w, c in costs.items() if c <= n and makeable[n - c]])
            words.append(word)
            n -= costs[word]
        return "".join(f" {word}" for word in words or [min(costs, key=costs.__getitem__)])

    def to_json(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "word_tokens": self.word_tokens,
            "additive": self.additive,
            "probes": self.probes,
        }


async def calibrate(count_tokens: CountTokens) -> PromptBuilder:
    """Probe the server's token counts (``PROBE_WORDS`` until ``ONE_TOKEN_WORDS`` count one token)."""
    first = PROBE_WORDS[0]
    once = await count_tokens(f" {first}")
    repeated = {first: await count_tokens(f" {first}" * PROBE_REPEATS)}
    per_word = (repeated[first] - once) / (PROBE_REPEATS - 1)
    offset = once - max(1, round(per_word))
    additive = per_word == round(per_word) >= 1 and offset >= 0
    word_tokens: dict[str, int] = {}
    for word in PROBE_WORDS:
        if word not in repeated:
            repeated[word] = await count_tokens(f" {word}" * PROBE_REPEATS)
        tokens, remainder = divmod(repeated[word] - offset, PROBE_REPEATS)
        additive = additive and remainder == 0 and tokens >= 1
        word_tokens[word] = max(1, round((repeated[word] - offset) / PROBE_REPEATS))
        if sum(c == 1 for c in word_tokens.values()) >= ONE_TOKEN_WORDS:
            break
    return PromptBuilder(max(offset, 0), word_tokens, additive, probes=1 + len(repeated))
