"""Workloads: how many requests, their prompt and output lengths, which task each asks for. The same
shapes become engine requests (random token ids) or HTTP bodies (random words)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.benchmark.settings import WorkloadSpec
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from prefix_store.prefix import Prefix

_COMMON_WORDS = (  # prompts of random common words: about one token each for an English BPE
    "the of and to in is was for on that with as by at from his her an have not are this but had they "
    "which one you were all we she there their been has when who will more if no out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state good very make world"
)
WORDS = tuple(_COMMON_WORDS.split())


@dataclass(frozen=True)
class RequestShape:
    request_id: str
    task_id: str | None  # None: the base model, no prefix
    prompt_length: int
    max_new_tokens: int


def sample_shapes(
    spec: WorkloadSpec, tasks: Sequence[str | None], *, random_tasks: bool = False
) -> list[RequestShape]:
    """``spec.requests`` shapes; tasks round-robin (every task equally often), or drawn uniformly."""
    rng = random.Random(spec.seed)
    return [
        RequestShape(
            request_id=f"r{spec.seed}-{i}",
            task_id=rng.choice(tasks) if random_tasks else tasks[i % len(tasks)],
            prompt_length=rng.randint(*spec.prompt_tokens),
            max_new_tokens=rng.randint(*spec.new_tokens),
        )
        for i in range(spec.requests)
    ]


def engine_requests(
    shapes: Sequence[RequestShape], prefixes: Mapping[str, Prefix], *, vocab_size: int, seed: int = 0
) -> list[GenerationRequest]:
    """Greedy requests of random token ids that run to ``max_new_tokens``, prefixes attached."""
    rng = random.Random(seed)
    return [
        GenerationRequest(
            request_id=shape.request_id,
            prompt_ids=[rng.randrange(2, vocab_size) for _ in range(shape.prompt_length)],
            prefix=prefixes[shape.task_id] if shape.task_id is not None else None,
            sampling=SamplingParams(),
            max_new_tokens=shape.max_new_tokens,
            ignore_eos=True,
            task_id=shape.task_id,
        )
        for shape in shapes
    ]


def http_bodies(shapes: Sequence[RequestShape], words: Sequence[str], *, seed: int = 0) -> list[dict]:
    """``POST /v1/generate`` bodies: prompts of ``prompt_length`` random words (about as many tokens)."""
    rng = random.Random(seed)
    return [
        {
            "task_id": shape.task_id,
            "prompt": " ".join(rng.choice(words) for _ in range(shape.prompt_length)),
            "max_new_tokens": shape.max_new_tokens,
        }
        for shape in shapes
    ]


def single_token_words(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """Words the tokenizer encodes (after a space) as one token, so that an HTTP prompt of N words is
    about N tokens, as the engine-level runs' prompts are; ``WORDS`` if it has too few."""
    words = []
    for token in tokenizer.get_vocab():
        word = tokenizer.convert_tokens_to_string([token])
        if word.startswith(" ") and word[1:].isalpha() and len(tokenizer(word).input_ids) == 1:
            words.append(word[1:])
    return tuple(sorted(words)) if len(words) >= 20 else WORDS
