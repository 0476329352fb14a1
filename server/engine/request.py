"""What goes into the engine (a request) and what comes out (outputs, results)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prefix_store.prefix import Prefix
from server.engine.base_model import BaseModel
from server.engine.grammar import Grammar
from server.engine.lifecycle import FinishReason
from server.engine.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from server.engine.sampling import SamplingParams


class RequestTooLong(ValueError):
    """Prefix + prompt + max_new_tokens exceed the positions the model supports."""


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the engine sees it: already tokenised."""

    request_id: str
    prompt_ids: Sequence[int]
    # a resident prefix (device, model dtype) given by an in-process caller (tests, benchmarks); the server
    # gives ``task_id`` instead and the engine pins the task's prefix. None and no task: the base model.
    prefix: Prefix | None
    sampling: SamplingParams
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks, reference checks)
    tenant: str = "default"
    task_id: str | None = None
    deadline: float | None = None  # time.monotonic() by which it must finish; None = no deadline
    logprobs: int | None = None  # each new token's log-probability and this many alternatives; None = none
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (the first has none); None = none
    min_tokens: int = 0  # no end-of-sequence or stop token before this many new tokens
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the request (finish reason ``stop``)
    grammar: Grammar | None = None  # structured output: the new tokens follow it (compiled off the loop)


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    token_ids: list[int]  # tokens new in this output
    text: str  # text new in this output (held back while it could still start a stop sequence)
    finish_reason: FinishReason | None  # set on the request's last output
    prompt_tokens: int
    completion_tokens: int  # generated so far
    logprobs: list[TokenLogprob] | None = None  # one per token of ``token_ids``, if the request asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, when the prompt has been read


@dataclass(frozen=True)
class GenerationResult:
    """A finished request, all outputs together."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


def token_cost(request: GenerationRequest, prefix_length: int) -> int:
    """Prefix + prompt + max_new_tokens: the positions a request needs and the batch tokens it reserves."""
    return prefix_length + len(request.prompt_ids) + request.max_new_tokens


def check_fits(base: BaseModel, request: GenerationRequest, prefix_length: int) -> None:
    """Raise ``RequestTooLong`` unless prefix + prompt + new tokens fit the model's positions (and
    ``ValueError`` for a request no model could serve)."""
    if not request.prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    if request.max_new_tokens < 0:
        raise ValueError("max_new_tokens must not be negative")
    for name in ("logprobs", "prompt_logprobs"):
        if not 0 <= (getattr(request, name) or 0) <= MAX_TOP_LOGPROBS:
            raise ValueError(f"{name} asks for at most {MAX_TOP_LOGPROBS} alternatives")
    if base.encoder_decoder is not None and request.prompt_logprobs is not None:
        raise ValueError(
            "prompt logprobs: an encoder-decoder model's prompt is its source, which it does not predict"
        )
    if not 0 <= request.min_tokens <= request.max_new_tokens:
        raise ValueError("min_tokens must be between 0 and max_new_tokens")
    vocab = base.model.config.vocab_size
    token_ids = [*request.stop_token_ids, *(token for token, _ in request.sampling.logit_bias)]
    if any(not 0 <= token < vocab for token in token_ids):
        raise ValueError(f"token ids (stop_token_ids, logit_bias) must be in [0, {vocab})")
    if base.max_positions is None:
        return
    if base.encoder_decoder is not None:  # the source fills the encoder's positions, the rest the decoder's
        source, start = len(request.prompt_ids), len(base.encoder_decoder.decoder_start_ids)
        decoder = prefix_length + start + request.max_new_tokens
        if source > base.max_positions:
            raise RequestTooLong(
                f"the prompt has {source} tokens, but the model's encoder supports {base.max_positions}"
            )
        if decoder > base.max_positions:
            raise RequestTooLong(
                f"prefix ({prefix_length}) + decoder start ({start}) + max_new_tokens ({request.max_new_tokens}) "
                f"= {decoder} decoder positions, but the model supports {base.max_positions}"
            )
        return
    needed = token_cost(request, prefix_length)
    if needed > base.max_positions:
        raise RequestTooLong(
            f"prefix ({prefix_length}) + prompt ({len(request.prompt_ids)}) + max_new_tokens "
            f"({request.max_new_tokens}) = {needed} positions, but the model supports {base.max_positions}"
        )
