"""The native prefix file: round trips, and every way an untrusted file is refused before use."""

from __future__ import annotations

import io
import json
import pickle
import struct

import pytest
import safetensors
import safetensors.torch
import torch

from prefix_store.errors import PrefixValidationError
from prefix_store.formats import safetensors_check
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.native import NATIVE_FORMAT, decode_native, encode_native
from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix

GEOMETRY = ModelGeometry(model_type="llama", num_layers=2, num_kv_heads=2, head_dim=4)
LIMITS = PrefixLimits()


def random_prefix(num_virtual_tokens: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0) -> Prefix:
    generator = torch.Generator().manual_seed(seed)
    shape = GEOMETRY.prefix_shape(num_virtual_tokens)
    return Prefix(
        keys=torch.randn(shape, generator=generator).to(dtype),
        values=torch.randn(shape, generator=generator).to(dtype),
    )


def metadata_for(num_virtual_tokens: int, /, **changes: str | None) -> dict[str, str]:
    """Correct native metadata with some entries replaced (or removed, for None)."""
    metadata = {
        "format": NATIVE_FORMAT,
        "num_virtual_tokens": str(num_virtual_tokens),
        "base_model": GEOMETRY.fingerprint,
    }
    metadata.update(changes)
    return {k: v for k, v in metadata.items() if v is not None}


def native_file(keys: torch.Tensor, values: torch.Tensor, **metadata_changes: str | None) -> bytes:
    """A native-looking file built with safetensors itself, with the metadata of ``keys``' dim 2."""
    metadata = metadata_for(keys.shape[2] if keys.dim() > 2 else 0, **metadata_changes)
    return safetensors.torch.save({"keys": keys, "values": values}, metadata=metadata)


def hand_built(header: object, body: bytes = b"") -> bytes:
    """A safetensors-shaped payload with an arbitrary header, for what safetensors itself would not write."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def refused(data: bytes, match: str, *, status: int = 400, limits: PrefixLimits = LIMITS) -> None:
    with pytest.raises(PrefixValidationError, match=match) as caught:
        decode_native(data, GEOMETRY, limits)
    assert caught.value.status == status


# --- round trips -------------------------------------------------------------------------------


def test_round_trip_keeps_tensors_and_metadata() -> None:
    prefix = random_prefix(num_virtual_tokens=5)
    data = encode_native(prefix, GEOMETRY)

    decoded = decode_native(data, GEOMETRY, LIMITS)

    assert torch.equal(decoded.keys, prefix.keys) and torch.equal(decoded.values, prefix.values)
    assert decoded.num_virtual_tokens == 5 and decoded.fits(GEOMETRY)
    header = json.loads(data[8 : 8 + header_length(data)])
    assert header["__metadata__"] == metadata_for(5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_floating_dtypes_are_accepted_and_cast_on_placement(dtype: torch.dtype) -> None:
    prefix = random_prefix(dtype=dtype)

    decoded = decode_native(encode_native(prefix, GEOMETRY), GEOMETRY, LIMITS)

    assert decoded.keys.dtype == dtype and torch.equal(decoded.keys, prefix.keys)
    placed = decoded.to("cpu", torch.float32)
    assert placed.keys.dtype == torch.float32 and torch.equal(placed.values, prefix.values.float())


def test_keys_and_values_of_different_dtypes_are_promoted_to_a_common_one() -> None:
    prefix = random_prefix()
    data = native_file(prefix.keys.to(torch.bfloat16), prefix.values.to(torch.float16))

    decoded = decode_native(data, GEOMETRY, LIMITS)

    assert decoded.keys.dtype == decoded.values.dtype == torch.float32
    assert torch.equal(decoded.values, prefix.values.to(torch.float16).float())


def test_encode_accepts_views_that_share_storage_or_are_not_contiguous() -> None:
    both = torch.randn(2, *GEOMETRY.prefix_shape(3))  # [key|value, layers, kv_heads, P, head_dim]
    transposed = torch.randn(2, 2, 4, 3).transpose(2, 3)  # [layers, kv_heads, P, head_dim], not contiguous

    for prefix in (Prefix(keys=both[0], values=both[1]), Prefix(keys=transposed, values=both[1])):
        decoded = decode_native(encode_native(prefix, GEOMETRY), GEOMETRY, LIMITS)

        assert torch.equal(decoded.keys, prefix.keys) and torch.equal(decoded.values, prefix.values)


def test_encode_refuses_a_prefix_of_another_geometry() -> None:
    other = ModelGeometry(model_type="llama", num_layers=3, num_kv_heads=2, head_dim=4)
    with pytest.raises(
        PrefixValidationError, match=r"keys \[2, 2, 3, 4\].*does not fit the base model llama/layers=3"
    ):
        encode_native(random_prefix(), other)


def test_a_file_whose_first_byte_is_0x80_is_not_mistaken_for_a_pickle() -> None:
    # A header of 128 + 256k bytes makes the little-endian length start with 0x80, like pickle's PROTO.
    for length in range(1, 200):
        geometry = ModelGeometry(model_type="m" * length, num_layers=2, num_kv_heads=2, head_dim=4)
        data = encode_native(random_prefix(), geometry)
        if data[0] == 0x80:
            break
    else:
        pytest.fail("no model_type length gave a header length of 128 mod 256")

    decoded = decode_native(data, geometry, LIMITS)

    assert torch.equal(decoded.keys, random_prefix().keys)


# --- not safetensors at all -----------------------------------------------------------------------


def test_torch_save_zip_checkpoint_is_refused_without_being_opened() -> None:
    buffer = io.BytesIO()
    torch.save({"keys": torch.zeros(2, 2, 3, 4), "values": torch.zeros(2, 2, 3, 4)}, buffer)

    refused(buffer.getvalue(), r"prefix file is a zip archive \(the format of torch\.save.*only safetensors")


def test_legacy_torch_save_pickle_is_refused() -> None:
    buffer = io.BytesIO()
    torch.save({"keys": torch.zeros(2)}, buffer, _use_new_zipfile_serialization=False)

    refused(
        buffer.getvalue(), r"prefix file is a pickle, not safetensors: only safetensors files are accepted"
    )


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_raw_pickle_is_refused(protocol: int) -> None:
    payload = pickle.dumps({"keys": [1.0, 2.0], "values": [3.0]}, protocol=protocol)

    refused(payload, r"is a pickle, not safetensors.*never opened")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", r"is 0 bytes, too short to be a safetensors file"),
        (b"abc", r"is 3 bytes, too short"),
        (bytes(range(7, 107)), r"the header length field says \d+ bytes but only 92 bytes follow it"),
        (b"this is a text file, not a tensor file at all", r"header length field says \d+ bytes"),
    ],
    ids=["empty", "short", "binary-garbage", "text-garbage"],
)
def test_garbage_bytes_are_refused(data: bytes, match: str) -> None:
    refused(data, match)


def test_header_length_pointing_past_the_end_is_refused() -> None:
    refused(
        struct.pack("<Q", 1000) + b'{"keys": {}}', r"header length field says 1000 bytes but only 12 bytes"
    )


def test_zero_header_length_is_refused() -> None:
    refused(struct.pack("<Q", 0) + b"{}", r"the header length field is 0; not safetensors")


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b"{not json}", r"the safetensors header is not valid JSON \(Expecting property name"),
        (b'{"a": \xff\xfe}', r"not valid JSON \('utf-8' codec can't decode"),
        (b"[1, 2]", r"header must be a JSON object, got list"),
        (b'{"keys": 1, "keys": 2}', r"not valid JSON \(duplicate key 'keys'\)"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", r"not valid JSON \(maximum recursion depth"),
    ],
    ids=["syntax", "not-utf8", "array", "duplicate-keys", "deep-nesting"],
)
def test_header_that_is_not_a_json_object_is_refused(header: bytes, match: str) -> None:
    limits = PrefixLimits(max_header_bytes=300_000)
    refused(struct.pack("<Q", len(header)) + header, match, limits=limits)


def test_truncated_data_section_is_refused() -> None:
    data = encode_native(random_prefix(), GEOMETRY)

    refused(
        data[:-10], r"prefix file is truncated: its tensors need 384 bytes of data but only 374 are present"
    )


def test_truncated_header_is_refused() -> None:
    data = encode_native(random_prefix(), GEOMETRY)

    refused(
        data[:40], r"header length field says \d+ bytes but only 32 bytes follow it; the file is truncated"
    )


def test_trailing_bytes_after_the_tensors_are_refused() -> None:
    refused(encode_native(random_prefix(), GEOMETRY) + b"xx", r"2 unexpected bytes after the last tensor")


# --- size caps (413) ----------------------------------------------------------------------------


def test_oversize_header_is_refused_with_413() -> None:
    prefix = random_prefix()
    data = native_file(prefix.keys, prefix.values, padding="x" * (1024 * 1024 + 10))

    refused(data, r"the safetensors header is \d+ bytes, over the limit of 1048576 bytes", status=413)


def test_oversize_file_is_refused_with_413_before_parsing() -> None:
    data = encode_native(random_prefix(), GEOMETRY)
    limits = PrefixLimits(max_file_bytes=len(data) - 1)

    refused(
        data,
        rf"prefix file is {len(data)} bytes, over the limit of {len(data) - 1} bytes",
        status=413,
        limits=limits,
    )
    refused(b"\x80\x04" + bytes(len(data)), r"over the limit", status=413, limits=limits)


# --- header structure ---------------------------------------------------------------------------


def test_data_offsets_inconsistent_with_shape_are_refused() -> None:
    header = {
        "keys": {"dtype": "F32", "shape": [2, 2, 1, 4], "data_offsets": [0, 64]},
        "values": {"dtype": "F32", "shape": [2, 2, 1, 4], "data_offsets": [64, 120]},
    }
    refused(
        hand_built(header, bytes(120)),
        r"tensor 'values' is declared F32 \[2, 2, 1, 4\] \(64 bytes\) but its data_offsets span 56 bytes",
    )


def test_overlapping_tensors_are_refused() -> None:
    header = {
        "keys": {"dtype": "F32", "shape": [2, 2, 1, 4], "data_offsets": [0, 64]},
        "values": {"dtype": "F32", "shape": [2, 2, 1, 4], "data_offsets": [32, 96]},
    }
    refused(hand_built(header, bytes(96)), r"the data of tensors 'keys' and 'values' overlap")


def test_gap_between_tensors_is_refused() -> None:
    header = {
        "keys": {"dtype": "F32", "shape": [2, 2, 1, 4], "data_offsets": [8, 72]},
        "values": {"dtype": "F32", "shape": [2, 2, 1, 4], "data_offsets": [72, 136]},
    }
    refused(hand_built(header, bytes(136)), r"8 unused bytes before tensor 'keys'")


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("F32", r"the header entry of tensor 'keys' is not a JSON object"),
        ({"shape": [1], "data_offsets": [0, 4]}, r"tensor 'keys' has no string 'dtype'"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, r"tensor 'keys' has no valid 'shape'"),
        ({"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}, r"no valid 'shape'"),
        (
            {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
            r"tensor 'keys' has no valid 'data_offsets'",
        ),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, r"no valid 'data_offsets'"),
    ],
)
def test_malformed_tensor_entries_are_refused(entry: object, match: str) -> None:
    header = {"keys": entry, "values": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    refused(hand_built(header, bytes(8)), match)


def test_metadata_that_is_not_an_object_of_strings_is_refused() -> None:
    header = {
        "__metadata__": {"format": NATIVE_FORMAT, "num_virtual_tokens": 1},
        "keys": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "values": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
    }
    refused(hand_built(header, bytes(8)), r"'__metadata__' must be a JSON object of strings")


# --- names and dtypes ---------------------------------------------------------------------------


def test_missing_tensor_is_named() -> None:
    data = safetensors.torch.save({"keys": random_prefix().keys}, metadata=metadata_for(3))

    refused(data, r"expected exactly the tensors 'keys', 'values'; missing 'values'$")


def test_extra_tensor_is_named() -> None:
    prefix = random_prefix()
    tensors = {"keys": prefix.keys, "values": prefix.values, "step": torch.zeros(1)}
    data = safetensors.torch.save(tensors, metadata=metadata_for(3))

    refused(data, r"expected exactly the tensors 'keys', 'values'; unexpected 'step'$")


def test_renamed_tensors_are_reported_as_missing_and_unexpected() -> None:
    prefix = random_prefix()
    data = safetensors.torch.save({"key": prefix.keys, "value": prefix.values}, metadata=metadata_for(3))

    refused(data, r"missing 'keys', 'values'; unexpected 'key', 'value'$")


def test_a_peft_adapter_file_uploaded_as_native_is_explained() -> None:
    data = safetensors.torch.save({"prompt_embeddings": torch.zeros(3, 64)}, metadata={"format": "pt"})

    refused(data, r"this is a PEFT adapter_model\.safetensors, not a native prefix.*adapter_config\.json")


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        (torch.int32, "I32"),
        (torch.int64, "I64"),
        (torch.uint8, "U8"),
        (torch.bool, "BOOL"),
        (torch.int8, "I8"),
    ],
)
def test_non_floating_dtype_is_refused_and_named(dtype: torch.dtype, name: str) -> None:
    prefix = random_prefix()
    data = native_file(prefix.keys.to(dtype), prefix.values)

    refused(
        data, rf"tensor 'keys' has dtype '{name}'; only floating dtypes \(F16, BF16, F32, F64\) are accepted"
    )


# --- shapes against the base model --------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 2, 3), r"tensor 'keys' has shape \[2, 2, 3\]; expected 4 dimensions \[num_layers, num_kv_heads"),
        ((2, 2, 3, 4, 1), r"tensor 'keys' has shape \[2, 2, 3, 4, 1\]; expected 4 dimensions"),
        ((3, 2, 3, 4), r"tensor 'keys' has 3 layers \(dim 0 of \[3, 2, 3, 4\]\) but the base model has 2"),
        (
            (2, 4, 3, 4),
            r"tensor 'keys' has 4 key/value heads \(dim 1 of \[2, 4, 3, 4\]\) but the base model has 2",
        ),
        ((2, 2, 3, 8), r"tensor 'keys' has 8 head_dim \(dim 3 of \[2, 2, 3, 8\]\) but the base model has 4"),
    ],
    ids=["3-d", "5-d", "layers", "kv-heads", "head-dim"],
)
def test_keys_of_the_wrong_shape_are_refused(shape: tuple[int, ...], match: str) -> None:
    data = native_file(torch.zeros(shape), random_prefix().values, num_virtual_tokens="3")

    refused(data, match)


def test_values_of_the_wrong_shape_are_named() -> None:
    data = native_file(random_prefix().keys, torch.zeros(2, 1, 3, 4))

    refused(
        data, r"tensor 'values' has 1 key/value heads \(dim 1 of \[2, 1, 3, 4\]\) but the base model has 2"
    )


def test_keys_and_values_of_different_lengths_are_refused() -> None:
    data = native_file(random_prefix(3).keys, random_prefix(4).values)

    refused(data, r"tensors 'keys' \[2, 2, 3, 4\] and 'values' \[2, 2, 4, 4\] differ in shape")


# --- values -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensor", "bad", "counts"),
    [
        ("keys", float("nan"), "1 NaN, 0 infinite"),
        ("values", float("inf"), "0 NaN, 1 infinite"),
        ("values", float("-inf"), "0 NaN, 1 infinite"),
    ],
)
def test_non_finite_values_are_refused_naming_the_tensor(tensor: str, bad: float, counts: str) -> None:
    prefix = random_prefix()
    getattr(prefix, tensor)[1, 0, 2, 3] = bad

    refused(encode_native(prefix, GEOMETRY), rf"tensor '{tensor}' contains non-finite values \({counts}\)")


def test_nan_in_a_bfloat16_file_is_refused() -> None:
    prefix = random_prefix(dtype=torch.bfloat16)
    prefix.keys[0, 0, 0, 0] = float("nan")

    refused(encode_native(prefix, GEOMETRY), r"tensor 'keys' contains non-finite values \(1 NaN")


def test_errors_from_safetensors_itself_are_translated(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_load(data: bytes) -> dict[str, torch.Tensor]:
        raise safetensors.SafetensorError("Error while deserializing header: InvalidOffset")

    monkeypatch.setattr(safetensors_check, "load_safetensors_bytes", broken_load)

    refused(
        encode_native(random_prefix(), GEOMETRY),
        r"prefix file could not be read as safetensors: Error while deserializing header: InvalidOffset",
    )


# --- metadata -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format": "pt"}, r"prefix file has metadata format 'pt'; expected format 'prefix-serve/1'"),
        ({"format": None}, r"prefix file has no 'format' metadata; expected format 'prefix-serve/1'"),
        (
            {"base_model": None},
            r"prefix file has no 'base_model' metadata; expected 'llama/layers=2/kv_heads=2/head_dim=4'",
        ),
        (
            {"base_model": "mistral/layers=32/kv_heads=8/head_dim=128"},
            r"prefix file was made for base model 'mistral/layers=32/kv_heads=8/head_dim=128' "
            r"but the base model is 'llama/layers=2/kv_heads=2/head_dim=4'",
        ),
        (
            {"num_virtual_tokens": "5"},
            r"metadata num_virtual_tokens is 5 but the tensors hold 3 virtual tokens \(dim 2\)",
        ),
        ({"num_virtual_tokens": "three"}, r"metadata num_virtual_tokens 'three' is not an integer"),
        ({"num_virtual_tokens": "-3"}, r"metadata num_virtual_tokens '-3' is not an integer"),
        ({"num_virtual_tokens": None}, r"prefix file has no 'num_virtual_tokens' metadata"),
    ],
    ids=[
        "format-wrong",
        "format-missing",
        "base-missing",
        "base-wrong",
        "nvt-disagrees",
        "nvt-text",
        "nvt-negative",
        "nvt-missing",
    ],
)
def test_wrong_metadata_is_refused(changes: dict[str, str | None], match: str) -> None:
    prefix = random_prefix(3)

    refused(native_file(prefix.keys, prefix.values, **changes), match)


def test_a_file_without_any_metadata_is_refused() -> None:
    prefix = random_prefix()
    data = safetensors.torch.save({"keys": prefix.keys, "values": prefix.values})

    refused(data, r"prefix file has no 'format' metadata")


def test_long_untrusted_strings_are_cut_in_messages() -> None:
    prefix = random_prefix()
    data = native_file(prefix.keys, prefix.values, base_model="x" * 5000)

    with pytest.raises(PrefixValidationError, match=r"made for base model 'x{80}…' but") as caught:
        decode_native(data, GEOMETRY, LIMITS)
    assert len(caught.value.message) < 300


# --- number of virtual tokens -------------------------------------------------------------------


def test_zero_virtual_tokens_are_refused() -> None:
    empty = torch.zeros(GEOMETRY.prefix_shape(0))

    refused(native_file(empty, empty), r"prefix file: num_virtual_tokens is 0; it must be at least 1")


def test_more_virtual_tokens_than_the_limit_are_refused_with_413() -> None:
    prefix = random_prefix(num_virtual_tokens=5)

    refused(
        encode_native(prefix, GEOMETRY),
        r"prefix file: num_virtual_tokens is 5, over the limit of 4",
        status=413,
        limits=PrefixLimits(max_virtual_tokens=4),
    )


def test_the_default_limit_is_512_virtual_tokens() -> None:
    assert (
        decode_native(encode_native(random_prefix(512), GEOMETRY), GEOMETRY, LIMITS).num_virtual_tokens == 512
    )
    refused(
        encode_native(random_prefix(513), GEOMETRY),
        r"num_virtual_tokens is 513, over the limit of 512",
        status=413,
    )


def test_limits_refuse_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match=r"max_virtual_tokens \(2\) is below min_virtual_tokens \(3\)"):
        PrefixLimits(min_virtual_tokens=3, max_virtual_tokens=2)
    with pytest.raises(ValueError, match=r"max_header_bytes must be at least 1"):
        PrefixLimits(max_header_bytes=0)


def test_values_that_overflow_the_server_dtype_are_refused_at_placement() -> None:
    prefix = random_prefix()
    big = Prefix(prefix.keys * 1e6, prefix.values)
    assert torch.isfinite(big.to("cpu", torch.float32).keys).all()
    with pytest.raises(PrefixValidationError, match=r"too large for the server's dtype torch\.float16"):
        big.to("cpu", torch.float16)


def test_the_same_prefix_always_encodes_to_the_same_bytes() -> None:
    prefix = random_prefix()
    assert len({encode_native(prefix, GEOMETRY) for _ in range(10)}) == 1
