"""Reading a prefix from disk in either accepted format: a native file or a PEFT adapter folder."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from prefix_store.errors import PrefixValidationError
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.native import decode_native
from prefix_store.formats.peft import ADAPTER_CONFIG_NAME, ADAPTER_MODEL_NAME, decode_peft
from prefix_store.geometry import ModelGeometry
from prefix_store.soft_prompt import Adapter

_PICKLE_ADAPTER_NAME = "adapter_model.bin"
_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
_PICKLE_REFUSED = "pickle checkpoints are refused (loading one can run arbitrary code)"


class SourceFormat(StrEnum):
    """The format a prefix arrived in (the ``source_format`` of an upload's answer)."""

    NATIVE = "native"
    PEFT = "peft"


def load_prefix_source(
    path: Path, geometry: ModelGeometry, limits: PrefixLimits
) -> tuple[Adapter, SourceFormat]:
    """Read and fully validate a prefix or soft prompt: a native ``.safetensors`` file or a PEFT adapter folder.

    Sizes are checked with ``stat`` before anything is read. Raises ``PrefixValidationError``.
    """
    if path.is_dir():
        config, model = _read_peft_folder(path, limits)
        return decode_peft(config, model, geometry, limits), SourceFormat.PEFT
    if path.is_file():
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise PrefixValidationError(
                f"a {path.suffix} file is a pickle checkpoint: {_PICKLE_REFUSED}; "
                "give a native .safetensors prefix or a PEFT adapter folder"
            )
        if path.suffix.lower() != ".safetensors":
            raise PrefixValidationError(
                "a prefix source is a native .safetensors file or a PEFT adapter folder "
                f"({ADAPTER_CONFIG_NAME} + {ADAPTER_MODEL_NAME})"
            )
        data = _read_capped(path, "prefix file", limits.max_file_bytes, limits.check_file_size)
        return decode_native(data, geometry, limits), SourceFormat.NATIVE
    raise PrefixValidationError("no prefix file or adapter folder exists at the given path")


def _read_peft_folder(folder: Path, limits: PrefixLimits) -> tuple[bytes, bytes]:
    config_path, model_path = folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_MODEL_NAME
    if not model_path.is_file() and (folder / _PICKLE_ADAPTER_NAME).exists():
        raise PrefixValidationError(
            f"the adapter folder holds {_PICKLE_ADAPTER_NAME} and no {ADAPTER_MODEL_NAME}: "
            f"{_PICKLE_REFUSED}; re-save the adapter with safetensors "
            "(PEFT's save_pretrained(..., safe_serialization=True))"
        )
    for required in (config_path, model_path):
        if not required.is_file():
            raise PrefixValidationError(
                f"the adapter folder has no {required.name}; a PEFT adapter folder holds "
                f"{ADAPTER_CONFIG_NAME} and {ADAPTER_MODEL_NAME}"
            )
    config = _read_capped(config_path, ADAPTER_CONFIG_NAME, limits.max_config_bytes, limits.check_config_size)
    model = _read_capped(model_path, ADAPTER_MODEL_NAME, limits.max_file_bytes, limits.check_file_size)
    return config, model


def _read_capped(path: Path, source: str, cap: int, check: Callable[[int, str], None]) -> bytes:
    """Read at most ``cap + 1`` bytes, checking the size before and after (the file may grow meanwhile)."""
    try:
        check(path.stat().st_size, source)
        with path.open("rb") as file:
            data = file.read(cap + 1)
    except OSError as exc:
        raise PrefixValidationError(f"could not read {source}: {exc.strerror}") from None
    check(len(data), source)
    return data
