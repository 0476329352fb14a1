"""Soft prompts (PEFT PROMPT_TUNING and P_TUNING): read as PEFT puts them before the prompt, written so
PEFT loads them, stored natively with ``kind`` = ``soft_prompt``, and validated as fully as prefixes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import PeftModel

from prefix_store.errors import PrefixValidationError
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.native import decode_native, encode_native
from prefix_store.formats.peft import decode_peft, encode_peft, write_peft_folder
from prefix_store.formats.source import SourceFormat, load_prefix_source
from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import SoftPrompt, kind_of
from testing.peft_reference import make_peft_soft_prompt
from tests.prefix_store.test_peft_format import LLAMA, PROMPT, read_adapter, tiny_gpt2, tiny_llama

LIMITS = PrefixLimits()
WIDTH = 64  # the tiny models' embedding width


@pytest.fixture(scope="module", params=["PROMPT_TUNING", "P_TUNING"])
def soft_adapter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(request.param.lower())
    return make_peft_soft_prompt(tiny_llama(), out, num_virtual_tokens=5, method=request.param, seed=4)


def test_decoded_soft_prompt_is_what_peft_prepends(soft_adapter: Path) -> None:
    peft_model = PeftModel.from_pretrained(tiny_llama(), soft_adapter).eval()
    with torch.no_grad():
        prepended = peft_model.get_prompt(batch_size=1)[0]  # [P, hidden]: what PEFT puts before the prompt
    soft = decode_peft(*read_adapter(soft_adapter), LLAMA, LIMITS)
    assert isinstance(soft, SoftPrompt) and kind_of(soft) == "soft_prompt"
    assert torch.equal(soft.embeddings, prepended)


def test_native_round_trip_keeps_the_embeddings_and_says_its_kind(soft_adapter: Path) -> None:
    soft = decode_peft(*read_adapter(soft_adapter), LLAMA, LIMITS)
    blob = encode_native(soft, LLAMA)
    header = _header(blob)
    assert header["__metadata__"]["kind"] == "soft_prompt" and set(header) == {"__metadata__", "embeddings"}
    again = decode_native(blob, LLAMA, LIMITS)
    assert isinstance(again, SoftPrompt) and torch.equal(again.embeddings, soft.embeddings)
    assert encode_native(again, LLAMA) == blob  # canonical: the same soft prompt, the same bytes


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_an_exported_soft_prompt_loads_in_peft_with_the_same_tokens(build, tmp_path: Path) -> None:
    source = make_peft_soft_prompt(build(), tmp_path / "source", num_virtual_tokens=4, seed=8)
    geometry = ModelGeometry.from_config(build().config)
    soft = decode_peft(*read_adapter(source), geometry, LIMITS)
    exported = write_peft_folder(
        decode_native(encode_native(soft, geometry), geometry, LIMITS), geometry, tmp_path / "out"
    )
    assert json.loads((exported / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"

    def tokens(folder: Path) -> list[int]:
        model = PeftModel.from_pretrained(build(), folder).eval()
        ids = torch.tensor([PROMPT])
        with torch.inference_mode():
            for _ in range(6):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids[0, len(PROMPT) :].tolist()

    assert tokens(exported) == tokens(source)


def test_a_folder_or_file_of_either_kind_is_read_by_load_prefix_source(
    soft_adapter: Path, tmp_path: Path
) -> None:
    from_folder, fmt = load_prefix_source(soft_adapter, LLAMA, LIMITS)
    assert isinstance(from_folder, SoftPrompt) and fmt is SourceFormat.PEFT
    native = tmp_path / "soft.safetensors"
    native.write_bytes(encode_native(from_folder, LLAMA))
    from_file, fmt = load_prefix_source(native, LLAMA, LIMITS)
    assert isinstance(from_file, SoftPrompt) and fmt is SourceFormat.NATIVE


def _header(blob: bytes) -> dict:
    return json.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])


def _native(tensors: dict[str, torch.Tensor], **metadata: str) -> bytes:
    base = {"format": "prefix-serve/1", "num_virtual_tokens": "3", "base_model": LLAMA.fingerprint}
    return safetensors.torch.save(tensors, metadata={**base, **metadata})


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (
            _native({"embeddings": torch.zeros(3, 32)}, kind="soft_prompt"),
            r"shape \[3, 32\]; expected \[num_virtual_tokens, 64\]",
        ),
        (_native({"embeddings": torch.zeros(3, 2, 64)}, kind="soft_prompt"), r"shape \[3, 2, 64\]"),
        (
            _native({"embeddings": torch.zeros(3, WIDTH)}, kind="ia3"),
            r"metadata kind 'ia3'; expected 'prefix', 'soft_prompt' or 'lora'",
        ),
        (
            _native({"embeddings": torch.zeros(3, WIDTH)}),
            r"tensor",
        ),  # no kind: a prefix, which has keys and values
        (
            _native(
                {"keys": torch.zeros(2, 2, 3, 16), "values": torch.zeros(2, 2, 3, 16)}, kind="soft_prompt"
            ),
            r"embeddings",
        ),
        (
            _native({"embeddings": torch.zeros(4, WIDTH)}, kind="soft_prompt"),
            r"num_virtual_tokens is 3 but the tensors hold 4",
        ),
        (
            _native({"embeddings": torch.full((3, WIDTH), float("nan"))}, kind="soft_prompt"),
            r"non-finite|NaN",
        ),
    ],
    ids=["width", "rank", "unknown kind", "kind missing", "prefix tensors", "declared length", "nan"],
)
def test_a_bad_native_soft_prompt_is_refused_naming_the_problem(blob: bytes, match: str) -> None:
    with pytest.raises(PrefixValidationError, match=match) as caught:
        decode_native(blob, LLAMA, LIMITS)
    assert caught.value.status == 400


def test_too_many_virtual_tokens_are_refused_with_413(soft_adapter: Path) -> None:
    with pytest.raises(PrefixValidationError, match="over the limit of 4") as caught:
        decode_peft(*read_adapter(soft_adapter), LLAMA, PrefixLimits(max_virtual_tokens=4))
    assert caught.value.status == 413


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"token_dim": 32}, r"token_dim is 32 but must be 64 \(the base model's embedding width\)"),
        (
            {"num_virtual_tokens": 6},
            r"'prompt_embeddings' has 5 rows; adapter_config\.json says num_virtual_tokens is 6",
        ),
        ({"task_type": "SEQ_2_SEQ_LM"}, r"this base model takes CAUSAL_LM adapters"),
        ({"num_transformer_submodules": 2}, r"a CAUSAL_LM adapter has 1"),
    ],
)
def test_a_bad_peft_soft_prompt_is_refused(
    soft_adapter: Path, changes: dict[str, object], match: str
) -> None:
    config_bytes, model_bytes = read_adapter(soft_adapter)
    config = {**json.loads(config_bytes), **changes}
    with pytest.raises(PrefixValidationError, match=match):
        decode_peft(json.dumps(config).encode(), model_bytes, LLAMA, LIMITS)


def test_a_soft_prompt_whose_values_overflow_the_servers_dtype_is_refused() -> None:
    soft = SoftPrompt(torch.full((2, WIDTH), 1e6))
    with pytest.raises(PrefixValidationError, match="too large for the server's dtype"):
        soft.to("cpu", torch.float16)


def test_encode_refuses_a_soft_prompt_of_another_width_and_prefixes_keep_their_format() -> None:
    with pytest.raises(PrefixValidationError, match="does not fit the base model's embeddings of width 64"):
        encode_peft(SoftPrompt(torch.zeros(2, 8)), LLAMA)
    prefix = Prefix(torch.zeros(LLAMA.prefix_shape(2)), torch.zeros(LLAMA.prefix_shape(2)))
    assert (
        "kind" not in _header(encode_native(prefix, LLAMA))["__metadata__"]
    )  # files written before soft prompts and after are alike
