"""Server-sent events: how every stream, native and OpenAI, writes its events.

An event is one ``data:`` line. Its JSON is ASCII-only, so no character of a token's text can end the
line early: clients that split lines as Python's ``str.splitlines`` or JavaScript do also break at
U+2028, U+2029 and U+0085, which JSON leaves raw unless asked to escape them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

DONE = "data: [DONE]\n\n"
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no buffering by proxies


def sse_event(data: BaseModel | Mapping[str, object]) -> str:
    """``data`` as one event: ``data: <ASCII-only JSON>`` and a blank line."""
    plain = data.model_dump(mode="json") if isinstance(data, BaseModel) else data
    return f"data: {json.dumps(plain, ensure_ascii=True, separators=(',', ':'))}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """A ``text/event-stream`` response of ``events`` (made by :func:`sse_event`, then :data:`DONE`)."""
    return StreamingResponse(events, media_type="text/event-stream", headers=_HEADERS)
