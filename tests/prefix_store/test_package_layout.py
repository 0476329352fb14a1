"""``prefix_store``'s three parts: storage (and the package's errors, names and geometry) import without
torch, so a tool that only reads or writes a store needs none; every exception shares one root."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import prefix_store.errors as errors

pytestmark = pytest.mark.e2e  # a fresh interpreter with torch blocked

_NO_TORCH = """
import sys
for name in ("torch", "transformers", "safetensors", "numpy"):
    sys.modules[name] = None  # any import of these now raises ImportError
import prefix_store, prefix_store.errors, prefix_store.geometry
import prefix_store.storage.store, prefix_store.storage.filesystem, prefix_store.storage.redis_store
store = prefix_store.storage.store.open_store(sys.argv[1])
print(type(store).__name__, sorted(m for m in sys.modules if m.startswith("prefix_store")))
"""


def test_storage_imports_without_torch(tmp_path: Path) -> None:
    command = [sys.executable, "-c", _NO_TORCH, tmp_path.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("FileStore ")
    assert "prefix_store.formats" not in result.stdout and "prefix_store.cache" not in result.stdout


def test_every_exception_is_in_errors_under_one_root() -> None:
    classes = [
        value
        for _, value in inspect.getmembers(errors, inspect.isclass)
        if value.__module__ == errors.__name__
    ]
    assert {cls.__name__ for cls in classes} >= {
        "InvalidName",
        "PrefixNotFound",
        "VersionMismatch",
        "StoreUnavailable",
    }
    assert all(issubclass(cls, errors.PrefixStoreError) for cls in classes)
