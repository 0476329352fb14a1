"""What the hardening scripts share: a keys file with an admin and a user key, a server on the demo
model with a temporary store, and the JSON result files."""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.api.auth import Role, create_key
from server.demo_model import ensure_demo_model
from testing.server_process import ServerProcess

TENANT = "hardening"
# small generation limits keep fuzzed generate calls short; large tenant limits keep 429s rare
FUZZ_SETTINGS = {
    "PREFIX_SERVE_MAX_NEW_TOKENS": "8",
    "PREFIX_SERVE_MAX_PROMPT_TOKENS": "256",
    "PREFIX_SERVE_MAX_UPLOAD_BYTES": "262144",
    "PREFIX_SERVE_MAX_VIRTUAL_TOKENS": "64",
    "PREFIX_SERVE_LOG_LEVEL": "warning",
}


def make_keys(
    keys_file: Path, *, requests_per_minute: int = 1_000_000, max_concurrent: int = 1024
) -> dict[str, str | None]:
    """An admin and a user key of ``TENANT`` (with the given limits), and "none" for no key."""
    keys: dict[str, str | None] = {
        "admin": create_key(keys_file, TENANT, Role.ADMIN),
        "user": create_key(keys_file, TENANT, Role.USER),
        "none": None,
    }
    data = json.loads(keys_file.read_text())
    data["tenants"] = {TENANT: {"requests_per_minute": requests_per_minute, "max_concurrent": max_concurrent}}
    keys_file.write_text(json.dumps(data))
    return keys


@contextmanager
def hardening_server(
    settings: dict[str, str] | None = None, *, model_dir: Path | None = None, store_url: str | None = None
) -> Iterator[tuple[ServerProcess, dict[str, str | None], Path]]:
    """A server on the demo model with auth on and a fresh filesystem store (unless ``store_url``):
    yields the server, the keys and the store folder."""
    with tempfile.TemporaryDirectory(prefix="hardening-") as work:
        root = Path(work)
        keys = make_keys(root / "keys.json")
        store = root / "store"
        env = {**FUZZ_SETTINGS, **(settings or {}), "PREFIX_SERVE_API_KEYS": str(root / "keys.json")}
        server = ServerProcess(model_dir or ensure_demo_model(), store_url or store.as_uri(), env=env)
        with server:
            yield server, keys, store


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON with when and where it ran."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stamped = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        **result,
    }
    path.write_text(json.dumps(stamped, indent=2) + "\n")
    print(f"wrote {path}")
