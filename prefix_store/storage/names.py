"""Task ids and tenant names: validated names, never paths."""

from __future__ import annotations

import re

from prefix_store.errors import InvalidName

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def validate_task_id(task_id: str) -> str:
    """Return ``task_id`` if it is a valid name (docs/API.md), else raise ``InvalidName``."""
    if not isinstance(task_id, str) or not _NAME.fullmatch(task_id):
        raise InvalidName(
            "task_id must be 1-128 characters of [A-Za-z0-9._-] and must not start with '.'",
            name=task_id if isinstance(task_id, str) else None,
        )
    return task_id


def validate_tenant(tenant: str) -> str:
    """Tenants follow the same rule as task ids (they become storage keys too)."""
    if not isinstance(tenant, str) or not _NAME.fullmatch(tenant):
        raise InvalidName("tenant must be 1-128 characters of [A-Za-z0-9._-] and must not start with '.'")
    return tenant
