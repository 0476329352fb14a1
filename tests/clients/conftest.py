"""Real servers for the SDK and CLI tests, and the prefix files they upload.

``server``: auth on, with keys made by ``prefix-serve keys create``; small body, upload and rate limits
so that 413 and 429 can be provoked. ``store_down_server``: its Redis store is unreachable, so calls
that need the store answer 503 (a real outage, not a fake).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from prefix_store.formats.native import encode_native
from server.cli import main as cli
from server.engine.base_model import BaseModel
from testing.peft_reference import make_peft_adapter
from testing.server_process import ServerProcess
from tests.server.api.live_server import free_port
from tests.server.engine.helpers import random_prefix

MAX_REQUEST_BYTES = 4096  # any body but an upload
MAX_UPLOAD_BYTES = 20_000  # a prefix file: the demo model's prefix is 1 KiB per virtual token


@dataclass(frozen=True)
class Keys:
    file: Path
    admin: str  # tenant "acme"
    user: str  # tenant "acme"
    limited: str  # tenant "limited": 2 requests per minute
    serial: str  # tenant "serial": one request in flight at a time
    cli_admin: str  # tenant "cli": used by the CLI tests only, so its list starts empty
    cli_user: str


def create_key(keys_file: Path, tenant: str, role: str) -> str:
    """A key made by the CLI, as a user would (it prints the key on stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli(["keys", "create", "--tenant", tenant, "--role", role, "--file", str(keys_file)]) == 0
    return out.getvalue().strip()


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    keys_file = tmp_path_factory.mktemp("client-keys") / "keys.json"
    made = Keys(
        file=keys_file,
        admin=create_key(keys_file, "acme", "admin"),
        user=create_key(keys_file, "acme", "user"),
        limited=create_key(keys_file, "limited", "user"),
        serial=create_key(keys_file, "serial", "user"),
        cli_admin=create_key(keys_file, "cli", "admin"),
        cli_user=create_key(keys_file, "cli", "user"),
    )
    data = json.loads(keys_file.read_text())
    data["tenants"] = {"limited": {"requests_per_minute": 2}, "serial": {"max_concurrent": 1}}
    keys_file.write_text(json.dumps(data))
    return made


@pytest.fixture(scope="session")
def redis_port() -> int:
    """A port where nothing listens: the store-down server's Redis (a test may start one there)."""
    return free_port()


@dataclass(frozen=True)
class Servers:
    main: str  # auth on, file store, small limits
    store_down: str  # auth off, its Redis store unreachable


@pytest.fixture(scope="session")
def servers(
    demo_model_dir: Path, keys: Keys, redis_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    """Both servers, started at once (each takes seconds to load)."""
    main = ServerProcess(
        demo_model_dir,
        tmp_path_factory.mktemp("client-store").resolve().as_uri(),
        env={
            "PREFIX_SERVE_API_KEYS": str(keys.file),
            "PREFIX_SERVE_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
            "PREFIX_SERVE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        },
    )
    store_down = ServerProcess(demo_model_dir, f"redis://127.0.0.1:{redis_port}/0")
    try:
        main.launch()
        store_down.launch()
        main.wait_until_answering("/readyz")
        store_down.wait_until_answering("/healthz")  # it cannot become ready
        yield Servers(main.url, store_down.url)
    finally:
        for process in (main, store_down):
            process.terminate()
        for process in (main, store_down):
            process.close()


@pytest.fixture(scope="session")
def server(servers: Servers) -> str:
    return servers.main


@pytest.fixture(scope="session")
def store_down_server(servers: Servers) -> str:
    return servers.store_down


@pytest.fixture(scope="session")
def native_prefix(llama_base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A native prefix file (4 virtual tokens) for the demo model."""
    path = tmp_path_factory.mktemp("native") / "prefix.safetensors"
    path.write_bytes(encode_native(random_prefix(llama_base, 4, seed=21), llama_base.geometry))
    return path


@pytest.fixture(scope="session")
def peft_adapter(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT ``PREFIX_TUNING`` adapter folder (6 virtual tokens) for the demo model."""
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype="float32")
    return make_peft_adapter(model, tmp_path_factory.mktemp("peft") / "adapter", num_virtual_tokens=6, seed=3)


@pytest.fixture(scope="session")
def oversize_prefix(llama_base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid native prefix over the server's upload limit."""
    path = tmp_path_factory.mktemp("oversize") / "big.safetensors"
    path.write_bytes(encode_native(random_prefix(llama_base, 40, seed=5), llama_base.geometry))
    assert path.stat().st_size > MAX_UPLOAD_BYTES
    return path
