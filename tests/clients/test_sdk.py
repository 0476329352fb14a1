"""Every SDK method, sync and async, against a real server: results typed, the wire as docs/API.md says."""

from __future__ import annotations

import asyncio
import gc
import inspect
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefix_client import AsyncClient, Client, Generation, NotFoundError, PrefixInfo, RateLimitError
from transformers import AutoModelForCausalLM

from testing.peft_reference import make_peft_soft_prompt
from testing.server_process import metric
from testing.waiting import wait_until, wait_until_async
from tests.clients.conftest import Keys
from tests.clients.recorder import Recorder

pytestmark = pytest.mark.e2e  # starts servers or other processes

PROMPT = "Once upon a time"
POSITIONAL = {"self", "prompt", "path", "task_id"}  # every other parameter is keyword-only


def test_sync_client_every_method(server: str, keys: Keys, native_prefix: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    with Client(server, keys.admin, http_client=recorder.sync()) as client:
        assert client.health().ready and client.health().model

        uploaded = client.upload_prefix("sync-task", native_prefix)
        assert (uploaded.task_id, uploaded.num_virtual_tokens, uploaded.source_format) == (
            "sync-task",
            4,
            "native",
        )
        assert uploaded.created

        info = client.get_prefix("sync-task")
        assert (
            isinstance(info, PrefixInfo) and info.version == uploaded.version and info.bytes == uploaded.bytes
        )
        assert abs((datetime.now(UTC) - info.created_at).total_seconds()) < 120
        assert "sync-task" in [p.task_id for p in client.list_prefixes()]

        generation = client.generate(PROMPT, task_id="sync-task", max_new_tokens=8)
        assert isinstance(generation, Generation)
        assert generation.prefix_version == uploaded.version and len(generation.token_ids) == 8
        assert generation.finish_reason == "length" and generation.usage.completion_tokens == 8
        base = client.generate(PROMPT, max_new_tokens=8)
        assert base.task_id is None and base.token_ids != generation.token_ids  # the prefix is used

        with client.stream(PROMPT, task_id="sync-task", max_new_tokens=8) as tokens:
            events = list(tokens)
        assert [e.token_id for e in events] == generation.token_ids == tokens.token_ids
        assert "".join(e.text for e in events) == tokens.text == generation.text
        assert tokens.end is not None and tokens.end.prefix_version == uploaded.version
        assert tokens.finish_reason == "length" and tokens.usage == generation.usage
        assert tokens.response.is_closed

        saved = client.download_prefix("sync-task", tmp_path)  # a folder: <task>.safetensors inside
        assert (
            saved == tmp_path / "sync-task.safetensors" and saved.read_bytes() == native_prefix.read_bytes()
        )
        replaced = client.upload_prefix("sync-task", saved, if_match=uploaded.version)
        assert not replaced.created and replaced.version != uploaded.version
        assert replaced.sha256 == uploaded.sha256  # the download round-trips

        client.delete_prefix("sync-task", if_match=replaced.version)
        with pytest.raises(NotFoundError):
            client.get_prefix("sync-task")

    # the task id travels as X-Task-Id on every task-bound call, and only on those
    task_bound = {f"{r.method} {r.url.path}": r.headers.get("x-task-id") for r in recorder.requests}
    assert task_bound["PUT /v1/admin/prefixes/sync-task"] == "sync-task"
    assert task_bound["GET /v1/admin/prefixes/sync-task"] == "sync-task"
    assert task_bound["GET /v1/admin/prefixes/sync-task/download"] == "sync-task"
    assert task_bound["DELETE /v1/admin/prefixes/sync-task"] == "sync-task"
    generate_headers = [r.headers.get("x-task-id") for r in recorder.requests if r.url.path == "/v1/generate"]
    assert generate_headers == ["sync-task", None, "sync-task"]
    assert task_bound["GET /v1/admin/prefixes"] is None and task_bound["GET /readyz"] is None
    assert all(r.headers["authorization"] == f"Bearer {keys.admin}" for r in recorder.requests)


def test_async_client_every_method(server: str, keys: Keys, peft_adapter: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        recorder = Recorder()
        async with AsyncClient(server, keys.admin, http_client=recorder.async_()) as client:
            assert (await client.health()).ready

            uploaded = await client.upload_prefix("async-task", peft_adapter)
            assert (uploaded.num_virtual_tokens, uploaded.source_format, uploaded.created) == (
                6,
                "peft",
                True,
            )
            assert (await client.get_prefix("async-task")).version == uploaded.version
            assert "async-task" in [p.task_id for p in await client.list_prefixes()]

            generation = await client.generate(PROMPT, task_id="async-task", max_new_tokens=6, stop=[])
            assert generation.prefix_version == uploaded.version and len(generation.token_ids) == 6

            async with await client.stream(PROMPT, task_id="async-task", max_new_tokens=6) as tokens:
                events = [event async for event in tokens]
            assert [e.token_id for e in events] == generation.token_ids
            assert tokens.text == generation.text and tokens.usage == generation.usage

            saved = await client.download_prefix("async-task", tmp_path / "copy.safetensors")
            native = await client.upload_prefix("async-native", saved)
            assert native.source_format == "native" and native.sha256 == uploaded.sha256

            # the same seed and parameters give the same sampled text
            sampled = [
                await client.generate(PROMPT, max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=7)
                for _ in range(2)
            ]
            assert sampled[0].token_ids == sampled[1].token_ids

            for task in ("async-task", "async-native"):
                await client.delete_prefix(task)
            with pytest.raises(NotFoundError):
                await client.get_prefix("async-task")
        headers = [r.headers.get("x-task-id") for r in recorder.requests if r.url.path == "/v1/generate"]
        assert headers[:2] == ["async-task", "async-task"]

    asyncio.run(scenario())


def _download_cases(root: Path) -> list[tuple[str | Path, Path]]:
    """(path given, file expected): a path ending in '/' or an existing folder is a folder."""
    (root / "existing").mkdir(parents=True)
    return [
        (f"{root}/backup/", root / "backup" / "dl-task.safetensors"),  # created
        (f"{root}/deep/er/", root / "deep" / "er" / "dl-task.safetensors"),
        (root / "existing", root / "existing" / "dl-task.safetensors"),
        (str(root / "named.safetensors"), root / "named.safetensors"),
        (root / "no-suffix", root / "no-suffix"),  # a file, as given
    ]


def test_download_prefix_to_a_folder_or_a_file(
    server: str, keys: Keys, native_prefix: Path, tmp_path: Path
) -> None:
    expected_bytes = native_prefix.read_bytes()

    async def download_async() -> None:
        async with AsyncClient(server, keys.admin) as client:
            for given, expected in _download_cases(tmp_path / "async"):
                assert await client.download_prefix("dl-task", given) == expected
                assert expected.read_bytes() == expected_bytes, given

    with Client(server, keys.admin) as client:
        client.upload_prefix("dl-task", native_prefix)
        try:
            for given, expected in _download_cases(tmp_path / "sync"):
                assert client.download_prefix("dl-task", given) == expected
                assert expected.read_bytes() == expected_bytes, given
            asyncio.run(download_async())
        finally:
            client.delete_prefix("dl-task")


def test_stop_sequences_end_generation(server: str, keys: Keys) -> None:
    with Client(server, keys.user) as client:
        full = client.generate(PROMPT, max_new_tokens=12)
        stop = full.text[len(full.text) // 2 :][:2]
        assert stop
        stopped = client.generate(PROMPT, max_new_tokens=12, stop=stop)  # a single string is a list of one
        assert stopped.finish_reason == "stop" and len(stopped.token_ids) < 12


def test_closing_a_stream_cancels_the_generation(server: str, keys: Keys) -> None:
    """Closing, leaving ``with`` and dropping a stream each abort the request (it would run 1000 tokens)
    and so free the tenant's only slot."""

    def aborted() -> float:
        return metric(server, "prefix_serve_generation_finished_total", reason="aborted")

    def slot_is_free(client: Client) -> bool:
        try:
            client.generate(PROMPT, max_new_tokens=1)
        except RateLimitError:
            return False
        return True

    def abort_frees_the_slot(client: Client, before: float) -> None:
        wait_until(lambda: aborted() >= before + 1, "the server aborts the request the client left")
        wait_until(lambda: slot_is_free(client), "the tenant's slot is free again")

    with Client(server, keys.serial, max_retries=0) as client:
        before = aborted()
        with client.stream(PROMPT, max_new_tokens=1000) as tokens:
            next(tokens)
        abort_frees_the_slot(client, before)

        before = aborted()
        tokens = client.stream(PROMPT, max_new_tokens=1000)
        next(tokens)
        del tokens
        gc.collect()
        abort_frees_the_slot(client, before)

    async def drop_async() -> None:
        async with AsyncClient(server, keys.serial, max_retries=0) as client:
            before = aborted()
            async with await client.stream(PROMPT, max_new_tokens=1000) as tokens:
                async for _ in tokens:
                    break
            await wait_until_async(lambda: aborted() >= before + 1, "the server aborts the request")

    asyncio.run(drop_async())
    with Client(server, keys.serial, max_retries=0) as client:
        wait_until(lambda: slot_is_free(client), "the tenant's slot is free again")


def test_sync_and_async_clients_have_the_same_methods() -> None:
    public = {name for name in dir(Client) if not name.startswith("_")} - {"close"}
    assert public == {name for name in dir(AsyncClient) if not name.startswith("_")} - {"aclose"}
    for name in public:
        sync, async_ = getattr(Client, name), getattr(AsyncClient, name)
        if callable(sync):
            assert inspect.iscoroutinefunction(async_) or inspect.isasyncgenfunction(async_), name
            assert inspect.signature(sync).parameters.keys() == inspect.signature(async_).parameters.keys()
            options = [p for p in inspect.signature(sync).parameters.values() if p.name not in POSITIONAL]
            assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in options), name


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, server: str, keys: Keys) -> None:
    monkeypatch.setenv("PREFIX_SERVE_URL", server + "/")
    monkeypatch.setenv("PREFIX_SERVE_API_KEY", keys.user)
    with Client() as client:
        assert client.base_url == server and keys.user not in repr(client)
        assert client.generate(PROMPT, max_new_tokens=2).usage.completion_tokens == 2
    monkeypatch.delenv("PREFIX_SERVE_URL")
    monkeypatch.delenv("PREFIX_SERVE_API_KEY")
    with Client() as client:
        assert client.base_url == "http://127.0.0.1:8000" and client.api_key is None


def test_soft_prompts_upload_from_a_peft_folder_or_a_native_file_and_say_their_kind(
    server: str, keys: Keys, demo_model_dir: Path, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype="float32")
    folder = make_peft_soft_prompt(model, tmp_path / "soft", num_virtual_tokens=5, method="P_TUNING", seed=2)
    with Client(server, keys.admin) as client:
        from_peft = client.upload_prefix("sdk-soft", folder)
        assert (from_peft.kind, from_peft.source_format, from_peft.num_virtual_tokens) == (
            "soft_prompt",
            "peft",
            5,
        )
        native = client.download_prefix("sdk-soft", tmp_path / "soft.safetensors")
        from_file = client.upload_prefix("sdk-soft-copy", native)
        assert (from_file.kind, from_file.source_format) == ("soft_prompt", "native")
        assert {p.task_id: p.kind for p in client.list_prefixes()}["sdk-soft-copy"] == "soft_prompt"
        answers = [
            client.generate(PROMPT, task_id=task, max_new_tokens=6).token_ids
            for task in ("sdk-soft", "sdk-soft-copy")
        ]
        assert answers[0] == answers[1] != client.generate(PROMPT, max_new_tokens=6).token_ids


def test_listings_come_in_pages_and_the_iterators_walk_them(
    server: str, keys: Keys, native_prefix: Path
) -> None:
    """Five tasks in pages of two: the page call says where the next page starts and the tenant's usage;
    the sync and async iterators see every task once, in task-id order, a page per request."""
    recorder = Recorder()
    with Client(server, keys.admin, http_client=recorder.sync()) as client:
        names = [f"paged-{i}" for i in range(5)]
        for name in names:
            client.upload_prefix(name, native_prefix)
        first = client.list_prefixes_page(limit=2)
        assert [p.task_id for p in first.prefixes] == sorted(p.task_id for p in client.list_prefixes())[:2]
        assert first.next_cursor == first.prefixes[-1].task_id
        assert first.usage is not None and first.usage.prefixes >= 5 and first.usage.bytes > 0
        recorder.requests.clear()
        walked = [p.task_id for p in client.iter_prefixes(page_size=2) if p.task_id.startswith("paged-")]
        assert walked == names
        assert all(r.url.params["limit"] == "2" for r in recorder.requests)
        assert len(recorder.requests) == -(-first.usage.prefixes // 2)

        async def walk() -> list[str]:
            async with AsyncClient(server, keys.admin) as async_client:
                return [p.task_id async for p in async_client.iter_prefixes(page_size=2)]

        assert [name for name in asyncio.run(walk()) if name.startswith("paged-")] == names
        for name in names:
            client.delete_prefix(name)
