"""Prefix format, validation, PEFT import/export and storage of prefix-tuned tasks.

This package imports nothing of ``server``: the engine and the API depend on it, never the reverse.
Its exports are imported on first use, so the storage modules (``store``, ``filesystem``,
``redis_store``) load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefix_store.errors import PrefixStoreError, PrefixValidationError
    from prefix_store.geometry import ModelGeometry
    from prefix_store.limits import PrefixLimits
    from prefix_store.native_format import NATIVE_FORMAT, decode_native, encode_native
    from prefix_store.peft_format import decode_peft, encode_peft, write_peft_folder
    from prefix_store.prefix import Prefix
    from prefix_store.source import SourceFormat, load_prefix_source

_EXPORTS = {
    "NATIVE_FORMAT": "prefix_store.native_format",
    "ModelGeometry": "prefix_store.geometry",
    "Prefix": "prefix_store.prefix",
    "PrefixLimits": "prefix_store.limits",
    "PrefixStoreError": "prefix_store.errors",
    "PrefixValidationError": "prefix_store.errors",
    "SourceFormat": "prefix_store.source",
    "decode_native": "prefix_store.native_format",
    "decode_peft": "prefix_store.peft_format",
    "encode_native": "prefix_store.native_format",
    "encode_peft": "prefix_store.peft_format",
    "load_prefix_source": "prefix_store.source",
    "write_peft_folder": "prefix_store.peft_format",
}

__all__ = [
    "NATIVE_FORMAT",
    "ModelGeometry",
    "Prefix",
    "PrefixLimits",
    "PrefixStoreError",
    "PrefixValidationError",
    "SourceFormat",
    "decode_native",
    "decode_peft",
    "encode_native",
    "encode_peft",
    "load_prefix_source",
    "write_peft_folder",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prefix_store' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
