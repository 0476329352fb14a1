"""The SDK and the CLI's client commands work where torch cannot be imported (``pip install
./clients/python`` into a fresh venv is checked by ``.ci/run``; here torch is blocked in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.clients.conftest import Keys

pytestmark = pytest.mark.e2e  # starts servers or other processes

_BLOCK_TORCH = """
import sys
for name in ("torch", "transformers", "safetensors", "numpy"):
    sys.modules[name] = None  # any import of these now raises ImportError
"""


def _run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_sdk_imports_and_generates_without_torch(server: str, keys: Keys) -> None:
    result = _run_without_torch(
        f"""
        import prefix_client
        from prefix_client import Client
        loaded = [name for name, module in sys.modules.items() if module is not None]
        assert not [m for m in loaded if m.split(".")[0] in ("server", "prefix_store", "torch")], loaded
        with Client({server!r}, {keys.user!r}) as client:
            generation = client.generate("Once upon a time", max_new_tokens=3)
            assert generation.usage.completion_tokens == 3
            with client.stream("Once upon a time", max_new_tokens=3) as tokens:
                assert len(list(tokens)) == 3
        print("ok", prefix_client.__version__)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")


def test_the_cli_runs_without_torch(server: str, keys: Keys) -> None:
    result = _run_without_torch(
        f"""
        from server.cli import main
        assert main(["ls", "--server", {server!r}, "--api-key", {keys.cli_admin!r}, "--json"]) == 0
        assert main(["generate", "hi", "--max-new-tokens", "2", "--server", {server!r}, "--api-key", {keys.cli_user!r}]) == 0
        try:
            main(["--help"])
        except SystemExit as exit:
            assert exit.code == 0
        """
    )
    assert result.returncode == 0, result.stderr
    assert '"prefixes"' in result.stdout and "usage: prefix-serve" in result.stdout
