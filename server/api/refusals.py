"""Why the serving layer refuses a request it planned (``plan``): exceptions that carry the facts, which
``errors`` answers in each route family's words (native: 413/422; OpenAI: 400 with OpenAI's codes)."""

from __future__ import annotations

from dataclasses import dataclass

from prefix_store.storage.excerpt import excerpt_int


class PromptTooLong(Exception):
    """A prompt has more tokens than the server takes (``max_prompt_tokens``)."""

    def __init__(self, tokens: int, limit: int, *, context: int | None, prompt_field: str) -> None:
        super().__init__(f"the prompt has {tokens} tokens, over the limit of {limit}")
        self.tokens, self.limit, self.context, self.prompt_field = tokens, limit, context, prompt_field


class NewTokensOverLimit(Exception):
    """The caller asked for more new tokens than the server's ``max_new_tokens`` allows."""

    def __init__(self, field: str, limit: int) -> None:
        super().__init__(f"{field} is over the limit of {limit}")
        self.field, self.limit = field, limit


@dataclass(eq=False)
class ContextLengthExceeded(Exception):
    """Prefix + prompt (+ the new tokens asked for) do not fit the model's positions."""

    context: int  # the model's positions
    prefix: int  # the task's virtual tokens
    prompt: int  # the prompt's tokens
    room: int  # new tokens that would fit (below 1: none)
    asked: int | None  # the new tokens asked for; None: unset (then the prompt alone is too long)
    field: str  # the request field of the new tokens
    prompt_field: str  # the request field of the prompt: prompt or messages
    encoder_decoder: bool  # the prompt is an encoder's source, in positions of its own

    def __str__(self) -> str:
        if self.encoder_decoder and self.room < 0:
            return f"the prompt has {self.prompt} tokens, but the model's encoder supports {self.context}"
        taken = self.context - self.room
        if self.encoder_decoder:
            parts = f"prefix ({self.prefix}) + decoder start ({taken - self.prefix})"
        else:
            parts = f"prefix ({self.prefix}) + prompt ({self.prompt})"
        if self.asked is None:
            return (
                f"{parts} = {taken} positions leave no room for new tokens: the model supports {self.context}"
            )
        asked, needed = excerpt_int(self.asked), excerpt_int(taken + self.asked)  # any size a request sends
        return f"{parts} + {self.field} ({asked}) = {needed} positions, but the model supports {self.context}"
