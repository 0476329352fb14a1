"""The SDK's conditional uploads against a real server: ``create_only`` (``If-None-Match: *``) creates a
task once and then raises ``ConflictError`` (412) leaving the first version in place, in the sync and the
async client alike; ``if_match`` and ``create_only`` together are refused before anything is sent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prefix_client import AsyncClient, Client, ConflictError, InvalidInputError

from tests.clients.conftest import Keys

pytestmark = pytest.mark.e2e  # uses a live server


def test_create_only_creates_once(server: str, keys: Keys, native_prefix: Path, peft_adapter: Path) -> None:
    with Client(server, keys.admin) as client:
        created = client.upload_prefix("create-once", native_prefix, create_only=True)
        assert created.created
        with pytest.raises(ConflictError) as refused:
            client.upload_prefix("create-once", peft_adapter, create_only=True)
        assert (refused.value.status_code, refused.value.type) == (412, "precondition_failed")
        assert client.get_prefix("create-once").version == created.version  # nothing replaced
        with pytest.raises(InvalidInputError, match="not both"):
            client.upload_prefix("create-once", native_prefix, if_match=created.version, create_only=True)
        client.delete_prefix("create-once", if_match=created.version)


def test_the_async_client_creates_once_too(server: str, keys: Keys, native_prefix: Path) -> None:
    async def create_twice() -> tuple[str, str]:
        async with AsyncClient(server, keys.admin) as client:
            created = await client.upload_prefix("create-once-async", native_prefix, create_only=True)
            with pytest.raises(ConflictError):
                await client.upload_prefix("create-once-async", native_prefix, create_only=True)
            current = (await client.get_prefix("create-once-async")).version
            await client.delete_prefix("create-once-async")
            return created.version, current

    created, current = asyncio.run(create_twice())
    assert created == current
