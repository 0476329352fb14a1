"""Writing a trained prefix or soft prompt out: ``prefix.safetensors`` (native), ``peft/`` (a PEFT adapter:
``PREFIX_TUNING`` for a prefix, ``PROMPT_TUNING`` for a soft prompt), ``training.json``.

Both adapter files come from ``prefix_store``'s own encoders, so the server reads back exactly these
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
from prefix_store.soft_prompt import Adapter
from server.training.checkpoint import write_atomically

NATIVE_NAME = "prefix.safetensors"
PEFT_DIR_NAME = "peft"
SUMMARY_NAME = "training.json"


def export_adapter(adapter: Adapter, geometry: ModelGeometry, out_dir: Path, *, base_model_name: str) -> Path:
    """Write ``out_dir/prefix.safetensors`` and ``out_dir/peft/``; returns the native file's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    native = out_dir / NATIVE_NAME
    write_atomically(native, encode_native(adapter, geometry))
    peft_dir = out_dir / PEFT_DIR_NAME
    staging = out_dir / f".{PEFT_DIR_NAME}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()  # created with the user's umask, like the other outputs
    write_peft_folder(adapter, geometry, staging, base_model_name_or_path=base_model_name)
    if peft_dir.exists():
        shutil.rmtree(peft_dir)
    staging.rename(peft_dir)
    return native


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    """``out_dir/training.json``: the run's options, per-epoch losses and parameter counts."""
    path = out_dir / SUMMARY_NAME
    write_atomically(path, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return path
