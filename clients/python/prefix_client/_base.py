"""What the sync and async clients share: configuration, and each call as an ``Operation`` — the
request to send, whether it may be repeated, and how to parse its answer. The two clients only send
operations (and sleep between retries) in their own way; everything else is here, once.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar

import httpx

from ._exceptions import APIResponseValidationError, InvalidInputError
from ._retry import Replay, RetryPolicy
from ._upload import Multipart, PreparedUpload
from ._version import __version__
from .types import Generation, Health, PrefixInfo, PrefixPage, UploadResult

T = TypeVar("T")

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=5.0)  # a long generation may take minutes; a connect may not
DEFAULT_MAX_RETRIES = 2
BASE_URL_ENV = "PREFIX_SERVE_URL"
API_KEY_ENV = "PREFIX_SERVE_API_KEY"
TASK_ID_HEADER = "X-Task-Id"  # lets a load balancer route a task's calls to the same replica

_TASK_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  # docs/API.md


class GenerateParams(TypedDict, total=False):
    """Sampling and stopping parameters of ``generate`` and ``stream``; the server's defaults apply
    to those left out (greedy, 64 new tokens)."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int  # 0 = off
    seed: int | None  # the same seed and parameters give the same text, whatever the batch
    stop: list[str] | str  # stop sequences
    cache_salt: str  # only requests with the same salt share cached prompt blocks


def validate_task_id(task_id: str) -> str:
    """``task_id`` if it is a valid task id (1–128 of ``[A-Za-z0-9._-]``, not starting with ``.``)."""
    if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id):
        raise InvalidInputError(
            f"invalid task id {task_id!r}: use 1-128 characters of [A-Za-z0-9._-], not starting with '.'"
        )
    return task_id


@dataclass(frozen=True)
class Operation(Generic[T]):
    """One API call: the request, whether it may be repeated, and the parser of its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: dict[str, Any] | None = None
    params: dict[str, Any] | None = None  # the query
    files: Multipart | None = None
    headers: dict[str, str] = field(default_factory=dict)
    replay: Replay = Replay.SAFE
    answers: frozenset[int] = frozenset()  # non-2xx statuses that are answers here, not errors

    def is_answer(self, status_code: int) -> bool:
        return 200 <= status_code < 300 or status_code in self.answers

    def parse_answer(self, response: httpx.Response) -> T:
        """``parse``, with a body that is not what docs/API.md says raised as an SDK error."""
        try:
            return self.parse(response)
        except (ValueError, KeyError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            raise APIResponseValidationError(
                f"unexpected answer to {self.method} {self.path} ({response.status_code}): {exc}"
            ) from exc


class BaseClient:
    """Configuration and request building shared by ``Client`` and ``AsyncClient``."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        max_retries: int | RetryPolicy,
    ) -> None:
        self.base_url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.retry_policy = (
            max_retries if isinstance(max_retries, RetryPolicy) else RetryPolicy(max_retries=max_retries)
        )

    @property
    def max_retries(self) -> int:
        return self.retry_policy.max_retries

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _build_request(self, http: httpx.Client | httpx.AsyncClient, op: Operation[Any]) -> httpx.Request:
        headers = {"User-Agent": f"prefix-serve-client/{__version__}", **op.headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return http.build_request(
            op.method,
            self.base_url + op.path,
            json=op.json,
            params=op.params,
            files=op.files,
            headers=headers,
            timeout=self.timeout,
        )


# --- the operations, one builder per API call -------------------------------------------------------


def generate(
    prompt: str, task_id: str | None, params: GenerateParams, *, stream: bool
) -> Operation[Generation]:
    """``POST /v1/generate``. (A stream's answer is read by the stream, not by ``parse``.)"""
    unknown = set(params) - set(GenerateParams.__annotations__)
    if unknown:
        raise TypeError(f"unexpected generation parameter(s): {', '.join(sorted(unknown))}")
    if not isinstance(prompt, str):
        raise InvalidInputError(f"the prompt must be a string, not {type(prompt).__name__}")
    body: dict[str, Any] = {"prompt": prompt, **params, "stream": stream}
    if isinstance(body.get("stop"), str):
        body["stop"] = [body["stop"]]
    if task_id is not None:
        body["task_id"] = validate_task_id(task_id)
    return Operation(
        "POST",
        "/v1/generate",
        lambda response: Generation.model_validate_json(response.content),
        json=body,
        headers=_task_header(task_id),
    )


def upload_prefix(
    task_id: str, prepared: PreparedUpload, if_match: str | None, create_only: bool = False
) -> Operation[UploadResult]:
    """``PUT /v1/admin/prefixes/{task_id}``, with ``If-None-Match: *`` when ``create_only``: repeated after a
    lost answer only with a precondition (a repeat of an upload that was applied then answers 412)."""
    if create_only and if_match is not None:
        raise InvalidInputError("give if_match or create_only, not both: they cannot both hold")
    headers = _task_header(validate_task_id(task_id), if_match)
    if create_only:
        headers["If-None-Match"] = "*"

    def parse(response: httpx.Response) -> UploadResult:
        return UploadResult.model_validate({**response.json(), "created": response.status_code == 201})

    return Operation(
        "PUT",
        f"/v1/admin/prefixes/{task_id}",
        parse,
        files=prepared.files,
        headers=headers,
        replay=Replay.SAFE if if_match is not None or create_only else Replay.IF_NOT_APPLIED,
    )


def list_prefixes_page(limit: int | None, cursor: str | None) -> Operation[PrefixPage]:
    """``GET /v1/admin/prefixes?limit=&cursor=``: one page (the server's default size without ``limit``)."""
    params = {name: value for name, value in (("limit", limit), ("cursor", cursor)) if value is not None}
    return Operation(
        "GET",
        "/v1/admin/prefixes",
        lambda response: PrefixPage.model_validate_json(response.content),
        params=params or None,
    )


def get_prefix(task_id: str) -> Operation[PrefixInfo]:
    """``GET /v1/admin/prefixes/{task_id}``."""
    return Operation(
        "GET",
        f"/v1/admin/prefixes/{validate_task_id(task_id)}",
        lambda response: PrefixInfo.model_validate_json(response.content),
        headers=_task_header(task_id),
    )


def download_prefix(task_id: str, path: str | os.PathLike[str], *, peft: bool = False) -> Operation[Path]:
    """``GET /v1/admin/prefixes/{task_id}/download``, written to ``path``; returns the path written.

    Native: ``path`` is a folder, created if needed, that gets ``<task_id>.safetensors`` when it is an
    existing folder or ends in a separator (``backup/``); otherwise it is the file to write. With ``peft``:
    ``path`` is the PEFT adapter folder to write (created if needed), ``adapter_config.json`` and
    ``adapter_model.safetensors`` in it."""
    validate_task_id(task_id)
    if peft:
        return Operation(
            "GET",
            f"/v1/admin/prefixes/{task_id}/download",
            lambda response: _write_peft_folder(Path(path), response.content),
            params={"format": "peft"},
            headers=_task_header(task_id),
        )
    target = _download_target(task_id, path)
    return Operation(
        "GET",
        f"/v1/admin/prefixes/{task_id}/download",
        lambda response: _write_atomically(target, response.content),
        headers=_task_header(task_id),
    )


_PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _write_peft_folder(folder: Path, archive: bytes) -> Path:
    """The two files of a PEFT adapter archive written into ``folder``; any other member is ignored (names
    are never taken from the archive as paths)."""
    with zipfile.ZipFile(io.BytesIO(archive)) as members:
        for name in _PEFT_FILES:
            _write_atomically(folder / name, members.read(name))
    return folder


def _download_target(task_id: str, path: str | os.PathLike[str]) -> Path:
    """The file ``download_prefix`` writes for ``path`` (``Path`` drops a trailing ``/``, so look first)."""
    text = os.fspath(path)
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    if text.endswith(separators) or Path(text).is_dir():
        return Path(text) / f"{task_id}.safetensors"
    return Path(text)


def delete_prefix(task_id: str, if_match: str | None) -> Operation[None]:
    """``DELETE /v1/admin/prefixes/{task_id}``: repeated after a lost answer only with ``If-Match``."""
    headers = _task_header(validate_task_id(task_id), if_match)
    return Operation(
        "DELETE",
        f"/v1/admin/prefixes/{task_id}",
        lambda response: None,
        headers=headers,
        replay=Replay.SAFE if if_match is not None else Replay.IF_NOT_APPLIED,
    )


def health() -> Operation[Health]:
    """``GET /readyz``: a 503 is an answer here (not ready), not an error."""

    def parse(response: httpx.Response) -> Health:
        try:
            body = response.json()
        except ValueError:
            body = {}
        status = str(body.get("status", "ready" if response.status_code == 200 else "unavailable"))
        return Health(ready=response.status_code == 200, status=status, model=body.get("model"))

    return Operation("GET", "/readyz", parse, answers=frozenset({503}))


def _task_header(task_id: str | None, if_match: str | None = None) -> dict[str, str]:
    headers = {TASK_ID_HEADER: task_id} if task_id is not None else {}
    if if_match is not None:
        headers["If-Match"] = if_match
    return headers


def _write_atomically(target: Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` so that it is either absent, as before, or complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target
