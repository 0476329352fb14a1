"""The synchronous client."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import httpx

from . import _base
from ._base import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, BaseClient, GenerateParams, Operation
from ._exceptions import connection_error, make_status_error
from ._retry import RetryPolicy
from ._streaming import Stream
from ._upload import prepare_upload
from .types import Generation, Health, PrefixInfo, PrefixPage, TokenEvent, UploadResult

T = TypeVar("T")


class Client(BaseClient):
    """A PrefixServe client.

    ``base_url`` defaults to ``$PREFIX_SERVE_URL`` or ``http://127.0.0.1:8000``; ``api_key`` to
    ``$PREFIX_SERVE_API_KEY`` (none: no ``Authorization`` header, for a server with auth off).
    ``timeout`` is in seconds or an ``httpx.Timeout``; ``max_retries`` bounds the retries of
    connection errors, 429 and 503 (0: none; a ``RetryPolicy`` also sets the backoff). ``http_client``
    lets you bring your own ``httpx.Client`` (proxies, TLS, transports); the client then does not
    close it.

    Use it as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int | RetryPolicy = DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=self.timeout)

    def generate(
        self, prompt: str, *, task_id: str | None = None, **params: Unpack[GenerateParams]
    ) -> Generation:
        """Generate a completion of ``prompt`` with the prefix of ``task_id`` (None: the base model alone).

        ``params``: ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``seed``,
        ``stop`` (a string or a list of them), ``cache_salt``; the server's defaults apply to those left out.
        """
        return self._call(_base.generate(prompt, task_id, params, stream=False))

    def stream(
        self, prompt: str, *, task_id: str | None = None, **params: Unpack[GenerateParams]
    ) -> Stream[TokenEvent]:
        """Like ``generate``, but yields each token as it is generated. Errors the server finds before
        generating (404, 429, …) raise here; once iterated, the stream's ``end`` holds the finish reason
        and usage. Close it (or use ``with``) to stop early: the server cancels the generation."""
        response = self._send(_base.generate(prompt, task_id, params, stream=True), stream=True)
        return Stream(response, TokenEvent.model_validate)

    def upload_prefix(
        self,
        task_id: str,
        path: str | os.PathLike[str],
        *,
        if_match: str | None = None,
        create_only: bool = False,
    ) -> UploadResult:
        """Upload a native ``.safetensors`` prefix or soft prompt, or a PEFT prompt-learning adapter folder as
        ``task_id``, replacing any current version (only if it is ``if_match``, when given; with
        ``create_only``, only if the task does not exist). A failed condition raises ``ConflictError``
        (412). The file is checked locally first (``InvalidInputError``) and fully by the server."""
        return self._call(_base.upload_prefix(task_id, prepare_upload(path), if_match, create_only))

    def list_prefixes_page(self, *, limit: int | None = None, cursor: str | None = None) -> PrefixPage:
        """One page of the tenant's prefixes by task id, after ``cursor`` (the previous page's
        ``next_cursor``; None: the first page), with the tenant's usage."""
        return self._call(_base.list_prefixes_page(limit, cursor))

    def iter_prefixes(self, *, page_size: int | None = None) -> Iterator[PrefixInfo]:
        """Every prefix of the tenant, by task id, fetched a page at a time as the iteration goes; a task
        present throughout the walk is seen exactly once, whatever is uploaded or deleted meanwhile."""
        cursor: str | None = None
        while True:
            page = self.list_prefixes_page(limit=page_size, cursor=cursor)
            yield from page.prefixes
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def list_prefixes(self) -> list[PrefixInfo]:
        """The tenant's prefixes, every page (``iter_prefixes`` walks them lazily)."""
        return list(self.iter_prefixes())

    def get_prefix(self, task_id: str) -> PrefixInfo:
        """One prefix of the tenant (``NotFoundError`` if there is none)."""
        return self._call(_base.get_prefix(task_id))

    def download_prefix(self, task_id: str, path: str | os.PathLike[str], *, peft: bool = False) -> Path:
        """Save the current version as a native file at ``path``, or as ``<task_id>.safetensors`` in the
        folder ``path`` when it is one or ends in ``/`` (created if needed); returns the file. With ``peft``,
        as a PEFT adapter folder at ``path`` (``PeftModel.from_pretrained`` loads it); returns the folder."""
        return self._call(_base.download_prefix(task_id, path, peft=peft))

    def delete_prefix(self, task_id: str, *, if_match: str | None = None) -> None:
        """Delete a prefix (only if its current version is ``if_match``, when given)."""
        self._call(_base.delete_prefix(task_id, if_match))

    def health(self) -> Health:
        """Whether the server is ready to serve (its model loaded, its store reachable)."""
        return self._call(_base.health())

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, op: Operation[T]) -> T:
        return op.parse_answer(self._send(op, stream=False))

    def _send(self, op: Operation[Any], *, stream: bool) -> httpx.Response:
        """Send ``op``, retrying as the policy allows; the response of a success, else raise."""
        attempt = 0
        while True:
            try:
                response = self._http.send(self._build_request(self._http, op), stream=stream)
                if op.is_answer(response.status_code):
                    return response
                response.read()
                response.close()
            except httpx.TransportError as exc:
                delay = self.retry_policy.after_transport_error(attempt, exc, op.replay)
                if delay is None:
                    raise connection_error(exc) from exc
            else:
                error = make_status_error(response)
                delay = self.retry_policy.after_status(attempt, error)
                if delay is None:
                    raise error
            time.sleep(delay)
            attempt += 1
