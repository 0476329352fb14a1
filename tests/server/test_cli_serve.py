"""``prefix-serve serve`` and ``--version`` as a user runs them: the real command in a subprocess, its
help, its one-line start-up errors (no traceback, exit 2), and a plain folder as the store."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from transformers import AutoModelForSeq2SeqLM, MptConfig, MptForCausalLM

from server.cli import build_parser
from server.cli.serve import CLI_OPTIONS, LIMIT_OPTIONS, describe_setting
from server.config import ServeSettings
from server.demo_model import build_demo_tokenizer
from testing.server_process import ServerProcess
from tests.server.engine.test_encoder_decoder import unserved_family

pytestmark = pytest.mark.e2e  # starts servers or other processes

# CUDA hidden: `--device cuda` is refused the same way on every machine, with or without a GPU
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
OWN_COMMANDS = ("serve", "demo-model", "keys create", "push", "pull", "ls", "rm", "generate")


def _prefix_serve(
    *argv: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *argv],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=timeout,
    )


def test_version_comes_from_the_installed_distribution() -> None:
    result = _prefix_serve("--version")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"prefix-serve {metadata.version('prefix-serve')}\n",
        "",
    )


def _subparser(parser: argparse.ArgumentParser, path: str) -> argparse.ArgumentParser:
    for name in path.split():
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("command", OWN_COMMANDS)
def test_every_option_states_its_default(command: str) -> None:
    parser = _subparser(build_parser(), command)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        help_text = formatter._expand_help(action)
        assert "default" in help_text, f"{command} {action.option_strings[0]}: {help_text!r}"
        assert "None" not in help_text, help_text


def test_serve_help_lists_every_setting_and_its_environment_variable() -> None:
    result = _prefix_serve("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # unwrapped
    assert "Every option also reads PREFIX_SERVE_<OPTION>" in text
    for name in ServeSettings.model_fields:
        if name in CLI_OPTIONS + LIMIT_OPTIONS:
            assert f"--{name.replace('_', '-')}" in text
        else:
            assert f"PREFIX_SERVE_{name.upper()}" in text, name
            assert " ".join(describe_setting(name).split()) in text, name
    assert "PREFIX_SERVE_MAX_QUEUE waiting requests, server-wide; more get 429 (default: 256)" in text
    assert "(default: 600 with auth on, no limit with auth off)" in text
    assert "(default: 64 with auth on, no limit with auth off)" in text


@pytest.fixture()
def busy_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--store", "bogus://x"], "--store bogus://x: unsupported store URL scheme 'bogus'"),
        (["--store", "file://relative/path"], "--store file://relative/path: a file store URL is"),
        (["--model", "/nonexistent"], "--model /nonexistent: no such file or folder"),
        (["--model", "{tmp}"], "--model {tmp}: not a model folder (it has no config.json)"),
        (
            ["--model", "not a model"],
            "--model not a model: neither a built-in model (smollm2-135m-instruct, demo), a local model folder",
        ),
        (["--api-keys", "{tmp}/missing.json"], "--api-keys: the keys file {tmp}/missing.json does not exist"),
        (["--api-keys", "{tmp}"], "--api-keys: cannot read the keys file {tmp}: Is a directory"),
        (["--api-keys", "{tmp}/bad.json"], "--api-keys: the keys file {tmp}/bad.json is malformed: "),
        (["--port", "70000"], "--port 70000: Input should be less than or equal to 65535"),
        (["--port", "{busy}"], "--port {busy}: already in use on 127.0.0.1"),
        (["--tenant-max-concurrent", "-1"], "--tenant-max-concurrent -1: Input should be greater than"),
        (["--device", "cuda"], "--device cuda was asked for, but no CUDA device is available"),
    ],
)
def test_startup_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, tmp_path: Path, busy_port: int
) -> None:
    (tmp_path / "bad.json").write_text('{"keys": [{"tenant": "a", "role": "root", "sha256": "00"}]}')
    names = {"tmp": tmp_path, "busy": busy_port}
    argv, message = [arg.format(**names) for arg in argv], message.format(**names)
    result = _prefix_serve("serve", *argv)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"prefix-serve: error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "base model" not in result.stderr  # found before any model loads (the load logs that first)


def test_an_environment_setting_is_named_as_such(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve"],
        capture_output=True,
        text=True,
        env={**ENV, "PREFIX_SERVE_MAX_QUEUE": "0", "PREFIX_SERVE_STORE": "bogus://x"},
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "PREFIX_SERVE_STORE=bogus://x: unsupported store URL scheme" in result.stderr
    assert "PREFIX_SERVE_MAX_QUEUE=0: Input should be greater than or equal to 1" in result.stderr


def _start_refusal(model: Path, store: Path) -> str:
    """The reason ``serve --model model`` gives for not starting: one line, no traceback."""
    result = _prefix_serve(
        "serve", "--model", str(model), "--store", str(store), "--port", "0", "--device", "cpu", timeout=120
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, result.stderr  # the reason, then uvicorn's "Application startup failed"
    return errors[0]


def test_a_model_that_fails_to_load_is_one_line_without_traceback(tmp_path: Path) -> None:
    """Past the cheap checks (the folder looks like a model), the loader refuses it at start-up."""
    model = tmp_path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    assert f"cannot start: --model {model}: cannot load it: " in _start_refusal(model, tmp_path / "store")


def test_a_model_whose_attention_cannot_be_paged_is_refused_in_one_line(tmp_path: Path) -> None:
    """MPT computes ALiBi attention itself: refused when the server starts, naming the reason."""
    model = tmp_path / "tiny-mpt"
    tokenizer = build_demo_tokenizer()
    config = MptConfig(vocab_size=len(tokenizer), d_model=32, n_layers=2, n_heads=4)
    MptForCausalLM(config).save_pretrained(model)
    tokenizer.save_pretrained(model)
    reason = f"cannot start: --model {model}: cannot serve it: MptForCausalLM does not route its attention"
    assert reason in _start_refusal(model, tmp_path / "store")


def test_an_encoder_decoder_family_the_engine_does_not_serve_is_refused_in_one_line(tmp_path: Path) -> None:
    """Pegasus is an encoder-decoder outside the served families: refused at start, never loaded as a
    causal LM."""
    model = tmp_path / "tiny-prophetnet"
    tokenizer = build_demo_tokenizer()
    AutoModelForSeq2SeqLM.from_config(unserved_family(len(tokenizer))).save_pretrained(model)
    tokenizer.save_pretrained(model)
    reason = (
        f"cannot start: --model {model}: cannot serve it: prophetnet is an encoder-decoder model of a family"
    )
    assert reason in _start_refusal(model, tmp_path / "store")


def test_a_kv_pool_too_small_for_the_batch_is_refused_at_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--model",
            "demo",
            "--store",
            str(tmp_path),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        env={**ENV, "PREFIX_SERVE_KV_CACHE_BYTES": "100000"},
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, result.stderr
    assert "cannot start: PREFIX_SERVE_KV_CACHE_BYTES=100000: a KV pool of 100000 bytes holds" in errors[0]


def test_a_plain_folder_is_the_store_and_limit_options_apply(demo_model_dir: Path, tmp_path: Path) -> None:
    """``--store ./data`` (relative to where the server starts) is that folder; ``--tenant-requests-per-
    minute`` limits the one tenant of a server with auth off."""
    limit = ("--tenant-requests-per-minute", "2")
    with ServerProcess(demo_model_dir, "./data", env=ENV, args=limit, cwd=tmp_path) as server:
        assert (tmp_path / "data" / "tenants").is_dir()
        body = {"prompt": "Once upon a time", "max_new_tokens": 1}
        statuses = [httpx.post(f"{server.url}/v1/generate", json=body, timeout=60) for _ in range(3)]
        assert [r.status_code for r in statuses] == [200, 200, 429]
        assert int(statuses[-1].headers["retry-after"]) >= 1
        assert "per-tenant limits (auth off): 2 requests/minute, no concurrency limit" in server.log_tail(
            50_000
        )


def test_a_plain_path_store_setting_is_a_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ServeSettings(store="./data").store == (tmp_path / "data").resolve().as_uri()
    assert ServeSettings(store=str(tmp_path / "abs")).store == (tmp_path / "abs").as_uri()
    assert ServeSettings(store="redis://127.0.0.1:6379/0").store == "redis://127.0.0.1:6379/0"
    monkeypatch.setenv("PREFIX_SERVE_STORE", "data2")
    assert ServeSettings().store == (tmp_path / "data2").resolve().as_uri()
