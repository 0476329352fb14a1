"""What goes into the engine (a request) and what comes out (outputs, results)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prefix_store.lora import LoraAdapter
from prefix_store.prefix import Prefix
from server.engine.base_model import BaseModel
from server.engine.grammar import Grammar
from server.engine.lifecycle import FinishReason
from server.engine.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from server.engine.sampling import SamplingParams


class RequestTooLong(ValueError):
    """Prefix + prompt + max_new_tokens exceed the positions the model supports (``context``)."""

    def __init__(self, message: str, *, context: int) -> None:
        super().__init__(message)
        self.context = context


class RequestNotFinished(Exception):
    """A request ended without finishing (``reason``: aborted, deadline or error), which a caller waiting
    for its result must be told of."""

    def __init__(self, reason: FinishReason) -> None:
        super().__init__(f"the request ended: {reason.value}")
        self.reason = reason


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
    cache_salt: str | None = None  # only rows of the same salt share cached prompt blocks (None: no salt)
    # a resident LoRA task given by an in-process caller (like ``prefix``; a server's tasks are pinned)
    lora: LoraAdapter | None = None


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
    cached_tokens: int = 0  # prompt tokens whose keys and values were found cached, not computed


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
    cached_tokens: int = 0

    @classmethod
    def from_outputs(cls, outputs: Sequence[RequestOutput]) -> GenerationResult:
        """One result from a finished request's outputs."""
        last = outputs[-1]
        assert last.finish_reason is not None, "the request has not finished"
        return cls(
            request_id=last.request_id,
            token_ids=[token for output in outputs for token in output.token_ids],
            text="".join(output.text for output in outputs),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            logprobs=None
            if outputs[0].logprobs is None
            else [lp for o in outputs for lp in o.logprobs or ()],
            prompt_logprobs=next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None),
            cached_tokens=last.cached_tokens,
        )


def token_cost(request: GenerationRequest, prefix_length: int) -> int:
    """Prefix + prompt + max_new_tokens: the positions a request needs and the batch tokens it reserves."""
    return prefix_length + len(request.prompt_ids) + request.max_new_tokens


def context_room(base: BaseModel, prefix_length: int, prompt_length: int) -> int | None:
    """How many new tokens fit the model's positions after prefix + prompt; None: no limit. Below 0, not even
    the prompt fits. An encoder-decoder's source fills the encoder's positions (over them: -1), its prefix,
    decoder start and new tokens the decoder's."""
    if base.max_positions is None:
        return None
    if base.encoder_decoder is None:
        return base.max_positions - prefix_length - prompt_length
    if prompt_length > base.max_positions:
        return -1
    return base.max_positions - prefix_length - len(base.encoder_decoder.decoder_start_ids)


def check_fits(base: BaseModel, request: GenerationRequest, prefix_length: int) -> None:
    """The engine's own check of a request, once its prefix's length is known: ``RequestTooLong`` unless
    prefix + prompt + new tokens fit the model's positions, ``ValueError`` for a request no model could
    serve. The server plans every request before it comes here (``server.api.plan``); this guards the
    engine's invariants, and catches a task replaced by a longer prefix in between."""
    if not request.prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    if request.max_new_tokens < 0:
        raise ValueError("max_new_tokens must not be negative")
    for name in ("logprobs", "prompt_logprobs"):
        if not 0 <= (getattr(request, name) or 0) <= MAX_TOP_LOGPROBS:
            raise ValueError(f"{name} asks for at most {MAX_TOP_LOGPROBS} alternatives")
    if base.encoder_decoder is not None and request.prompt_logprobs is not None:
        raise ValueError(PROMPT_LOGPROBS_OF_A_SOURCE)
    if not 0 <= request.min_tokens <= request.max_new_tokens:
        raise ValueError("min_tokens must be between 0 and max_new_tokens")
    vocab = base.model.config.vocab_size
    token_ids = [*request.stop_token_ids, *(token for token, _ in request.sampling.logit_bias)]
    if any(not 0 <= token < vocab for token in token_ids):
        raise ValueError(f"token ids (stop_token_ids, logit_bias) must be in [0, {vocab})")
    room = context_room(base, prefix_length, len(request.prompt_ids))
    if room is None or request.max_new_tokens <= room:
        return
    assert base.max_positions is not None
    if base.encoder_decoder is not None:
        source, start = len(request.prompt_ids), len(base.encoder_decoder.decoder_start_ids)
        if source > base.max_positions:
            message = f"the prompt has {source} tokens, but the model's encoder supports {base.max_positions}"
        else:
            message = (
                f"prefix ({prefix_length}) + decoder start ({start}) + max_new_tokens ({request.max_new_tokens}) "
                f"= {prefix_length + start + request.max_new_tokens} decoder positions, but the model supports "
                f"{base.max_positions}"
            )
    else:
        message = (
            f"prefix ({prefix_length}) + prompt ({len(request.prompt_ids)}) + max_new_tokens "
            f"({request.max_new_tokens}) = {token_cost(request, prefix_length)} positions, but the model "
            f"supports {base.max_positions}"
        )
    raise RequestTooLong(message, context=base.max_positions)


# an encoder-decoder's prompt is its source: nothing predicts it
PROMPT_LOGPROBS_OF_A_SOURCE = (
    "prompt logprobs: an encoder-decoder model's prompt is its source, which it does not predict"
)
