"""The in-memory value of one task's prefix."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import torch

from prefix_store.errors import PrefixValidationError
from prefix_store.formats.safetensors_check import all_finite
from prefix_store.geometry import ModelGeometry


@dataclass(frozen=True)
class Prefix:
    """Learned key/value vectors prepended to the attention cache of every layer.

    Keys are stored as the model's cache stores them (after any rotary embedding: prefix keys are
    never rotated), so they can be copied into the cache as they are.
    """

    keys: torch.Tensor  # [layers, kv_heads, P, head_dim]
    values: torch.Tensor  # [layers, kv_heads, P, head_dim]

    @cached_property
    def digest(self) -> str:
        """A sha256 of the keys' and values' bytes (and their shape and dtype): what names this prefix's
        content where no stored version's sha256 does (an in-process prefix). Computed once."""
        content = hashlib.sha256(f"{tuple(self.keys.shape)}{self.keys.dtype}".encode())
        for tensor in (self.keys, self.values):
            content.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return content.hexdigest()

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.keys.shape[2])

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def fits(self, geometry: ModelGeometry) -> bool:
        expected = geometry.prefix_shape(self.num_virtual_tokens)
        return tuple(self.keys.shape) == expected and tuple(self.values.shape) == expected

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Prefix:
        """A copy placed on ``device`` in ``dtype`` (the model's), ready to enter the cache.

        Raises ``PrefixValidationError`` when a value does not survive the cast (a float32 value over
        65504 becomes Inf in float16), since a non-finite prefix would poison every row it shares a
        kernel with.
        """
        placed = Prefix(self.keys.to(device=device, dtype=dtype), self.values.to(device=device, dtype=dtype))
        casts = self.keys.dtype != dtype or self.values.dtype != dtype  # a plain copy cannot overflow
        if casts and not (all_finite(placed.keys) and all_finite(placed.values)):
            raise PrefixValidationError(f"the prefix has values too large for the server's dtype {dtype}")
        return placed
