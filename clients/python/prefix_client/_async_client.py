"""The asynchronous client: ``Client``'s methods, awaited."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import httpx

from . import _base
from ._base import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, BaseClient, GenerateParams, Operation
from ._exceptions import connection_error, make_status_error
from ._retry import RetryPolicy
from ._streaming import AsyncStream
from ._upload import prepare_upload
from .types import Generation, Health, PrefixInfo, PrefixPage, TokenEvent, UploadResult

T = TypeVar("T")


class AsyncClient(BaseClient):
    """The asynchronous PrefixServe client; see ``Client`` for the arguments and methods.

    Use it as an async context manager, or call ``await aclose()``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int | RetryPolicy = DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient(timeout=self.timeout)

    async def generate(
        self, prompt: str, *, task_id: str | None = None, **params: Unpack[GenerateParams]
    ) -> Generation:
        """See ``Client.generate``."""
        return await self._call(_base.generate(prompt, task_id, params, stream=False))

    async def stream(
        self, prompt: str, *, task_id: str | None = None, **params: Unpack[GenerateParams]
    ) -> AsyncStream[TokenEvent]:
        """See ``Client.stream``: ``async with await client.stream(...) as tokens: async for t in tokens``."""
        response = await self._send(_base.generate(prompt, task_id, params, stream=True), stream=True)
        return AsyncStream(response, TokenEvent.model_validate)

    async def upload_prefix(
        self,
        task_id: str,
        path: str | os.PathLike[str],
        *,
        if_match: str | None = None,
        create_only: bool = False,
    ) -> UploadResult:
        """See ``Client.upload_prefix``."""
        prepared = await asyncio.to_thread(prepare_upload, path)  # reads the files
        return await self._call(_base.upload_prefix(task_id, prepared, if_match, create_only))

    async def list_prefixes_page(self, *, limit: int | None = None, cursor: str | None = None) -> PrefixPage:
        """See ``Client.list_prefixes_page``."""
        return await self._call(_base.list_prefixes_page(limit, cursor))

    async def iter_prefixes(self, *, page_size: int | None = None) -> AsyncIterator[PrefixInfo]:
        """See ``Client.iter_prefixes``."""
        cursor: str | None = None
        while True:
            page = await self.list_prefixes_page(limit=page_size, cursor=cursor)
            for prefix in page.prefixes:
                yield prefix
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def list_prefixes(self) -> list[PrefixInfo]:
        """See ``Client.list_prefixes``."""
        return [prefix async for prefix in self.iter_prefixes()]

    async def get_prefix(self, task_id: str) -> PrefixInfo:
        """See ``Client.get_prefix``."""
        return await self._call(_base.get_prefix(task_id))

    async def download_prefix(
        self, task_id: str, path: str | os.PathLike[str], *, peft: bool = False
    ) -> Path:
        """See ``Client.download_prefix``."""
        return await self._call(_base.download_prefix(task_id, path, peft=peft))

    async def delete_prefix(self, task_id: str, *, if_match: str | None = None) -> None:
        """See ``Client.delete_prefix``."""
        await self._call(_base.delete_prefix(task_id, if_match))

    async def health(self) -> Health:
        """See ``Client.health``."""
        return await self._call(_base.health())

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _call(self, op: Operation[T]) -> T:
        return op.parse_answer(await self._send(op, stream=False))

    async def _send(self, op: Operation[Any], *, stream: bool) -> httpx.Response:
        """Send ``op``, retrying as the policy allows; the response of a success, else raise."""
        attempt = 0
        while True:
            try:
                response = await self._http.send(self._build_request(self._http, op), stream=stream)
                if op.is_answer(response.status_code):
                    return response
                await response.aread()
                await response.aclose()
            except httpx.TransportError as exc:
                delay = self.retry_policy.after_transport_error(attempt, exc, op.replay)
                if delay is None:
                    raise connection_error(exc) from exc
            else:
                error = make_status_error(response)
                delay = self.retry_policy.after_status(attempt, error)
                if delay is None:
                    raise error
            await asyncio.sleep(delay)
            attempt += 1
