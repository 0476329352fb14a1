"""Prefix format, validation, PEFT import/export and storage of prefix-tuned tasks.

This package imports nothing of ``server``: the engine and the API depend on it, never the reverse.
"""

from prefix_store.errors import PrefixStoreError, PrefixValidationError
from prefix_store.geometry import ModelGeometry
from prefix_store.limits import PrefixLimits
from prefix_store.native_format import NATIVE_FORMAT, decode_native, encode_native
from prefix_store.peft_format import decode_peft, encode_peft, write_peft_folder
from prefix_store.prefix import Prefix
from prefix_store.source import SourceFormat, load_prefix_source

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
