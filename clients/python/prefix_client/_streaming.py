"""Streams of ``POST /v1/generate`` with ``"stream": true``: server-sent events → typed token events.

``Stream`` and ``AsyncStream`` are iterators and context managers. Leaving the ``with`` block, calling
``close()``, breaking out of the loop and dropping the stream all close the HTTP response, and the
server then cancels the generation, freeing its slot in the batch. The parsing is shared: only the
reading of the body differs between the two.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import httpx

from ._exceptions import APIConnectionError, APIResponseValidationError, connection_error
from .types import StreamEnd, TokenEvent, Usage

T = TypeVar("T")

_DONE = "[DONE]"
_LINE_END = re.compile(r"\r\n|\r|\n")  # the only line ends of an event stream
_CLOSING: set[asyncio.Task[None]] = set()  # closes started by dropped async streams, kept until done


class _SSELines:
    """The bytes of a ``text/event-stream`` → its lines, split only at CR LF, LF or CR as the SSE spec
    says. (httpx's ``iter_lines`` also splits at U+2028, U+2029, U+0085 … as ``str.splitlines`` does,
    which cuts an event whose JSON holds such a character raw.) The stream is UTF-8, whatever its headers."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._rest = ""  # the start of a line whose end has not arrived

    def feed(self, chunk: bytes) -> list[str]:
        """The lines that ``chunk`` completes."""
        text = self._rest + self._decoder.decode(chunk)
        held = "\r" if text.endswith("\r") else ""  # may be the first half of a CR LF: wait for the next
        *lines, self._rest = _LINE_END.split(text.removesuffix(held))
        self._rest += held
        return lines

    def close(self) -> list[str]:
        """The lines still held when the stream ends: one ended by a CR, or one without a line end."""
        rest, self._rest = self._rest + self._decoder.decode(b"", final=True), ""
        if rest.endswith("\r"):
            return [rest[:-1]]
        return [rest] if rest else []


class _SSEDecoder:
    """Lines of a ``text/event-stream`` → the data of each complete event (the WHATWG rules we need:
    ``data:`` fields joined by newlines, comments and other fields ignored, a blank line dispatches)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None


class _StreamState(Generic[T]):
    """What a stream has received so far; turns each line into an item, the end event or nothing."""

    def __init__(self, parse_item: Callable[[dict[str, Any]], T]) -> None:
        self._decoder = _SSEDecoder()
        self._parse_item = parse_item
        self.end: StreamEnd | None = None
        self.done = False  # ``[DONE]`` arrived

    def feed(self, line: str) -> T | None:
        data = self._decoder.feed(line)
        if data is None:
            return None
        if data == _DONE:
            self.done = True
            return None
        try:
            event = json.loads(data)
            if "finish_reason" in event:
                self.end = StreamEnd.model_validate(event)
                return None
            return self._parse_item(event)
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            raise APIResponseValidationError(f"the server sent a malformed event: {data[:200]!r}") from exc

    def check_complete(self) -> None:
        if not self.done or self.end is None:
            raise APIConnectionError("the stream ended before the server finished it")


class _StreamResults:
    """What both stream kinds share: the HTTP response, the text and ids so far, and how it ended."""

    def __init__(self, response: httpx.Response, parse_item: Callable[[dict[str, Any]], Any]) -> None:
        self.response = response
        self._state: _StreamState[Any] = _StreamState(parse_item)
        self._lines = _SSELines()
        self._texts: list[str] = []
        self._token_ids: list[int] = []

    @property
    def end(self) -> StreamEnd | None:
        """The final event (finish reason, usage, ids), or None while the stream runs."""
        return self._state.end

    @property
    def finish_reason(self) -> str | None:
        return self._state.end.finish_reason if self._state.end else None

    @property
    def usage(self) -> Usage | None:
        return self._state.end.usage if self._state.end else None

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._texts)

    @property
    def token_ids(self) -> list[int]:
        """The token ids received so far."""
        return list(self._token_ids)

    def _items(self, lines: list[str]) -> Iterator[Any]:
        """The items that ``lines`` complete, up to ``[DONE]``."""
        for line in lines:
            if self._state.done:
                return
            item = self._state.feed(line)
            if item is not None:
                yield item

    def _record(self, item: object) -> None:
        if isinstance(item, TokenEvent):
            self._texts.append(item.text)
            self._token_ids.append(item.token_id)


class Stream(_StreamResults, Generic[T]):
    """A synchronous stream of events; iterate it (``for event in stream``), then read ``end``."""

    def __init__(self, response: httpx.Response, parse_item: Callable[[dict[str, Any]], T]) -> None:
        super().__init__(response, parse_item)
        self._iterator = self._iterate()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return next(self._iterator)

    def _iterate(self) -> Iterator[T]:
        try:
            for chunk in self.response.iter_bytes():
                for item in self._items(self._lines.feed(chunk)):
                    self._record(item)
                    yield item
                if self._state.done:
                    break
            for item in self._items(self._lines.close()):
                self._record(item)
                yield item
            self._state.check_complete()
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        finally:
            self.response.close()

    def close(self) -> None:
        """Close the response (the server cancels the generation if it is still running)."""
        self._iterator.close()
        self.response.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.response.close()


class AsyncStream(_StreamResults, Generic[T]):
    """An asynchronous stream of events; ``async for event in stream``, then read ``end``."""

    def __init__(self, response: httpx.Response, parse_item: Callable[[dict[str, Any]], T]) -> None:
        super().__init__(response, parse_item)
        self._iterator = self._iterate()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await anext(self._iterator)

    async def _iterate(self) -> AsyncIterator[T]:
        try:
            async for chunk in self.response.aiter_bytes():
                for item in self._items(self._lines.feed(chunk)):
                    self._record(item)
                    yield item
                if self._state.done:
                    break
            for item in self._items(self._lines.close()):
                self._record(item)
                yield item
            self._state.check_complete()
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        finally:
            await self.response.aclose()

    async def aclose(self) -> None:
        """Close the response (the server cancels the generation if it is still running)."""
        await self._iterator.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # dropped unclosed: an async close cannot be awaited here, so schedule one on the running loop
        # (a stream dropped mid-iteration is also closed by the event loop's async-generator hooks)
        with contextlib.suppress(Exception):
            if not self.response.is_closed:
                task = asyncio.get_running_loop().create_task(self.response.aclose())
                _CLOSING.add(task)
                task.add_done_callback(_CLOSING.discard)
