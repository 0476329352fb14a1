"""Server-sent events carry no raw line separator, whatever a token's text holds: each event is one
``data:`` line however the client splits lines, and decodes back to the same text."""

from __future__ import annotations

import json

import pytest

from server.api.openai.responses import ChatChunkChoice, ChatCompletionChunk, Completion, CompletionChoice
from server.api.sse import DONE, sse_event

# every character Python's str.splitlines breaks at, JavaScript's line terminators among them
SEPARATORS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
TEXT = f"a{SEPARATORS}b \r\n é 漢 🙂"


def _decoded(event: str) -> object:
    """The JSON of one event, read as a line-splitting client reads it."""
    lines = event.splitlines()
    assert lines == [lines[0], ""] and lines[0].startswith("data: "), lines
    assert event.endswith("\n\n") and event.isascii()
    return json.loads(lines[0].removeprefix("data: "))


@pytest.mark.parametrize(
    "data",
    [
        {"token_id": 7, "text": TEXT},
        {"error": {"type": "internal_error", "message": TEXT}},
        Completion(id="c", created=1, model="m", choices=[CompletionChoice(text=TEXT, finish_reason=None)]),
        ChatCompletionChunk(id="c", created=1, model="m", choices=[ChatChunkChoice(delta={"content": TEXT})]),
    ],
    ids=["native-token", "error", "completion-chunk", "chat-chunk"],
)
def test_an_event_is_one_line_and_decodes_back_intact(data: object) -> None:
    decoded = _decoded(sse_event(data))  # type: ignore[arg-type]
    expected = data.model_dump(mode="json") if hasattr(data, "model_dump") else data
    assert decoded == expected
    assert TEXT in _strings(decoded)


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return [text for item in items for text in _strings(item)]


def test_the_end_of_the_stream_is_its_own_event() -> None:
    assert DONE.splitlines() == ["data: [DONE]", ""]
