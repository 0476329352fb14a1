"""End to end over real HTTP: a server process on a free port, the demo model, a filesystem store."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from peft import PeftModel
from prefix_client import Client
from transformers import AutoModelForCausalLM

from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.native import encode_native
from prefix_store.formats.source import load_prefix_source
from server.cli import main
from server.engine.base_model import BaseModel
from server.engine.generation import generate
from testing.peft_reference import make_peft_adapter, peft_greedy_tokens
from tests.server.api.live_server import live_server
from tests.server.engine.helpers import random_prefix, request

pytestmark = pytest.mark.e2e  # starts servers or other processes

PROMPT = "Once upon a time there was a little model"


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    store = tmp_path_factory.mktemp("store")
    with (
        live_server(demo_model_dir, store, env={"PREFIX_SERVE_MAX_PROMPT_TOKENS": "64"}) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def _upload(client: httpx.Client, task_id: str, blob: bytes, **headers: str) -> httpx.Response:
    return client.put(
        f"/v1/admin/prefixes/{task_id}", files={"file": ("p.safetensors", blob)}, headers=headers
    )


def _generate(client: httpx.Client, **body: object) -> httpx.Response:
    return client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 10, **body})


def _engine_tokens(base: BaseModel, prefix, max_new_tokens: int = 10) -> list[int]:
    result = generate(
        base, [request(base, "r", PROMPT, prefix, max_new_tokens=max_new_tokens, ignore_eos=False)]
    )
    return result[0].token_ids


def test_health_and_readiness(server: httpx.Client) -> None:
    assert server.get("/healthz").json() == {"status": "ok"}
    ready = server.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_upload_native_then_generate_matches_the_engine(server: httpx.Client, llama_base: BaseModel) -> None:
    prefix = random_prefix(llama_base, 6, seed=21)
    blob = encode_native(prefix, llama_base.geometry)
    created = _upload(server, "native-task", blob)
    assert created.status_code == 201
    body = created.json()
    assert body["sha256"] == hashlib.sha256(blob).hexdigest()
    assert (body["bytes"], body["num_virtual_tokens"], body["source_format"]) == (len(blob), 6, "native")

    answer = _generate(server, task_id="native-task")
    assert answer.status_code == 200
    result = answer.json()
    assert result["prefix_version"] == body["version"]
    assert result["token_ids"] == _engine_tokens(llama_base, prefix)
    assert result["usage"]["completion_tokens"] == len(result["token_ids"])
    assert result["token_ids"] != _generate(server).json()["token_ids"]  # the prefix matters


def test_peft_upload_matches_peft_and_downloads_round_trip(
    server: httpx.Client, llama_base: BaseModel, demo_model_dir: Path, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype="float32")
    adapter = make_peft_adapter(
        model, tmp_path / "adapter", num_virtual_tokens=5, prefix_projection=True, seed=4
    )
    files = {
        "adapter_config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes()),
    }
    uploaded = server.put("/v1/admin/prefixes/peft-task", files=files)
    assert uploaded.status_code == 201 and uploaded.json()["source_format"] == "peft"

    reference_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype="float32").eval(), adapter
    ).eval()
    prompt_ids = llama_base.tokenizer(PROMPT).input_ids
    expected = peft_greedy_tokens(
        reference_model, prompt_ids, 10, eos_token_id=llama_base.tokenizer.eos_token_id
    )
    assert _generate(server, task_id="peft-task").json()["token_ids"] == expected

    downloaded = server.get("/v1/admin/prefixes/peft-task/download")
    assert downloaded.status_code == 200
    (tmp_path / "copy.safetensors").write_bytes(downloaded.content)
    prefix, _ = load_prefix_source(tmp_path / "copy.safetensors", llama_base.geometry, PrefixLimits())
    assert _upload(server, "peft-copy", downloaded.content).status_code == 201
    assert _generate(server, task_id="peft-copy").json()["token_ids"] == expected
    assert _engine_tokens(llama_base, prefix) == expected


def test_hot_swap_and_rejected_upload_keeps_the_old_version(
    server: httpx.Client, llama_base: BaseModel
) -> None:
    first, second = (random_prefix(llama_base, 4, seed=s) for s in (31, 32))
    v1 = _upload(server, "swap", encode_native(first, llama_base.geometry)).json()["version"]
    before = _generate(server, task_id="swap").json()
    replaced = _upload(server, "swap", encode_native(second, llama_base.geometry))
    assert replaced.status_code == 200
    v2 = replaced.json()["version"]
    after = _generate(server, task_id="swap").json()
    assert (before["prefix_version"], after["prefix_version"]) == (v1, v2)
    assert before["token_ids"] == _engine_tokens(llama_base, first)
    assert after["token_ids"] == _engine_tokens(llama_base, second) != before["token_ids"]

    rejected = _upload(server, "swap", b"\x80\x04garbage pickle")
    assert rejected.status_code == 400 and "safetensors" in rejected.json()["error"]["message"]
    assert _generate(server, task_id="swap").json()["prefix_version"] == v2
    stale = _upload(server, "swap", encode_native(first, llama_base.geometry), **{"If-Match": v1})
    assert stale.status_code == 412
    assert server.get("/v1/admin/prefixes/swap").json()["version"] == v2
    etag = server.get("/v1/admin/prefixes/swap/download").headers["etag"]  # '"<version>"', sent back as is
    assert (
        _upload(server, "swap", encode_native(first, llama_base.geometry), **{"If-Match": etag}).status_code
        == 200
    )


def test_list_get_and_delete(server: httpx.Client, llama_base: BaseModel) -> None:
    version = _upload(
        server, "short-lived", encode_native(random_prefix(llama_base, 3, seed=5), llama_base.geometry)
    )
    listed = {p["task_id"]: p for p in server.get("/v1/admin/prefixes").json()["prefixes"]}
    assert listed["short-lived"]["version"] == version.json()["version"]
    one = server.get("/v1/admin/prefixes/short-lived").json()
    assert one == listed["short-lived"]
    # created_at is ISO 8601 text in UTC (docs/API.md), e.g. "2026-12-01T08:53:07.123456Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)", one["created_at"])
    created = datetime.fromisoformat(one["created_at"])
    assert created.utcoffset() == timedelta(0) and abs(datetime.now(UTC) - created) < timedelta(minutes=5)
    assert server.delete("/v1/admin/prefixes/short-lived").status_code == 204
    assert server.get("/v1/admin/prefixes/short-lived").status_code == 404
    assert _generate(server, task_id="short-lived").status_code == 404
    assert server.delete("/v1/admin/prefixes/short-lived").status_code == 404


def test_created_at_is_the_same_instant_over_http_in_the_sdk_and_in_ls(
    server: httpx.Client, llama_base: BaseModel, capsys: pytest.CaptureFixture[str]
) -> None:
    _upload(server, "dated", encode_native(random_prefix(llama_base, 2, seed=8), llama_base.geometry))
    sent = server.get("/v1/admin/prefixes/dated").json()["created_at"]
    created = datetime.fromisoformat(sent)
    url = str(server.base_url)
    with Client(url) as sdk:
        parsed = sdk.get_prefix("dated").created_at
    assert parsed == created and parsed.tzinfo is not None and parsed.utcoffset() == timedelta(0)

    assert main(["ls", "--server", url, "--json"]) == 0
    listed = {p["task_id"]: p for p in json.loads(capsys.readouterr().out)["prefixes"]}
    assert datetime.fromisoformat(listed["dated"]["created_at"]) == created
    assert main(["ls", "--server", url]) == 0
    row = next(row for line in capsys.readouterr().out.splitlines() if (row := line.split())[:1] == ["dated"])
    assert row[-1] == created.strftime("%Y-%m-%dT%H:%M:%SZ")  # UTC, as --json, to the second


@pytest.mark.parametrize(
    ("call", "status"),
    [
        (lambda c: _generate(c, task_id="../etc/passwd"), 400),
        (lambda c: _generate(c, task_id=".hidden"), 400),
        (lambda c: _generate(c, task_id="never-uploaded"), 404),
        (lambda c: _generate(c, temperature=-1), 422),
        (lambda c: _generate(c, max_new_tokens=0), 422),
        (lambda c: _generate(c, unknown_field=1), 422),
        (
            lambda c: c.post(
                "/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
            ),
            422,
        ),
        (lambda c: _generate(c, prompt="word " * 200), 413),
        (lambda c: _generate(c, stop=["x" * 500]), 422),
        (lambda c: c.put("/v1/admin/prefixes/x", files={"other": ("a", b"b")}), 400),
        (lambda c: c.get("/v1/nothing-here"), 404),
    ],
    ids=[
        "path-task-id",
        "dot-task-id",
        "unknown-task",
        "temperature",
        "max-new-tokens",
        "extra-field",
        "bad-json",
        "long-prompt",
        "long-stop",
        "no-file-field",
        "unknown-route",
    ],
)
def test_bad_input_gets_a_clear_4xx_error_body(server: httpx.Client, call, status: int) -> None:
    response = call(server)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] and error["message"]
    assert "Traceback" not in response.text and "/work" not in response.text
