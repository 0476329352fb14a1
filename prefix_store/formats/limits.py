"""Size limits applied to every prefix before it is parsed, whatever its format."""

from __future__ import annotations

from dataclasses import dataclass

from prefix_store.errors import PrefixValidationError

_KIB = 1024
_MIB = 1024 * _KIB


@dataclass(frozen=True)
class PrefixLimits:
    """Caps on what an uploaded or loaded prefix may make big. Oversize input is refused with status 413."""

    max_file_bytes: int = 64 * _MIB  # a native file or a PEFT adapter_model.safetensors
    max_header_bytes: int = 64 * _KIB  # the JSON header of a safetensors file
    max_virtual_tokens: int = 512
    min_virtual_tokens: int = 1
    max_config_bytes: int = 64 * _KIB  # a PEFT adapter_config.json

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_header_bytes", "max_config_bytes", "min_virtual_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"PrefixLimits.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_virtual_tokens < self.min_virtual_tokens:
            raise ValueError(
                f"PrefixLimits.max_virtual_tokens ({self.max_virtual_tokens}) is below "
                f"min_virtual_tokens ({self.min_virtual_tokens})"
            )

    def check_num_virtual_tokens(self, num_virtual_tokens: int, source: str) -> None:
        """Refuse a prefix length outside ``[min_virtual_tokens, max_virtual_tokens]`` (413 when over)."""
        if num_virtual_tokens < self.min_virtual_tokens:
            raise PrefixValidationError(
                f"{source}: num_virtual_tokens is {num_virtual_tokens}; "
                f"it must be at least {self.min_virtual_tokens}"
            )
        if num_virtual_tokens > self.max_virtual_tokens:
            raise PrefixValidationError(
                f"{source}: num_virtual_tokens is {num_virtual_tokens}, "
                f"over the limit of {self.max_virtual_tokens}",
                status=413,
            )

    def check_file_size(self, size: int, source: str) -> None:
        """Refuse a safetensors payload over ``max_file_bytes`` (413)."""
        if size > self.max_file_bytes:
            raise PrefixValidationError(
                f"{source} is {size} bytes, over the limit of {self.max_file_bytes} bytes", status=413
            )

    def check_config_size(self, size: int, source: str) -> None:
        """Refuse an adapter config over ``max_config_bytes`` (413)."""
        if size > self.max_config_bytes:
            raise PrefixValidationError(
                f"{source} is {size} bytes, over the limit of {self.max_config_bytes} bytes", status=413
            )
