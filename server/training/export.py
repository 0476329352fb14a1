"""Writing a trained prefix out: ``prefix.safetensors`` (native), ``peft/`` (a PEFT adapter), ``training.json``.

Both prefix files come from ``prefix_store``'s own encoders, so the server reads back exactly these
numbers. Each file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from prefix_store.formats.native import encode_native
from prefix_store.formats.peft import write_peft_folder
from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix
from server.training.checkpoint import write_atomically

NATIVE_NAME = "prefix.safetensors"
PEFT_DIR_NAME = "peft"
SUMMARY_NAME = "training.json"


def export_prefix(prefix: Prefix, geometry: ModelGeometry, out_dir: Path, *, base_model_name: str) -> Path:
    """Write ``out_dir/prefix.safetensors`` and ``out_dir/peft/``; returns the native file's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    native = out_dir / NATIVE_NAME
    write_atomically(native, encode_native(prefix, geometry))
    peft_dir = out_dir / PEFT_DIR_NAME
    staging = out_dir / f".{PEFT_DIR_NAME}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()  # created with the user's umask, like the other outputs
    write_peft_folder(prefix, geometry, staging, base_model_name_or_path=base_model_name)
    if peft_dir.exists():
        shutil.rmtree(peft_dir)
    staging.rename(peft_dir)
    return native


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    """``out_dir/training.json``: the run's options, per-epoch losses and parameter counts."""
    path = out_dir / SUMMARY_NAME
    write_atomically(path, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return path
