"""``prefix-serve push | pull | ls | rm | generate`` end to end against a real server: output, ``--json``,
exit codes and one-line errors."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import pytest
from prefix_client import Client

from server.cli import main
from server.cli.prefixes import human_bytes
from tests.clients.conftest import Keys
from tests.server.api.live_server import free_port

pytestmark = pytest.mark.e2e  # starts servers or other processes

PROMPT = "Once upon a time"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_push_ls_generate_pull_rm(
    server: str,
    keys: Keys,
    peft_adapter: Path,
    native_prefix: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin = ["--server", server, "--api-key", keys.cli_admin]
    assert _run(capsys, "ls", *admin) == (0, "no prefixes\n", "")

    code, out, err = _run(capsys, "push", "summarize", str(peft_adapter), *admin)
    assert code == 0 and err == ""
    assert out.startswith("created summarize: version ") and "6 virtual tokens" in out and "PEFT" in out
    code, out, _ = _run(capsys, "push", "native-task", str(native_prefix), *admin, "--json")
    pushed = json.loads(out)
    assert code == 0 and pushed["source_format"] == "native" and pushed["created"] is True

    code, out, _ = _run(capsys, "ls", *admin)
    assert code == 0
    header, *rows = [line.split() for line in out.strip().splitlines()]
    assert header == ["task", "version", "kind", "virtual", "tokens", "size", "resident", "created"]
    table = {row[0]: row for row in rows}
    assert set(table) == {"summarize", "native-task"}
    assert table["native-task"][1:6] == [
        pushed["version"],
        "prefix",
        "4",
        *human_bytes(pushed["bytes"]).split(),
    ]
    assert table["native-task"][6] in ("yes", "no")

    code, out, _ = _run(capsys, "ls", *admin, "--json")
    listed = json.loads(out)["prefixes"]
    assert code == 0 and {p["task_id"] for p in listed} == {"summarize", "native-task"}
    assert all(
        set(p) >= {"version", "kind", "num_virtual_tokens", "bytes", "created_at", "resident"} for p in listed
    )

    with Client(server, keys.cli_user) as client:
        expected = client.generate(PROMPT, task_id="summarize", max_new_tokens=10)
    user = ["--server", server, "--api-key", keys.cli_user]
    code, out, err = _run(capsys, "generate", "--task", "summarize", "--max-new-tokens", "10", PROMPT, *user)
    assert (code, out, err) == (0, expected.text + "\n", "")
    code, out, _ = _run(
        capsys, "generate", "--task", "summarize", "--max-new-tokens", "10", PROMPT, *user, "--json"
    )
    generation = json.loads(out)
    assert (
        code == 0
        and generation["token_ids"] == expected.token_ids
        and generation["finish_reason"] == "length"
    )
    code, out, _ = _run(
        capsys, "generate", PROMPT, "--max-new-tokens", "5", "--temperature", "1", "--top-p", "0.9",
        "--top-k", "40", "--seed", "3", "--stop", "zzz", *user, "--json",
    )  # fmt: skip
    assert code == 0 and json.loads(out)["usage"]["completion_tokens"] == 5

    code, out, _ = _run(capsys, "pull", "summarize", str(tmp_path), *admin)
    pulled = tmp_path / "summarize.safetensors"
    assert (code, out) == (0, f"saved summarize to {pulled}\n")
    assert pulled.stat().st_size == next(p["bytes"] for p in listed if p["task_id"] == "summarize")
    backup = tmp_path / "backup"  # does not exist: the trailing '/' makes it a folder
    code, out, _ = _run(capsys, "pull", "summarize", f"{backup}/", *admin)
    assert (code, out) == (0, f"saved summarize to {backup / 'summarize.safetensors'}\n")
    assert (backup / "summarize.safetensors").read_bytes() == pulled.read_bytes()
    code, out, _ = _run(capsys, "pull", "summarize", str(tmp_path / "copy.bin"), *admin, "--json")
    assert (code, json.loads(out)) == (0, {"task_id": "summarize", "path": str(tmp_path / "copy.bin")})
    assert (tmp_path / "copy.bin").read_bytes() == pulled.read_bytes()
    code, out, _ = _run(capsys, "pull", "summarize", str(tmp_path / "as-peft"), *admin, "--peft")
    assert (code, out) == (0, f"saved summarize to {tmp_path / 'as-peft'}\n")
    config = json.loads((tmp_path / "as-peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"]) == ("PREFIX_TUNING", 6)
    code, out, _ = _run(capsys, "push", "round-trip", str(tmp_path / "as-peft"), *admin, "--json")
    assert code == 0 and json.loads(out)["sha256"] == hashlib.sha256(pulled.read_bytes()).hexdigest()
    assert _run(capsys, "rm", "round-trip", *admin)[0] == 0

    assert _run(capsys, "rm", "summarize", *admin) == (0, "deleted summarize\n", "")
    code, out, _ = _run(capsys, "rm", "native-task", *admin, "--if-match", pushed["version"], "--json")
    assert code == 0 and json.loads(out) == {"task_id": "native-task", "deleted": True}
    assert _run(capsys, "ls", *admin) == (0, "no prefixes\n", "")
    assert json.loads(_run(capsys, "ls", *admin, "--json")[1]) == {"prefixes": []}


def test_generate_writes_each_token_as_it_comes(
    server: str, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.events: list[str] = []

        def write(self, text: str) -> int:
            self.events.append("write")
            return super().write(text)

        def flush(self) -> None:
            self.events.append("flush")

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setenv("PREFIX_SERVE_URL", server)  # the environment instead of options
    monkeypatch.setenv("PREFIX_SERVE_API_KEY", keys.cli_user)
    assert main(["generate", PROMPT, "--max-new-tokens", "12"]) == 0
    assert terminal.events[:24] == ["write", "flush"] * 12  # flushed token by token


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rm", "missing"], "404 not_found: "),
        (["generate", "--task", "missing", PROMPT], "404 not_found: "),
        (["push", "bad..", "{adapter}", "--if-match", "1-x"], "412 precondition_failed: "),
        (["push", ".bad", "{adapter}"], "invalid task id '.bad'"),
        (["push", "t", "{missing}"], "{missing}: no such file or folder"),
        (["ls", "--api-key", "ps-wrong"], "401 authentication_error: "),
        (["generate", PROMPT, "--temperature", "-1"], "422 validation_error: "),
    ],
)
def test_errors_exit_1_with_one_line(
    server: str,
    keys: Keys,
    peft_adapter: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    names = {"adapter": peft_adapter, "missing": tmp_path / "missing"}
    argv, message = [arg.format(**names) for arg in argv], message.format(**names)
    code, out, err = _run(
        capsys, *argv, "--server", server, *(["--api-key", keys.cli_admin] * ("--api-key" not in argv))
    )
    assert code == 1 and out == ""
    assert err.startswith(f"prefix-serve: error: {message}") and err.count("\n") == 1, err


def test_a_user_key_cannot_push_and_no_server_is_a_clear_error(
    server: str, keys: Keys, native_prefix: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        capsys, "push", "t", str(native_prefix), "--server", server, "--api-key", keys.cli_user
    )
    assert code == 1 and err.startswith("prefix-serve: error: 403 permission_denied: ")
    code, _, err = _run(capsys, "ls", "--server", f"http://127.0.0.1:{free_port()}", "--max-retries", "0")
    assert (
        code == 1
        and err.startswith("prefix-serve: error: could not connect to the server")
        and err.count("\n") == 1
    )
