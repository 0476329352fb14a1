"""Stop sequences, EOS, length limits and incremental text deltas."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from server.demo_model import build_demo_tokenizer
from server.engine.lifecycle import FinishReason
from server.engine.stopping import CompletionTracker, StopCriteria


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return build_demo_tokenizer()


def _run(tokenizer, text: str, criteria: StopCriteria) -> tuple[CompletionTracker, list[str]]:
    tracker = CompletionTracker(tokenizer, criteria)
    deltas = []
    for token in tokenizer(text).input_ids:
        progress = tracker.append(token)
        deltas.append(progress.delta)
        if progress.finish_reason:
            break
    return tracker, deltas


def test_length_limit_and_deltas_rebuild_the_text(tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    tracker, deltas = _run(tokenizer, text, StopCriteria(max_new_tokens=1000))
    assert tracker.finish_reason is None
    assert "".join(deltas) == tracker.text == text
    n = len(tokenizer(text).input_ids)
    tracker, deltas = _run(tokenizer, text, StopCriteria(max_new_tokens=n - 2))
    assert tracker.finish_reason == FinishReason.LENGTH
    assert len(tracker.token_ids) == n - 2
    assert "".join(deltas) == tracker.text and text.startswith(tracker.text)


def test_stop_sequence_ends_and_is_excluded_and_never_streamed(tokenizer) -> None:
    text = "Answer the question. User: tell me a joke."
    tracker, deltas = _run(
        tokenizer, text, StopCriteria(max_new_tokens=1000, stop_sequences=("User:", "zzz"))
    )
    assert tracker.finish_reason == FinishReason.STOP
    assert tracker.text == "Answer the question. "
    assert "".join(deltas) == tracker.text
    assert not any("Us" in d for d in deltas)  # the held-back start of the stop sequence never leaks


def test_eos_ends_the_row(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    tracker = CompletionTracker(tokenizer, StopCriteria(max_new_tokens=10, eos_token_ids=frozenset({eos})))
    ids = tokenizer("hello").input_ids
    for token in ids:
        assert tracker.append(token).finish_reason is None
    progress = tracker.append(eos)
    assert progress.finish_reason == FinishReason.EOS
    assert tracker.text == "hello" and tracker.token_ids == [*ids, eos]


def test_multibyte_characters_split_across_tokens_are_not_torn(tokenizer) -> None:
    text = "café ünïcødé 日本語 ok"
    tracker, deltas = _run(tokenizer, text, StopCriteria(max_new_tokens=1000))
    assert "".join(deltas) == tracker.text == text
    assert not any("\ufffd" in d for d in deltas)
