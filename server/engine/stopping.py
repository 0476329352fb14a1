"""When a row stops, and what text it has produced so far (incremental detokenisation)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from server.engine.lifecycle import FinishReason


@dataclass(frozen=True)
class StopCriteria:
    """The conditions that end one request."""

    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    eos_token_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()  # end the row like end-of-sequence, finish reason "stop"
    min_tokens: int = 0  # end-of-sequence and stop tokens are not picked before this many new tokens

    def banned_ids(self, generated: int) -> frozenset[int]:
        """The tokens a row that has generated ``generated`` tokens may not pick now."""
        return self.eos_token_ids | self.stop_token_ids if generated < self.min_tokens else frozenset()


@dataclass
class TextProgress:
    """One step's outcome for a row: text that is now safe to show, and why it finished, if it did."""

    delta: str
    finish_reason: FinishReason | None


@dataclass
class CompletionTracker:
    """Accumulates a row's tokens, decodes them incrementally and applies its stop criteria.

    Text that could still turn into the start of a stop sequence is held back until it cannot,
    so a streamed delta never shows part of a stop sequence. Stop sequences are excluded from the
    text; the token that completed one stays in ``token_ids``.
    """

    tokenizer: PreTrainedTokenizerBase
    criteria: StopCriteria
    context_ids: Sequence[int] = ()  # the prompt's last tokens: decoding context for the first new ones
    token_ids: list[int] = field(default_factory=list)  # generated tokens
    text: str = ""  # decoded text so far (excluding held-back bytes of an incomplete character)
    emitted: int = 0  # characters of `text` already handed out as deltas
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        self._window = list(self.context_ids[-4:])  # context tokens, then generated ones
        self._prefix_offset = 0  # window tokens decoded only as context for the next piece
        self._read_offset = len(self._window)  # window tokens whose text is already in `text`

    def append(self, token_id: int) -> TextProgress:
        """Record one generated token and report the text it releases."""
        self.token_ids.append(token_id)
        self._window.append(token_id)
        if token_id in self.criteria.eos_token_ids:
            self.finish_reason = FinishReason.EOS
        elif token_id in self.criteria.stop_token_ids:
            self.finish_reason = FinishReason.STOP
        else:
            self._decode_new_tokens(last=len(self.token_ids) >= self.criteria.max_new_tokens)
            stop_at = self._find_stop()
            if stop_at is not None:
                self.text = self.text[:stop_at]
                self.finish_reason = FinishReason.STOP
        if self.finish_reason is None and len(self.token_ids) >= self.criteria.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH
        end = len(self.text) if self.finish_reason else self._safe_end()
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return TextProgress(delta, self.finish_reason)

    def end(self, reason: FinishReason) -> str:
        """End the row from outside (aborted, past its deadline, an engine error); returns the text held
        back so far (it can no longer become a stop sequence), now released."""
        self.finish_reason = reason
        rest, self.emitted = self.text[self.emitted :], len(self.text)
        return rest

    def _decode_new_tokens(self, *, last: bool) -> None:
        # Decode with a few earlier tokens as context (tokenizers that drop a leading space at the start
        # of a text need it) and take only the new part. A trailing U+FFFD means a character's bytes
        # are split across tokens: wait for the next token before committing that text.
        decode = self.tokenizer.decode
        before = decode(self._window[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        after = decode(self._window[self._prefix_offset :], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not last):
            return
        self.text += after[len(before) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._window)

    def _find_stop(self) -> int | None:
        longest = max((len(s) for s in self.criteria.stop_sequences), default=0)
        search_from = max(0, self.emitted - longest)
        hits = [i for s in self.criteria.stop_sequences if (i := self.text.find(s, search_from)) >= 0]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        """End of the text that cannot be the beginning of a stop sequence."""
        held = 0
        for stop in self.criteria.stop_sequences:
            for size in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:size]):
                    held = size
                    break
        return len(self.text) - held
