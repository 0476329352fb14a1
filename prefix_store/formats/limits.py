"""Limits applied to every prefix whatever its format: sizes before it is parsed, magnitudes once it is read.

No torch here (the engine's config holds a ``PrefixLimits`` and is built before the model loads): the
server's dtype travels by name (``float16``, ``bfloat16``, ``float32``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from prefix_store.errors import PrefixValidationError
from prefix_store.storage.excerpt import excerpt_int

_KIB = 1024
_MIB = 1024 * _KIB

# The largest |x| of any key, value or soft-prompt embedding element, by the dtype the server casts it to.
# A key k enters the score q·k (summed over head_dim, then scaled by 1/sqrt(head_dim)); a value v enters
# the attention output sum_j p_j v_j (p a softmax, so the output is at most max|v|), which o_proj maps back
# to the residual stream, whose every norm squares and sums it over the hidden size in float32; a soft
# prompt's embedding enters that residual stream directly. Measured on SmolLM2-135M (float32, real text):
# its own keys reach |k| = 24, values |v| = 17, input embeddings 2.0; a query head's sum |q_i| reaches 175
# (under 250 after rotary); an o_proj row's sum |w| reaches 467; the residual stream reaches 22,552.
# - float32 and bfloat16 (largest finite 3.4e38): the bound is 2**16. Even a value aligned against o_proj
#   in all 30 layers adds under 30 * 467 * 65536 = 9.2e8 to the residual; the float32 sum of squares
#   over the hidden size is then under 576 * (9.2e8 + 22552)**2 = 4.9e20, and a score under
#   250 * 65536 = 1.6e7: both 10**17 or more below overflow. (The demo model's logits are still right
#   with prefix values at 1e17; from 1e19 they are all zero, uniform logprobs, as the norms' sums of
#   squares overflow and rsqrt(inf) = 0; from 1e38 they are NaN. Soft prompts: norms zeroed from 1e18.)
#   Yet 2**16 is over 2,000 times what real keys and values hold.
# - float16 (largest finite 65504): the bound is 256, about 10 times the model's own largest key (trained
#   prefixes, through prefix_projection's MLP especially, run past the model's own magnitudes: 85-130 on
#   the tests' tiny models). Keys and values of random signs leave SmolLM2's float16 logits finite up to
#   256 (NaN at 1,024; soft prompts: finite at 1,024). No bound that real prefixes pass can also stop values aligned on purpose against o_proj in
#   every layer (NaN from 48, as the model's own residual already holds a third of the range): the engine
#   ends a row whose logits turn non-finite with an error (``EngineCore._run``), so such a prefix harms
#   only its own task.
MAX_ABS_VALUE: Mapping[str, float] = {"float32": 65536.0, "bfloat16": 65536.0, "float16": 256.0}


@dataclass(frozen=True)
class PrefixLimits:
    """Caps on what an uploaded or loaded prefix may make big. Oversize input is refused with status 413,
    a value over the magnitude bound of the server's dtype (``max_abs_value``) with 400."""

    max_file_bytes: int = 64 * _MIB  # a native file or a PEFT adapter_model.safetensors
    # the JSON header of a safetensors file (a LoRA task on every projection of a 30-layer model lists 420
    # tensors, about 60 KiB)
    max_header_bytes: int = _MIB
    max_lora_rank: int = 64  # of any module of a LoRA task
    max_virtual_tokens: int = 512
    min_virtual_tokens: int = 1
    max_config_bytes: int = 64 * _KIB  # a PEFT adapter_config.json
    # the dtype the server casts prefixes to, which sets max_abs_value (the server always sets it; tools
    # without a server, training's exports among them, work in float32)
    serving_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.serving_dtype not in MAX_ABS_VALUE:
            raise ValueError(
                f"PrefixLimits.serving_dtype is {self.serving_dtype!r}; "
                f"it must be one of {', '.join(MAX_ABS_VALUE)}"
            )
        for name in (
            "max_file_bytes",
            "max_header_bytes",
            "max_config_bytes",
            "min_virtual_tokens",
            "max_lora_rank",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"PrefixLimits.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_virtual_tokens < self.min_virtual_tokens:
            raise ValueError(
                f"PrefixLimits.max_virtual_tokens ({self.max_virtual_tokens}) is below "
                f"min_virtual_tokens ({self.min_virtual_tokens})"
            )

    @property
    def max_abs_value(self) -> float:
        """The largest |x| a key, value or embedding element may hold on a ``serving_dtype`` server."""
        return MAX_ABS_VALUE[self.serving_dtype]

    def for_dtype(self, dtype: object) -> PrefixLimits:
        """These limits for a server that casts prefixes to ``dtype`` (a ``torch.dtype`` or its name)."""
        return replace(self, serving_dtype=str(dtype).removeprefix("torch."))

    def check_magnitude(self, peak: float, what: str) -> None:
        """Refuse a tensor whose largest |x| (``peak``) is over ``max_abs_value`` (400); ``what`` names it."""
        if peak > self.max_abs_value:
            raise PrefixValidationError(
                f"{what} holds a value of magnitude {peak:.4g}, over the bound of {self.max_abs_value:g} "
                f"for a {self.serving_dtype} server: every key, value and embedding must have "
                f"|x| <= {self.max_abs_value:g} (larger ones overflow in attention)"
            )

    def check_num_virtual_tokens(self, num_virtual_tokens: int, source: str) -> None:
        """Refuse a prefix length outside ``[min_virtual_tokens, max_virtual_tokens]`` (413 when over)."""
        if num_virtual_tokens < self.min_virtual_tokens:
            raise PrefixValidationError(
                f"{source}: num_virtual_tokens is {excerpt_int(num_virtual_tokens)}; "
                f"it must be at least {self.min_virtual_tokens}"
            )
        if num_virtual_tokens > self.max_virtual_tokens:
            raise PrefixValidationError(
                f"{source}: num_virtual_tokens is {excerpt_int(num_virtual_tokens)}, "
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
