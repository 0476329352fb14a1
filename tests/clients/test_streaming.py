"""The SDK's event-stream parser, fed through ``httpx.MockTransport``: lines end only at CR LF, LF or CR
(the SSE spec), never at U+2028, U+2029 or U+0085 inside an event's JSON, wherever the body's chunks
happen to be cut. (The streams of a real server are tested in test_sdk.py.)"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from prefix_client import APIConnectionError, AsyncClient, Client

TEXTS = ["line\u2028separator", " para\u2029graph", " next\x85line", " plain", " ünï"]


def _body(line_end: str) -> bytes:
    """A generate stream whose token texts hold the characters ``str.splitlines`` splits at, raw."""
    events = [{"token_id": i, "text": text} for i, text in enumerate(TEXTS)]
    events.append(
        {
            "id": "gen-1",
            "task_id": None,
            "prefix_version": None,
            "finish_reason": "length",
            "usage": {"prompt_tokens": 3, "completion_tokens": len(TEXTS)},
        }
    )
    lines = [": a comment", "retry: 1000"]  # ignored
    for event in events:
        lines += [f"data: {json.dumps(event, ensure_ascii=False)}", ""]
    lines += ["data: [DONE]", ""]
    return "".join(line + line_end for line in lines).encode()


def _chunkings(body: bytes) -> Iterator[list[bytes]]:
    """The whole body at once, one byte at a time (cutting every CR LF and every multi-byte
    character), and cut just after each CR and inside each multi-byte character."""
    yield [body]
    yield [body[i : i + 1] for i in range(len(body))]
    cuts = [i + 1 for i, byte in enumerate(body) if byte == 0x0D or byte >= 0xC0]
    edges = [0, *cuts, len(body)]
    yield [body[a:b] for a, b in itertools.pairwise(edges) if a < b]


CASES = [
    pytest.param(line_end, chunks, id=f"{name}-{i}")
    for name, line_end in (("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r"))
    for i, chunks in enumerate(_chunkings(_body(line_end)))
]


def _sync_client(chunks: list[bytes]) -> Client:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=iter(chunks))

    return Client("http://test", http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def _async_client(chunks: list[bytes]) -> AsyncClient:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    return AsyncClient("http://test", http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))


@pytest.mark.parametrize(("line_end", "chunks"), CASES)
def test_sync_stream_keeps_unicode_line_separators_inside_events(line_end: str, chunks: list[bytes]) -> None:
    with _sync_client(chunks) as client, client.stream("hi") as tokens:
        events = list(tokens)
    assert [e.text for e in events] == TEXTS and [e.token_id for e in events] == list(range(len(TEXTS)))
    assert tokens.text == "".join(TEXTS) and tokens.finish_reason == "length"
    assert tokens.usage is not None and tokens.usage.completion_tokens == len(TEXTS)


@pytest.mark.parametrize(("line_end", "chunks"), CASES)
def test_async_stream_keeps_unicode_line_separators_inside_events(line_end: str, chunks: list[bytes]) -> None:
    async def scenario() -> None:
        async with _async_client(chunks) as client, await client.stream("hi") as tokens:
            events = [event async for event in tokens]
        assert [e.text for e in events] == TEXTS
        assert tokens.text == "".join(TEXTS) and tokens.finish_reason == "length"

    asyncio.run(scenario())


def test_a_stream_cut_before_done_is_a_connection_error() -> None:
    body = _body("\n")
    cut = [body[: body.index(b"data: [DONE]")]]  # the end event arrived, [DONE] did not
    with _sync_client(cut) as client, pytest.raises(APIConnectionError):
        list(client.stream("hi"))

    async def scenario() -> None:
        async with _async_client(cut) as client:
            with pytest.raises(APIConnectionError):
                async for _ in await client.stream("hi"):
                    pass

    asyncio.run(scenario())
