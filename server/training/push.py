"""Uploading a trained prefix to a running server (``prefix-serve train --push TASK_ID``).

Through the SDK (``prefix_client.Client.upload_prefix``) when it is installed; otherwise a plain
multipart ``PUT /v1/admin/prefixes/{task_id}`` with httpx, the same request the SDK makes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from server.training.errors import PushError


def push_prefix(path: Path, task_id: str, *, server_url: str, api_key: str | None) -> dict[str, Any]:
    """Upload the native prefix file ``path`` as ``task_id``; returns the server's answer (docs/API.md's upload result)."""
    try:
        import prefix_client
    except ImportError:
        return _push_with_httpx(path, task_id, server_url=server_url, api_key=api_key)
    sdk_error = getattr(prefix_client, "PrefixServeError", Exception)
    try:
        with prefix_client.Client(server_url, api_key=api_key) as client:
            result = client.upload_prefix(task_id, path)
    except (sdk_error, httpx.HTTPError, OSError) as exc:
        raise PushError(f"upload of task {task_id!r} to {server_url} failed: {exc}") from None
    if hasattr(result, "model_dump"):
        return result.model_dump(mode="json")
    return dict(vars(result)) if hasattr(result, "__dict__") else dict(result)


def _push_with_httpx(path: Path, task_id: str, *, server_url: str, api_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{server_url.rstrip('/')}/v1/admin/prefixes/{task_id}"
    try:
        with path.open("rb") as file:
            response = httpx.put(
                url,
                headers=headers,
                files={"file": (path.name, file, "application/octet-stream")},
                timeout=60.0,
            )
    except (httpx.HTTPError, OSError) as exc:
        raise PushError(f"upload of task {task_id!r} to {server_url} failed: {exc}") from None
    if response.status_code >= 400:
        raise PushError(
            f"upload of task {task_id!r} to {server_url} failed: {response.status_code} {_error_message(response)}"
        )
    return response.json()


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
