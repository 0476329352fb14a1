"""The engine's logprobs in OpenAI's two shapes: completions' legacy one (token strings, their logprobs, the
top alternatives keyed by string, text offsets) and chat's (``content``: a token, its logprob and bytes, and
its ``top_logprobs``). A token's string is its own decoding (as vLLM gives it)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

from transformers import PreTrainedTokenizerBase

from server.api.openai.responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from server.engine.logprobs import TokenLogprob


def _string(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(
    tokenizer: PreTrainedTokenizerBase,
    tokens: Sequence[tuple[int, TokenLogprob | None]],
    *,
    text_offset: int = 0,
) -> CompletionLogprobs:
    """``tokens``: (token id, its logprob entry; None for an echoed prompt's first token). The top
    alternatives include the token itself, as vLLM's do; offsets count from ``text_offset``."""
    strings = [_string(tokenizer, token) for token, _ in tokens]
    starts = list(accumulate((len(s) for s in strings[:-1]), initial=text_offset))
    top: list[dict[str, float] | None] = []
    for string, (_, entry) in zip(strings, tokens, strict=True):
        if entry is None:
            top.append(None)
            continue
        alternatives = {_string(tokenizer, token): value for token, value in entry.top}
        top.append({string: entry.logprob, **alternatives})
    return CompletionLogprobs(
        tokens=strings,
        token_logprobs=[None if entry is None else entry.logprob for _, entry in tokens],
        top_logprobs=top,
        text_offset=starts if tokens else [],
    )


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    """Each generated token with its ``top`` alternatives (as many as ``top_logprobs`` asked)."""

    def described(token: int, value: float) -> TopLogprob:
        string = _string(tokenizer, token)
        return TopLogprob(token=string, logprob=value, bytes=list(string.encode()))

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **described(entry.token_id, entry.logprob).model_dump(),
                top_logprobs=[described(token, value) for token, value in entry.top],
            )
            for entry in entries
        ]
    )
