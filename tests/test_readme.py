"""The README's tour and its SDK and CLI examples, run as written against a live ``prefix-serve serve``.

The only change made to the README's text is the port (the server here listens on a free one). The
commands run in a scratch folder that sees the repository's ``examples/`` and this venv as ``.venv``,
with ``curl`` failing on any HTTP error and the shell stopping at the first failing command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open

from server.model_source import DEFAULT_MODEL
from tests.server.api.live_server import live_server

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
README_URL = "http://127.0.0.1:8000"

# curl as the tour writes it, but a 4xx/5xx fails the script (and prints the body); each body on its line
BASH_PRELUDE = (
    "set -euo pipefail\n"
    "curl() { command curl --fail-with-body --silent --show-error --write-out '\\n' \"$@\"; }\n"
)


def section(title: str) -> str:
    """The README's text under ``## title``, up to the next heading of that level."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


@pytest.fixture(scope="module")
def server_url(smollm2_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``make serve``'s server: the default model (converted already by the fixture), a fresh store."""
    with live_server(DEFAULT_MODEL, tmp_path_factory.mktemp("store"), timeout=120) as url:
        yield url


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch folder laid out like the repository's: ``examples/`` and ``.venv`` (this interpreter's)."""
    (tmp_path / "examples").symlink_to(REPO / "examples")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    return tmp_path


def run_bash(script: str, url: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("PREFIX_SERVE_API_KEY", None)
    result = subprocess.run(
        ["bash", "-c", BASH_PRELUDE + script.replace(README_URL, url)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


@pytest.mark.e2e
@pytest.mark.real_model
def test_the_tour_runs_as_written(server_url: str, workdir: Path) -> None:
    (tour,) = code_blocks(section("A short tour"), "bash")
    out = run_bash(tour, server_url, workdir)
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    (chat,) = [e for e in events if e.get("object") == "chat.completion"]
    assert chat["model"] == DEFAULT_MODEL
    assert "Paris" in chat["choices"][0]["message"]["content"]  # a real model's answer
    uploads = [e for e in events if "version" in e and "sha256" in e]
    assert [(u["task_id"], u["source_format"]) for u in uploads] == [
        ("summarize", "native"),
        ("my-peft-task", "peft"),
    ]
    generations = [e for e in events if "token_ids" in e]
    assert [g["task_id"] for g in generations] == ["summarize", None]
    assert all(g["usage"]["completion_tokens"] == 16 for g in generations)
    assert generations[0]["token_ids"] != generations[1]["token_ids"]  # the prefix changes the output
    assert out.count("data: [DONE]") == 1
    (listing,) = [e for e in events if "prefixes" in e]
    assert {p["task_id"] for p in listing["prefixes"]} == {"summarize", "my-peft-task"}
    with safe_open(str(workdir / "copy.safetensors"), framework="pt") as copy:
        assert copy.get_tensor("keys").shape[2] == 8  # [layers, kv_heads, virtual tokens, head_dim]


@pytest.mark.e2e
@pytest.mark.real_model
def test_the_openai_example_runs_as_written(server_url: str, workdir: Path) -> None:
    (example,) = code_blocks(section("The HTTP API"), "python")
    out = run_bash(
        f".venv/bin/python - <<'PY'\n{example.replace(README_URL, server_url)}PY\n", server_url, workdir
    )
    assert any(colour in out.lower() for colour in ("red", "orange", "yellow", "green", "blue")), out


@pytest.mark.e2e
@pytest.mark.real_model
def test_the_sdk_and_cli_examples_run_as_written(server_url: str, workdir: Path) -> None:
    text = section("Python SDK and CLI")
    (sdk_example,) = code_blocks(text, "python")
    (cli_example,) = code_blocks(text, "bash")
    setup = ".venv/bin/python examples/random_prefix.py --peft adapter/ --num-virtual-tokens 8 --seed 2\n"
    sdk_out = run_bash(
        setup + f".venv/bin/python - <<'PY'\n{sdk_example.replace(README_URL, server_url)}PY\n",
        server_url,
        workdir,
    )
    assert "summarize" in sdk_out
    assert (workdir / "backup" / "summarize.safetensors").is_file()  # "backup/" is a folder

    cli_out = run_bash(cli_example, server_url, workdir)
    (listing,) = [
        json.loads(line) for line in cli_out.splitlines() if line.startswith(("[{", "[]", '{"prefixes"'))
    ]
    listed = listing if isinstance(listing, list) else listing["prefixes"]
    assert "summarize" not in {p["task_id"] for p in listed}  # `rm` came before `ls --json`
    peft_config = json.loads((workdir / "peft-copy" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "PREFIX_TUNING"  # `pull --peft`: the PEFT form
    report = json.loads((workdir / "bench-out" / "report.json").read_text())
    assert report["mode"] != "in-process"


TOP_LEVEL = {entry.name for entry in REPO.iterdir() if not entry.name.startswith(".")} | {".ci"}


def test_every_path_and_link_it_names_exists() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", README)
    local_links = [link for link in links if not re.match(r"[a-z]+://", link)]
    quoted = re.findall(r"`([A-Za-z0-9_.\-/]+)`", README)
    repo_paths = [path for path in quoted if "/" in path and path.split("/")[0] in TOP_LEVEL]
    assert local_links and repo_paths
    missing = [path for path in local_links + repo_paths if not (REPO / path).exists()]
    assert missing == []


@pytest.mark.e2e
def test_the_prefix_size_table_is_what_its_command_prints() -> None:
    printed = subprocess.run(
        [sys.executable, str(REPO / "examples" / "prefix_sizes.py")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    ).stdout.strip()
    assert printed in README


def test_the_benchmark_targets_are_those_of_the_committed_run() -> None:
    report = json.loads((REPO / "bench" / "results" / "cpu" / "report.json").read_text())
    performance = section("Performance")
    for target in report["targets"]:
        value = target["value"]
        shown = (f"**{value:.2f}**", f"**{value:.1f}×**")
        assert any(text in performance for text in shown), (target["name"], shown)


def test_the_quality_table_is_that_of_the_committed_run() -> None:
    """The README's quality table is the one ``make bench-quality`` wrote (and its JSON agrees)."""
    results = REPO / "bench" / "results" / "quality"
    table = (results / "quality.md").read_text().strip()
    assert table in section("Quality")
    report = json.loads((results / "quality.json").read_text())
    assert len(report["rows"]) == len(table.splitlines()) - 2
    for row in report["rows"]:
        assert f"| {row['bleu']:.1f} |" in table
