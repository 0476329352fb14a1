"""One record per request inside the engine, from ``add_request`` to its last output: the request as
given, where it is in its lifecycle, its token reservation, its prefix pin, and its generation state.
The scheduler queues these records, the core's prefilling and decoding lists hold them as rows, and the
core ends them — giving back the pin and the KV blocks exactly once — so no second map has to agree with
the first."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from prefix_store.cache.registry import PrefixHandle
from prefix_store.lora import LoraAdapter
from prefix_store.prefix import Prefix
from server.engine.grammar import GrammarMatcher
from server.engine.lifecycle import RequestStatus
from server.engine.logprobs import TokenLogprob
from server.engine.paged_batch import RowKV
from server.engine.request import GenerationRequest
from server.engine.stopping import CompletionTracker


@dataclass(eq=False)
class EngineRequest:
    request: GenerationRequest
    # what the row's decoder is fed before it generates: the prompt, or an encoder-decoder's decoder start
    # (its prompt is then the encoder's source)
    decoder_prompt: Sequence[int]
    tracker: CompletionTracker  # tokens, text, stop criteria, finish reason
    cost_tokens: int  # prefix + prompt + max_new_tokens (``token_cost``): what the row may occupy
    status: RequestStatus
    # rows of one tenant on one prefix content hold its blocks once: its tokens are reserved once for them all
    shared_key: str | None = None
    shared_tokens: int = 0  # of ``cost_tokens``, the prefix's
    pin: PrefixHandle | None = None  # the task's prefix, pinned in the device cache until the request ends
    generator: torch.Generator | None = None  # seeded sampling's random state, made on first use
    reported: int = 0  # tokens already handed out in outputs
    kv: RowKV | None = None  # the row's blocks in the KV pool, from admission until it ends
    cached_tokens: int = 0  # prompt tokens found cached at admission (prompt caching)
    next_token: int = 0  # the sampled token its next decode step feeds
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of each generated token (if asked)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # as the prompt's chunks are read (if asked)
    prompt_logprobs_sent: bool = False
    matcher: GrammarMatcher | None = None  # where the new tokens are in the request's grammar (if any)

    @property
    def num_computed_tokens(self) -> int:
        """The row's tokens whose keys and values are in the pool, found cached or computed (its prompt's,
        then the generated ones fed back): the one count of how far it has got."""
        return self.kv.length if self.kv is not None else 0

    @property
    def prompt_left(self) -> int:
        """Prompt tokens still to prefill."""
        return max(0, len(self.decoder_prompt) - self.num_computed_tokens)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def task_id(self) -> str | None:
        return self.request.task_id

    @property
    def deadline(self) -> float | None:
        return self.request.deadline

    @property
    def conditioning(self) -> str:
        """What conditions the row's keys and values besides the base model and its tokens (``conditioning``)."""
        return conditioning(self.pin, self.request.prefix, self.request.lora)

    @property
    def prefix(self) -> Prefix | None:
        """The pinned task's prefix, else the one an in-process caller gave, else None (the base model)."""
        return self.pin.prefix if self.pin is not None else self.request.prefix

    @property
    def lora(self) -> LoraAdapter | None:
        """The pinned task's LoRA updates, else the ones an in-process caller gave, else None."""
        return self.pin.lora if self.pin is not None else self.request.lora


def conditioning(pin: PrefixHandle | None, prefix: Prefix | None, lora: LoraAdapter | None = None) -> str:
    """A row's conditioning by content: a pinned task version's kind and sha256 (never the task's name: a
    hot swap keeps the name and changes the content), an in-process prefix's or LoRA task's digest (a LoRA
    changes every layer's keys and values), or "base"."""
    if pin is not None:
        return f"{pin.record.kind}:{pin.record.sha256}"
    if prefix is not None:
        return f"prefix:{prefix.digest}"
    if lora is not None:
        return f"lora:{lora.digest}"
    return "base"
