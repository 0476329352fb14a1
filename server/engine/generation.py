"""Prefix-conditioned generation for a static batch of requests.

Each request names its own prefix (or none), prompt, sampling parameters and stop criteria; all
rows share one forward pass per step and leave the batch as soon as they finish.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prefix_store import Prefix
from server.engine.base_model import BaseModel
from server.engine.batch import BatchRow, PrefixBatch
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams, sample_next_tokens
from server.engine.stopping import CompletionTracker, FinishReason, StopCriteria


class RequestTooLong(ValueError):
    """Prefix + prompt + max_new_tokens exceed the positions the model supports."""


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the engine sees it (already tokenised, prefix already resolved)."""

    request_id: str
    prompt_ids: Sequence[int]
    prefix: Prefix | None  # device-resident, model dtype
    sampling: SamplingParams
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks, reference checks)


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int


def check_fits(base: BaseModel, request: GenerationRequest) -> None:
    """Raise ``RequestTooLong`` unless the request's positions fit the model."""
    if not request.prompt_ids:
        raise ValueError("the prompt must contain at least one token")
    prefix_length = request.prefix.num_virtual_tokens if request.prefix else 0
    needed = prefix_length + len(request.prompt_ids) + request.max_new_tokens
    if base.max_positions is not None and needed > base.max_positions:
        raise RequestTooLong(
            f"prefix ({prefix_length}) + prompt ({len(request.prompt_ids)}) + max_new_tokens "
            f"({request.max_new_tokens}) = {needed} positions, but the model supports {base.max_positions}"
        )


def new_tracker(base: BaseModel, request: GenerationRequest) -> CompletionTracker:
    criteria = StopCriteria(
        max_new_tokens=request.max_new_tokens,
        stop_sequences=request.stop_sequences,
        eos_token_ids=frozenset() if request.ignore_eos else base.eos_token_ids,
    )
    return CompletionTracker(base.tokenizer, criteria, context_ids=request.prompt_ids)


def generate(base: BaseModel, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Generate for all ``requests`` together; results come back in request order."""
    for request in requests:
        check_fits(base, request)
    runner = ModelRunner(base)
    rows = [BatchRow(r.request_id, r.prompt_ids, r.prefix) for r in requests]
    batch = PrefixBatch.from_rows(rows, base.geometry, base.device, base.dtype)
    active = list(requests)  # the requests of the batch's rows, in row order
    trackers = {r.request_id: new_tracker(base, r) for r in requests}
    generators = {r.request_id: r.sampling.new_generator(base.device) for r in requests}
    while active:
        logits = runner.forward(batch)  # [B, V]
        tokens = sample_next_tokens(
            logits, [r.sampling for r in active], [generators[r.request_id] for r in active]
        )
        keep = [
            i
            for i, (request, token) in enumerate(zip(active, tokens.tolist(), strict=True))
            if trackers[request.request_id].append(token).finish_reason is None
        ]
        if not keep:
            break
        batch.advance(tokens)
        if len(keep) < len(active):
            batch, active = batch.filter(keep), [active[i] for i in keep]
    return [_result(r, trackers[r.request_id]) for r in requests]


def _result(request: GenerationRequest, tracker: CompletionTracker) -> GenerationResult:
    assert tracker.finish_reason is not None
    return GenerationResult(
        request_id=request.request_id,
        token_ids=list(tracker.token_ids),
        text=tracker.text,
        finish_reason=tracker.finish_reason,
        prompt_tokens=len(request.prompt_ids),
    )
