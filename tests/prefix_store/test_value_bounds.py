"""The magnitude bound every upload and every load passes: a key, value or soft-prompt embedding element
over the bound of the server's dtype (256 for float16, 2**16 for bfloat16 and float32) is refused with a
400 that states the bound, in every format; a value at the bound is accepted. The upload route and the
registry's load both hold prefixes to the bound of the dtype they cast to."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch

from prefix_store.cache.loading import fetch_prefix
from prefix_store.errors import PrefixValidationError
from prefix_store.formats.limits import MAX_ABS_VALUE, PrefixLimits
from prefix_store.formats.native import decode_native, encode_native
from prefix_store.formats.peft import decode_peft
from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import Adapter, SoftPrompt
from prefix_store.storage.filesystem import FileStore
from testing.peft_reference import make_peft_adapter, make_peft_soft_prompt
from tests.prefix_store.conftest import GEOMETRY, put
from tests.prefix_store.test_peft_format import LLAMA, read_adapter, tiny_llama

pytestmark = [
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
NUM_VIRTUAL_TOKENS = 3
Decode = Callable[[float, PrefixLimits], Adapter]  # the upload with one element set to a value, decoded


@dataclass(frozen=True)
class Upload:
    tensor: str  # the tensor that holds the value, as messages name it
    decode: Decode


def _small(*shape: int, seed: int = 0) -> torch.Tensor:
    """Values like a real prefix's: a few units at most."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _native_prefix(tensor: str) -> Decode:
    def decode(value: float, limits: PrefixLimits) -> Adapter:
        shape = LLAMA.prefix_shape(NUM_VIRTUAL_TOKENS)  # [layers, kv_heads, P, head_dim]
        tensors = {"keys": _small(*shape, seed=1), "values": _small(*shape, seed=2)}
        tensors[tensor][-1, -1, -1, -1] = value  # the last layer's last virtual token
        return decode_native(encode_native(Prefix(**tensors), LLAMA), LLAMA, limits)

    return decode


def _native_soft_prompt(value: float, limits: PrefixLimits) -> Adapter:
    embeddings = _small(NUM_VIRTUAL_TOKENS, LLAMA.embedding_dim or 0)  # [P, embedding_dim]
    embeddings[1, 7] = value
    return decode_native(encode_native(SoftPrompt(embeddings), LLAMA), LLAMA, limits)


def _peft(folder: Path) -> Decode:
    """A genuine PEFT adapter whose ``prompt_embeddings`` get the value in their last element (for a prefix:
    the last layer's value half; the rest is what PEFT initialised)."""
    config, model = read_adapter(folder)

    def decode(value: float, limits: PrefixLimits) -> Adapter:
        embeddings = safetensors.torch.load(model)["prompt_embeddings"].clone()  # [P, width]
        embeddings[-1, -1] = value
        changed = safetensors.torch.save({"prompt_embeddings": embeddings}, metadata={"format": "pt"})
        return decode_peft(config, changed, LLAMA, limits)

    return decode


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Upload]:
    """Every format an upload may take, by name."""
    folder = tmp_path_factory.mktemp("adapters")
    prefix_tuning = {
        name: make_peft_adapter(
            tiny_llama(), folder / name, num_virtual_tokens=NUM_VIRTUAL_TOKENS, prefix_projection=projection
        )
        for name, projection in (("prefix", False), ("prefix-projection", True))
    }
    soft = {
        method: make_peft_soft_prompt(tiny_llama(), folder / method, num_virtual_tokens=2, method=method)
        for method in ("PROMPT_TUNING", "P_TUNING")
    }
    return {
        "native prefix, keys": Upload("keys", _native_prefix("keys")),
        "native prefix, values": Upload("values", _native_prefix("values")),
        "native soft prompt": Upload("embeddings", _native_soft_prompt),
        "PEFT PREFIX_TUNING": Upload("prompt_embeddings", _peft(prefix_tuning["prefix"])),
        "PEFT PREFIX_TUNING with projection": Upload(
            "prompt_embeddings", _peft(prefix_tuning["prefix-projection"])
        ),
        "PEFT PROMPT_TUNING": Upload("prompt_embeddings", _peft(soft["PROMPT_TUNING"])),
        "PEFT P_TUNING": Upload("prompt_embeddings", _peft(soft["P_TUNING"])),
    }


FORMATS = [
    "native prefix, keys",
    "native prefix, values",
    "native soft prompt",
    "PEFT PREFIX_TUNING",
    "PEFT PREFIX_TUNING with projection",
    "PEFT PROMPT_TUNING",
    "PEFT P_TUNING",
]


def _bound_message(tensor: str, dtype: str) -> str:
    bound = f"{MAX_ABS_VALUE[dtype]:g}"
    return (
        rf"tensor '{tensor}' holds a value of magnitude [0-9.e+]+, over the bound of {bound} for a {dtype} "
        rf"server: every key, value and embedding must have \|x\| <= {bound} \(larger ones overflow in attention\)"
    )


def _peak(adapter: Adapter) -> float:
    tensors = [adapter.embeddings] if isinstance(adapter, SoftPrompt) else [adapter.keys, adapter.values]
    return max(float(t.abs().max()) for t in tensors)


def test_the_bounds_are_256_for_float16_and_2_to_the_16_for_bfloat16_and_float32() -> None:
    assert dict(MAX_ABS_VALUE) == {"float16": 256.0, "bfloat16": 65536.0, "float32": 65536.0}
    assert PrefixLimits().max_abs_value == 65536.0  # not told the dtype: float32, as tools without a server
    for name, dtype in DTYPES.items():
        assert PrefixLimits().for_dtype(dtype) == PrefixLimits(serving_dtype=name)
        assert PrefixLimits().for_dtype(name).max_abs_value == MAX_ABS_VALUE[name]
    assert torch.finfo(torch.float16).max > 256 * 250  # a score of realistic queries and keys at the bound
    limits = PrefixLimits(max_virtual_tokens=7).for_dtype(torch.float32)
    assert limits.max_virtual_tokens == 7  # the other limits are kept
    with pytest.raises(ValueError, match=r"serving_dtype is 'float64'; it must be one of float32, bfloat16"):
        PrefixLimits().for_dtype(torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("upload", FORMATS)
def test_a_value_over_the_bound_is_refused_stating_the_bound(
    uploads: dict[str, Upload], upload: str, dtype: str
) -> None:
    limits = PrefixLimits().for_dtype(DTYPES[dtype])
    for over in (MAX_ABS_VALUE[dtype] * (1 + 2**-10), -MAX_ABS_VALUE[dtype] * 2):
        with pytest.raises(
            PrefixValidationError, match=_bound_message(uploads[upload].tensor, dtype)
        ) as caught:
            uploads[upload].decode(over, limits)
        assert caught.value.status == 400


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("upload", FORMATS)
def test_a_value_at_the_bound_is_accepted_and_survives_the_cast(
    uploads: dict[str, Upload], upload: str, dtype: str
) -> None:
    limits = PrefixLimits().for_dtype(DTYPES[dtype])
    for at in (MAX_ABS_VALUE[dtype], -MAX_ABS_VALUE[dtype]):
        adapter = uploads[upload].decode(at, limits)
        assert _peak(adapter) == abs(at)
        placed = adapter.to("cpu", DTYPES[dtype])  # what the upload route and the registry do next
        assert _peak(placed) == abs(at)


@pytest.mark.parametrize("upload", FORMATS)
def test_the_issues_1e30_is_refused_on_every_dtype(uploads: dict[str, Upload], upload: str) -> None:
    """1e30 is finite in float32, so the finite-value check let it through: every row of the task then got
    all-zero logits (uniform logprobs). Refused now, stating the bound, on every dtype."""
    for dtype in DTYPES:
        limits = PrefixLimits().for_dtype(dtype)
        with pytest.raises(PrefixValidationError, match=r"magnitude 1e\+30, over the bound of"):
            uploads[upload].decode(1e30, limits)


def test_non_finite_values_are_still_named_as_such(uploads: dict[str, Upload]) -> None:
    """NaN and infinity keep their own message (the finite check comes first: an infinity is not a
    magnitude over the bound)."""
    for value, counts in ((float("nan"), "1 NaN, 0 infinite"), (float("-inf"), "0 NaN, 1 infinite")):
        with pytest.raises(PrefixValidationError, match=re.escape(f"non-finite values ({counts})")):
            uploads["native prefix, values"].decode(value, PrefixLimits().for_dtype(torch.float32))


def test_other_file_dtypes_are_held_to_the_same_bound() -> None:
    """The bound is on the values, whatever the file's dtype: a float64 file's 256.5, a bfloat16 file's 384."""
    shape = LLAMA.prefix_shape(1)
    limits = PrefixLimits(serving_dtype="float16")  # float16's bound, 256
    for dtype, value in ((torch.float64, 256.5), (torch.bfloat16, 384.0), (torch.float16, 65504.0)):
        keys = torch.zeros(shape, dtype=dtype)
        keys[0, 0, 0, 0] = value
        blob = encode_native(Prefix(keys, torch.zeros(shape, dtype=dtype)), LLAMA)
        with pytest.raises(PrefixValidationError, match=_bound_message("keys", "float16")):
            decode_native(blob, LLAMA, limits)


def test_the_registry_load_holds_a_stored_prefix_to_its_own_dtypes_bound(tmp_path: Path) -> None:
    """``fetch_prefix`` (every cold load) re-validates with the bound of the dtype it casts to, whatever
    the limits it was given: a stored value of 300 loads on a float32 server, not on a float16 one."""
    shape = GEOMETRY.prefix_shape(4)  # the conftest geometry and virtual tokens of ``put``
    keys = torch.zeros(shape)
    keys[1, 1, 3, 3] = 300.0
    store = FileStore(tmp_path / "store")
    record, _ = put(store, "tenant", "task", encode_native(Prefix(keys, torch.zeros(shape)), GEOMETRY))
    loaded = fetch_prefix(store, record, GEOMETRY, PrefixLimits(), torch.float32)
    assert loaded.keys.dtype == torch.float32 and float(loaded.keys.max()) == 300.0
    for limits in (PrefixLimits(), PrefixLimits(serving_dtype="float32")):
        with pytest.raises(PrefixValidationError, match=_bound_message("keys", "float16")):
            fetch_prefix(store, record, GEOMETRY, limits, torch.float16)
    store.close()
