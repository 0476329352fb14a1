"""Hostile uploads: a catalogue of named malformed prefixes and multipart bodies, and hypothesis
strategies that build malformed safetensors, each refused with a 4xx.

Every payload here is invalid by construction (the strategies filter out the rare mutation that
would still be a valid prefix), so the property is simply: a 4xx with the error body of docs/API.md,
nothing stored, the task's previous version still serving.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from hypothesis import strategies as st

from hardening.prefixes import lora_files, peft_files, random_lora, random_prefix
from prefix_store.formats.lora_format import PEFT_PREFIX
from prefix_store.formats.native import encode_native
from prefix_store.formats.peft import ADAPTER_CONFIG_NAME, ADAPTER_MODEL_NAME
from prefix_store.geometry import ModelGeometry

NVT = 4  # virtual tokens of the valid prefix every malformation starts from
_F32 = 4


@dataclass(frozen=True)
class HostileUpload:
    """One upload to ``PUT /v1/admin/prefixes/{task}``: multipart ``files``, or a raw body (``content``
    with ``headers``). ``statuses``: the answers that are right for it."""

    name: str
    files: dict[str, Any] | None = None
    content: bytes | Callable[[], Iterator[bytes]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    statuses: frozenset[int] = frozenset({400})


# -- raw safetensors --------------------------------------------------------------------------------


def safetensors_bytes(
    header: dict[str, Any] | str, data: bytes, *, header_length: int | None = None
) -> bytes:
    """A safetensors payload from a header (a dict, or raw JSON text) and a data section; the length
    field says ``header_length`` when given (a lie), else the truth."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    length = len(raw) if header_length is None else header_length
    return struct.pack("<Q", length) + raw + data


def valid_parts(geometry: ModelGeometry, *, nvt: int = NVT, seed: int = 0) -> tuple[dict[str, Any], bytes]:
    """The header (as a dict) and data section of a valid native prefix file."""
    return _parts(encode_native(random_prefix(geometry, nvt, seed), geometry))


def _parts(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors payload's header (a dict) and data section."""
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def native_with(geometry: ModelGeometry, keys: torch.Tensor, values: torch.Tensor, **metadata: str) -> bytes:
    """A native file holding ``keys``/``values`` as they are (any dtype, shape or values)."""
    import safetensors.torch

    meta = {"format": "prefix-serve/1", "num_virtual_tokens": str(NVT), "base_model": geometry.fingerprint}
    return safetensors.torch.save(
        {"keys": keys.contiguous(), "values": values.contiguous()}, metadata=meta | metadata
    )


# -- pickles that would run code if anyone unpickled them --------------------------------------------


class _Canary:
    """Unpickling this runs ``os.system("touch <path>")``: the canary file appears if anyone loads it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.system, (f"touch {self.path}",)


def canary_pickles(canary: Path) -> dict[str, bytes]:
    """Pickle-based payloads (raw pickles and a ``torch.save`` zip) whose loading creates ``canary``."""
    saved = io.BytesIO()
    torch.save({"prompt_embeddings": _Canary(canary)}, saved)
    return {
        "pickle (protocol 2)": pickle.dumps(_Canary(canary), protocol=2),
        "pickle (protocol 5)": pickle.dumps(_Canary(canary), protocol=5),
        "torch.save zip": saved.getvalue(),
        "pickle behind a safetensors length": struct.pack("<Q", 20) + pickle.dumps(_Canary(canary)),
    }


# -- the catalogue ------------------------------------------------------------------------------------


def _file(name: str, blob: bytes, statuses: frozenset[int] = frozenset({400})) -> HostileUpload:
    return HostileUpload(name, files={"file": ("prefix.safetensors", blob)}, statuses=statuses)


def _peft(
    name: str, config: bytes, model: bytes, statuses: frozenset[int] = frozenset({400})
) -> HostileUpload:
    files = {"adapter_config": (ADAPTER_CONFIG_NAME, config), "adapter_model": (ADAPTER_MODEL_NAME, model)}
    return HostileUpload(name, files=files, statuses=statuses)


_TOO_BIG = frozenset({413})


def native_catalogue(geometry: ModelGeometry, *, max_virtual_tokens: int) -> list[HostileUpload]:
    """Malformed native prefix files, one per way of being wrong."""
    header, data = valid_parts(geometry)
    blob = safetensors_bytes(header, data)
    raw_len = len(json.dumps(header))
    keys = header["keys"]
    span = keys["data_offsets"][1]

    def edited(*changes: tuple[str, str | None, Any]) -> dict[str, Any]:
        """The valid header with ``(entry, field, value)`` changes; field None replaces the entry."""
        copy = json.loads(json.dumps(header))
        for entry, name, value in changes:
            if name is None:
                copy[entry] = value
            else:
                copy[entry][name] = value
        return copy

    shape = geometry.prefix_shape(NVT)
    over = max_virtual_tokens + 1
    big_shape = geometry.prefix_shape(over)
    nan = torch.zeros(shape)
    nan[0, 0, 0, 0] = float("nan")
    inf = torch.zeros(shape)
    inf[-1, -1, -1, -1] = float("inf")
    ninf = torch.zeros(shape, dtype=torch.float16)
    ninf[0, 1, 2, 3] = float("-inf")
    duplicate = json.dumps(header)[:-1] + ', "keys": ' + json.dumps(keys) + "}"
    cases = [
        _file("empty file", b""),
        _file("7 bytes: no header length", b"\x01" * 7),
        _file("truncated in the data", blob[: len(blob) // 2]),
        _file("truncated after the header", blob[: 8 + raw_len]),
        _file("header length past the end", safetensors_bytes(header, data, header_length=len(blob))),
        _file("header length 2**64-1", safetensors_bytes(header, data, header_length=2**64 - 1)),
        _file("header length cuts the JSON", safetensors_bytes(header, data, header_length=raw_len - 5)),
        _file("header length 0", safetensors_bytes(header, data, header_length=0)),
        _file(
            "oversize header (1 MiB)",
            safetensors_bytes(
                edited(("__metadata__", None, header["__metadata__"] | {"pad": "x" * (1 << 20)})), data
            ),
            _TOO_BIG,
        ),
        _file("header not JSON", safetensors_bytes("{not json" + " " * 20, data)),
        _file("header not UTF-8", struct.pack("<Q", 8) + b'{"\xff\xfe":1}' + data),
        _file("header a JSON list", safetensors_bytes("[1, 2, 3]", data)),
        _file("header nested 30000 deep", safetensors_bytes("[" * 30_000 + "]" * 30_000, data)),
        _file(
            "overlapping offsets",
            safetensors_bytes(edited(("values", "data_offsets", [span // 2, span // 2 + span])), data),
        ),
        _file(
            "gap between tensors",
            safetensors_bytes(edited(("values", "data_offsets", [span + 4, 2 * span + 4])), data + b"\0" * 4),
        ),
        _file("trailing bytes", blob + b"\0" * 16),
        _file("negative offsets", safetensors_bytes(edited(("keys", "data_offsets", [-span, 0])), data)),
        _file("offsets reversed", safetensors_bytes(edited(("keys", "data_offsets", [span, 0])), data)),
        _file("duplicate tensor names", safetensors_bytes(duplicate, data)),
        _file(
            "zero-size tensors (0 virtual tokens)",
            native_with(
                geometry,
                torch.zeros(geometry.prefix_shape(0)),
                torch.zeros(geometry.prefix_shape(0)),
                num_virtual_tokens="0",
            ),
        ),
        _file("rank-0 tensors", native_with(geometry, torch.tensor(1.0), torch.tensor(1.0))),
        _file("rank-5 tensors", native_with(geometry, torch.zeros(1, *shape), torch.zeros(1, *shape))),
        _file("NaN value", native_with(geometry, nan, torch.zeros(shape))),
        _file("+inf value", native_with(geometry, torch.zeros(shape), inf)),
        _file("-inf value (float16)", native_with(geometry, ninf, torch.zeros(shape, dtype=torch.float16))),
        _file(
            "int64 tensors",
            native_with(
                geometry, torch.zeros(shape, dtype=torch.int64), torch.zeros(shape, dtype=torch.int64)
            ),
        ),
        _file(
            "bool tensors",
            native_with(geometry, torch.zeros(shape, dtype=torch.bool), torch.zeros(shape, dtype=torch.bool)),
        ),
        _file(
            "huge num_virtual_tokens declared (10**12)",
            safetensors_bytes(
                edited(
                    ("keys", "shape", [shape[0], shape[1], 10**12, shape[3]]),
                    ("keys", "data_offsets", [0, shape[0] * shape[1] * 10**12 * shape[3] * _F32]),
                ),
                data,
            ),
        ),
        _file(
            f"num_virtual_tokens {over} over the limit",
            native_with(
                geometry, torch.zeros(big_shape), torch.zeros(big_shape), num_virtual_tokens=str(over)
            ),
            _TOO_BIG,
        ),
        _file(
            "metadata num_virtual_tokens lies",
            native_with(geometry, torch.zeros(shape), torch.zeros(shape), num_virtual_tokens="5"),
        ),
        _file(
            "metadata num_virtual_tokens 10**30",
            native_with(geometry, torch.zeros(shape), torch.zeros(shape), num_virtual_tokens=str(10**30)),
        ),
        _file(
            "another base model",
            native_with(
                geometry,
                torch.zeros(shape),
                torch.zeros(shape),
                base_model="gpt2/layers=12/kv_heads=12/head_dim=64",
            ),
        ),
        _file(
            "wrong layer count",
            native_with(
                geometry, torch.zeros(shape[0] + 1, *shape[1:]), torch.zeros(shape[0] + 1, *shape[1:])
            ),
        ),
        _file(
            "keys and values differ in shape",
            native_with(geometry, torch.zeros(shape), torch.zeros(geometry.prefix_shape(NVT + 1))),
        ),
        _file(
            "no format metadata",
            safetensors_bytes(
                edited(
                    ("__metadata__", None, {k: v for k, v in header["__metadata__"].items() if k != "format"})
                ),
                data,
            ),
        ),
        _file(
            "metadata values not strings",
            safetensors_bytes(
                edited(("__metadata__", None, header["__metadata__"] | {"num_virtual_tokens": NVT})), data
            ),
        ),
        _file("a PEFT adapter_model sent as a native file", peft_files(geometry)[ADAPTER_MODEL_NAME]),
    ]
    unknown = [("I32", _F32), ("I8", 1), ("BOOL", 1), ("F8_E4M3", 1), ("Q4_K", _F32), ("", _F32)]
    for dtype, size in unknown:
        per = span // _F32 * size
        cases.append(
            _file(
                f"unknown dtype {dtype!r}",
                safetensors_bytes(
                    edited(
                        ("keys", "dtype", dtype),
                        ("values", "dtype", dtype),
                        ("keys", "data_offsets", [0, per]),
                        ("values", "data_offsets", [per, 2 * per]),
                    ),
                    b"\0" * (2 * per),
                ),
            )
        )
    return cases


def peft_catalogue(geometry: ModelGeometry, *, max_virtual_tokens: int) -> list[HostileUpload]:
    """PEFT adapters whose config or model is wrong."""
    files = peft_files(geometry, NVT)
    config, model = json.loads(files[ADAPTER_CONFIG_NAME]), files[ADAPTER_MODEL_NAME]

    def with_config(**changes: Any) -> bytes:
        return json.dumps(config | changes).encode()

    native = encode_native(random_prefix(geometry, NVT, 1), geometry)
    nan_model = peft_files(geometry, NVT)[ADAPTER_MODEL_NAME]
    header_length = struct.unpack("<Q", nan_model[:8])[0]
    nan_model = (
        nan_model[: 8 + header_length] + struct.pack("<f", float("nan")) + nan_model[8 + header_length + 4 :]
    )
    return [
        _peft("config not JSON", b"{peft_type: PREFIX_TUNING", model),
        _peft("config not UTF-8", b'{"peft_type": "\xff"}', model),
        _peft("config a JSON list", b"[]", model),
        _peft("config nested 30000 deep", b"[" * 30_000 + b"]" * 30_000, model),
        _peft("config oversize (65 KiB)", with_config(pad="x" * 66_000), model, _TOO_BIG),
        _peft("a LoRA config", with_config(peft_type="LORA"), model),
        _peft(
            "no peft_type", json.dumps({k: v for k, v in config.items() if k != "peft_type"}).encode(), model
        ),
        _peft("task_type SEQ_CLS", with_config(task_type="SEQ_CLS"), model),
        _peft("num_layers wrong", with_config(num_layers=geometry.num_layers + 1), model),
        _peft(
            "num_attention_heads = query heads",
            with_config(num_attention_heads=geometry.num_kv_heads * 4),
            model,
        ),
        _peft("token_dim wrong", with_config(token_dim=geometry.head_dim), model),
        _peft("num_virtual_tokens differs from the tensor", with_config(num_virtual_tokens=NVT + 1), model),
        _peft("num_virtual_tokens 10**9", with_config(num_virtual_tokens=10**9), model, _TOO_BIG),
        _peft(
            f"num_virtual_tokens {max_virtual_tokens + 1}",
            with_config(num_virtual_tokens=max_virtual_tokens + 1),
            model,
            _TOO_BIG,
        ),
        _peft("num_virtual_tokens -1", with_config(num_virtual_tokens=-1), model),
        _peft("num_virtual_tokens true", with_config(num_virtual_tokens=True), model),
        _peft("num_virtual_tokens '4'", with_config(num_virtual_tokens="4"), model),
        _peft("modules_to_save set", with_config(modules_to_save=["lm_head"]), model),
        _peft("two transformer submodules", with_config(num_transformer_submodules=2), model),
        _peft("adapter_model is a native prefix", files[ADAPTER_CONFIG_NAME], native),
        _peft("adapter_model NaN", files[ADAPTER_CONFIG_NAME], nan_model),
        _peft("adapter_model truncated", files[ADAPTER_CONFIG_NAME], model[:-10]),
    ]


def lora_catalogue(geometry: ModelGeometry) -> list[HostileUpload]:
    """LoRA tasks that are not plain low-rank updates of this model's projections, PEFT and native."""
    files = lora_files(geometry)
    config, model = json.loads(files[ADAPTER_CONFIG_NAME]), files[ADAPTER_MODEL_NAME]
    tensors = {  # the adapter model's tensors, from the adapter lora_files wrote (nothing read back)
        f"{PEFT_PREFIX}{name}.lora_{part}.weight": weight
        for name, module in random_lora(geometry).modules.items()
        for part, weight in (("A", module.a), ("B", module.b))
    }
    first = sorted(tensors)[0]  # base_model.model.<module>.lora_A.weight

    def with_config(**changes: Any) -> bytes:
        return json.dumps(config | changes).encode()

    def with_tensors(**changes: torch.Tensor | None) -> bytes:
        edited = {**tensors, **changes}
        return safetensors.torch.save({k: v for k, v in edited.items() if v is not None})

    module = first.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    native = encode_native(random_lora(geometry), geometry)
    native_header, native_data = _parts(native)
    wrong_rank = dict(native_header)
    wrong_rank["__metadata__"] = {**native_header["__metadata__"], "r": "5"}
    return [
        _peft("LoRA: DoRA", with_config(use_dora=True), model),
        _peft(
            "LoRA: DoRA magnitude tensor",
            files[ADAPTER_CONFIG_NAME],
            with_tensors(**{first.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(8)}),
        ),
        _peft("LoRA: modules_to_save", with_config(modules_to_save=["lm_head"]), model),
        _peft("LoRA: bias all", with_config(bias="all"), model),
        _peft("LoRA: lora_bias", with_config(lora_bias=True), model),
        _peft("LoRA: lm_head target", with_config(target_modules=["lm_head"]), model),
        _peft(
            "LoRA: embedding tensor",
            files[ADAPTER_CONFIG_NAME],
            with_tensors(**{"base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(4, 8)}),
        ),
        _peft(
            "LoRA: unknown module",
            files[ADAPTER_CONFIG_NAME],
            with_tensors(
                **{
                    "base_model.model.model.norm.lora_A.weight": torch.ones(4, 8),
                    "base_model.model.model.norm.lora_B.weight": torch.ones(8, 4),
                }
            ),
        ),
        _peft(
            "LoRA: lora_B missing",
            files[ADAPTER_CONFIG_NAME],
            with_tensors(**{first.replace("lora_A", "lora_B"): None}),
        ),
        _peft(
            "LoRA: A of the wrong width",
            files[ADAPTER_CONFIG_NAME],
            with_tensors(**{first: torch.ones(4, 3)}),
        ),
        _peft(
            "LoRA: NaN",
            files[ADAPTER_CONFIG_NAME],
            with_tensors(**{first: torch.full_like(tensors[first], float("nan"))}),
        ),
        _peft("LoRA: r 65 (over the limit)", with_config(r=65), model),
        _peft("LoRA: r 10**9", with_config(r=10**9), model),
        _peft("LoRA: r differs from the tensors", with_config(r=2), model),
        _peft("LoRA: rank_pattern not a regex", with_config(rank_pattern={"(": 4}), model),
        _peft("LoRA: alpha infinite text", with_config(lora_alpha="inf"), model),
        _peft("LoRA: init pissa", with_config(init_lora_weights="pissa"), model),
        _peft(
            "LoRA: prompt embeddings", files[ADAPTER_CONFIG_NAME], peft_files(geometry)[ADAPTER_MODEL_NAME]
        ),
        _file("LoRA native: r metadata lies", safetensors_bytes(wrong_rank, native_data)),
        _file(
            "LoRA native: a lora_B entry dropped",
            safetensors_bytes(
                {k: v for k, v in native_header.items() if not k.endswith(".lora_B") or module not in k},
                native_data,
            ),
        ),
    ]


def multipart_catalogue(geometry: ModelGeometry, *, cap_bytes: int) -> list[HostileUpload]:
    """Bodies wrong as HTTP: missing filenames and fields, wrong content types, bodies past the cap."""
    valid = encode_native(random_prefix(geometry, NVT, 2), geometry)
    files = peft_files(geometry, NVT)
    boundary = "hostile-boundary"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count as bytes arrive
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.safetensors"\r\n\r\n'.encode()
        sent = 0
        while sent <= 4 * cap_bytes:
            yield b"\0" * 65_536
            sent += 65_536

    multipart = {"content-type": f"multipart/form-data; boundary={boundary}"}
    return [
        HostileUpload("multipart file without a filename", files={"file": (None, valid)}),
        HostileUpload("no fields", content=b"", headers=multipart),
        HostileUpload("an unrelated field", files={"prefix": ("p.safetensors", valid)}),
        HostileUpload(
            "adapter_config without adapter_model",
            files={"adapter_config": (ADAPTER_CONFIG_NAME, files[ADAPTER_CONFIG_NAME])},
        ),
        HostileUpload(
            "file and a PEFT adapter together",
            files={
                "file": ("p.safetensors", valid),
                **{
                    name: (name, data)
                    for name, data in (
                        ("adapter_config", files[ADAPTER_CONFIG_NAME]),
                        ("adapter_model", files[ADAPTER_MODEL_NAME]),
                    )
                },
            },
        ),
        HostileUpload(
            "file and adapter_config together",
            files={
                "file": ("p.safetensors", valid),
                "adapter_config": (ADAPTER_CONFIG_NAME, files[ADAPTER_CONFIG_NAME]),
            },
        ),
        HostileUpload("JSON body", content=b'{"file": "x"}', headers={"content-type": "application/json"}),
        HostileUpload(
            "the raw file as the body", content=valid, headers={"content-type": "application/octet-stream"}
        ),
        HostileUpload(
            "multipart never closed",
            content=f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p"\r\n\r\n'.encode()
            + valid,
            headers=multipart,
        ),
        HostileUpload(
            "multipart without a boundary",
            content=b"--x\r\n\r\n",
            headers={"content-type": "multipart/form-data"},
        ),
        HostileUpload("five form fields", files={f"f{i}": (None, b"x") for i in range(5)}),
        HostileUpload("chunked body past the cap", content=chunks, headers=multipart, statuses=_TOO_BIG),
        HostileUpload(
            "declared Content-Length past the cap",
            content=b"\0" * (cap_bytes + 1),
            headers=multipart,
            statuses=_TOO_BIG,
        ),
    ]


def canary_catalogue(canary: Path) -> list[HostileUpload]:
    """Each pickle payload as a native file and as a PEFT adapter's model and config."""
    config = b'{"peft_type": "PREFIX_TUNING"}'
    cases = []
    for name, payload in canary_pickles(canary).items():
        cases.append(_file(f"{name} as the native file", payload))
        cases.append(_peft(f"{name} as adapter_model", config, payload))
        cases.append(_peft(f"{name} as adapter_config", payload, payload))
    return cases


# -- hypothesis strategies ---------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def corrupted_headers(draw: st.DrawFn, geometry: ModelGeometry) -> bytes:
    """A valid file with one thing in its header made wrong (dtype, shape, offsets, names, metadata,
    the whole header), sometimes with a header length that lies too."""
    header, data = valid_parts(geometry)
    tensor = draw(st.sampled_from(["keys", "values"]))
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "extra", "metadata", "entry", "whole"]))
    if kind == "dtype":
        header[tensor]["dtype"] = draw(st.text(max_size=8).filter(lambda d: d != "F32"))
    elif kind == "shape":
        expected = list(geometry.prefix_shape(NVT))
        header[tensor]["shape"] = draw(
            st.lists(st.integers(-(2**40), 2**40), max_size=6).filter(lambda s: s != expected)
        )
    elif kind == "offsets":
        offsets = header[tensor]["data_offsets"]
        header[tensor]["data_offsets"] = draw(
            st.lists(st.integers(-(2**64), 2**64), min_size=0, max_size=3).filter(lambda o: o != offsets)
        )
    elif kind == "drop":
        del header[tensor]
    elif kind == "extra":
        name = draw(st.text(min_size=1, max_size=12).filter(lambda n: n not in header))
        header[name] = draw(_JSON)
    elif kind == "metadata":
        key = draw(st.sampled_from(["format", "num_virtual_tokens", "base_model"]))
        good = header["__metadata__"][key]
        header["__metadata__"][key] = draw(
            _JSON.filter(lambda v: v != good and not (key == "num_virtual_tokens" and _is_decimal(v, NVT)))
        )
    elif kind == "entry":
        header[tensor] = draw(_JSON.filter(lambda v: v != header[tensor]))
    else:
        header = draw(_JSON.filter(lambda v: not isinstance(v, dict) or not {"keys", "values"} <= set(v)))
    raw = json.dumps(header)
    lie = draw(st.none() | st.integers(0, 2**64 - 1).filter(lambda n: n != len(raw.encode())))
    return safetensors_bytes(raw, data, header_length=lie)


def _is_decimal(value: object, number: int) -> bool:
    return isinstance(value, str) and value.isascii() and value.isdigit() and int(value) == number


@st.composite
def damaged_bytes(draw: st.DrawFn, geometry: ModelGeometry) -> bytes:
    """A valid file truncated, extended with trailing bytes, or given a different length field."""
    header, data = valid_parts(geometry)
    blob = safetensors_bytes(header, data)
    how = draw(st.sampled_from(["truncate", "append", "length"]))
    if how == "truncate":
        return blob[: draw(st.integers(0, len(blob) - 1))]
    if how == "append":
        return blob + draw(st.binary(min_size=1, max_size=256))
    true_length = len(json.dumps(header).encode())
    length = draw(st.integers(0, 2**64 - 1).filter(lambda n: n != true_length))
    return struct.pack("<Q", length) + blob[8:]


@st.composite
def non_finite(draw: st.DrawFn, geometry: ModelGeometry) -> bytes:
    """A valid file but for one or more NaN or infinite values, in any floating dtype."""
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]))
    shape = geometry.prefix_shape(NVT)
    tensors = [torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)]
    count = draw(st.integers(1, 8))
    for _ in range(count):
        which = draw(st.integers(0, 1))
        flat = draw(st.integers(0, tensors[which].numel() - 1))
        tensors[which].view(-1)[flat] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return native_with(geometry, *tensors)


@st.composite
def bad_peft_configs(draw: st.DrawFn, geometry: ModelGeometry) -> bytes:
    """A valid adapter_config.json with one field set to something the server must refuse."""
    config = json.loads(peft_files(geometry, NVT)[ADAPTER_CONFIG_NAME])
    name = draw(
        st.sampled_from(
            [
                "peft_type",
                "task_type",
                "num_layers",
                "num_attention_heads",
                "token_dim",
                "num_virtual_tokens",
                "num_transformer_submodules",
                "modules_to_save",
            ]
        )
    )
    good = config[name]

    def acceptable(value: object) -> bool:  # what the server rightly accepts for the field
        if name == "task_type":
            return value in (None, "CAUSAL_LM")
        if name == "num_transformer_submodules":
            return value is None or value == 1
        if name == "modules_to_save":
            return not value
        if name == "peft_type":
            return value == "PREFIX_TUNING"
        return type(value) is int and value == good

    config[name] = draw(_JSON.filter(lambda v: not acceptable(v)))
    return json.dumps(config).encode()


@st.composite
def bad_lora_configs(draw: st.DrawFn, geometry: ModelGeometry) -> bytes:
    """A valid LoRA adapter_config.json with one field set to something the server must refuse."""
    config = json.loads(lora_files(geometry)[ADAPTER_CONFIG_NAME])
    name = draw(
        st.sampled_from(
            [
                "r",
                "lora_alpha",
                "use_rslora",
                "use_dora",
                "bias",
                "modules_to_save",
                "rank_pattern",
                "task_type",
            ]
        )
    )

    def acceptable(value: object) -> bool:  # what the server rightly accepts for the field
        if name == "r":
            return value == config["r"] and type(value) is int
        if name == "lora_alpha":
            return type(value) in (int, float) and math.isfinite(value) and abs(value) <= 65536
        if name == "use_rslora":
            return isinstance(value, bool)
        if name in ("use_dora", "modules_to_save"):
            return not value
        if name == "bias":
            return value == "none"
        if name == "rank_pattern":
            return not value
        return value in (None, "CAUSAL_LM")

    config[name] = draw(_JSON.filter(lambda v: not acceptable(v)))
    return json.dumps(config).encode()
