"""A request's several choices: the finished results of its engine requests (one per prompt and sample),
and ``best_of``'s pick among each prompt's samples."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from fastapi import Request

from server.api.serving import result_unless_disconnected
from server.engine.async_engine import RequestStream
from server.engine.request import GenerationResult


async def finished(
    http_request: Request, streams: list[RequestStream]
) -> list[tuple[RequestStream, GenerationResult]]:
    """Every stream's finished result, in order; if one fails (or the client leaves), the others are ended
    and its error raised."""
    outcomes = await asyncio.gather(
        *(result_unless_disconnected(http_request, stream) for stream in streams), return_exceptions=True
    )
    failed = next((outcome for outcome in outcomes if isinstance(outcome, BaseException)), None)
    if failed is not None:
        for stream in streams:
            stream.abort()
        raise failed
    return list(zip(streams, outcomes, strict=True))  # type: ignore[arg-type]


def best_of(
    results: list[tuple[RequestStream, GenerationResult]], samples: int, n: int, *, keep_logprobs: bool
) -> list[tuple[RequestStream, GenerationResult]]:
    """Of each prompt's ``samples`` results (consecutive), the ``n`` with the highest total logprob, best
    first (as ``best_of`` does); their logprobs dropped unless the caller asked for them."""
    chosen = []
    for start in range(0, len(results), samples):
        group = results[start : start + samples]
        group.sort(key=lambda item: -sum(entry.logprob for entry in item[1].logprobs or ()))
        chosen += group[:n]
    if keep_logprobs:
        return chosen
    return [(stream, replace(result, logprobs=None)) for stream, result in chosen]
