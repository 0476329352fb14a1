"""LoRA tasks in both forms: a real PEFT ``LORA`` adapter decodes to its modules, ranks and alphas as PEFT
resolves them, round-trips through the native file byte-stable, and everything that is not a plain
low-rank update of a projection of this model is refused with a 400 naming it."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import PreTrainedModel

from prefix_store.errors import PrefixValidationError
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.native import decode_native, encode_native
from prefix_store.formats.peft import decode_peft, encode_peft
from prefix_store.geometry import ModelGeometry
from prefix_store.lora import LoraAdapter
from server.engine.base_model import lora_projections
from testing.peft_reference import make_peft_lora
from tests.prefix_store.test_peft_format import read_adapter, tiny_gpt2, tiny_llama

LIMITS = PrefixLimits()
Q = "model.layers.0.self_attn.q_proj"


def _geometry(model: PreTrainedModel) -> ModelGeometry:
    return replace(ModelGeometry.from_config(model.config), projections=lora_projections(model))


LLAMA = _geometry(tiny_llama())


@pytest.fixture(scope="module")
def llama_lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    folder = make_peft_lora(
        tiny_llama(),
        tmp_path_factory.mktemp("lora"),
        target_modules=["q_proj", "v_proj", "down_proj"],
        r=4,
        lora_alpha=8,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"layers.1.self_attn.v_proj": 3},
    )
    return read_adapter(folder)


def refused(config: bytes, model: bytes, match: str, *, limits: PrefixLimits = LIMITS) -> None:
    with pytest.raises(PrefixValidationError, match=match) as caught:
        decode_peft(config, model, LLAMA, limits)
    assert caught.value.status == 400


def _with(config: bytes, **changes: object) -> bytes:
    return json.dumps({**json.loads(config), **changes}).encode()


def _tensors(model: bytes) -> dict[str, torch.Tensor]:
    return dict(safetensors.torch.load(model))


def _saved(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save(tensors)


def test_a_peft_lora_decodes_with_the_ranks_and_alphas_peft_gives_each_module(llama_lora) -> None:
    adapter = decode_peft(*llama_lora, LLAMA, LIMITS)
    assert isinstance(adapter, LoraAdapter) and adapter.num_virtual_tokens == 0
    assert len(adapter.modules) == 6  # 3 targets x 2 layers
    ranks = {name.split(".", 3)[-1] + f"@{name.split('.')[2]}": m.rank for name, m in adapter.modules.items()}
    assert ranks == {
        "self_attn.q_proj@0": 4,
        "self_attn.q_proj@1": 4,
        "self_attn.v_proj@0": 4,
        "self_attn.v_proj@1": 4,
        "mlp.down_proj@0": 2,
        "mlp.down_proj@1": 2,
    }
    v1 = adapter.modules["model.layers.1.self_attn.v_proj"]
    assert adapter.scaling(v1) == 3 / 4 and adapter.scaling(adapter.modules[Q]) == 8 / 4


def test_the_native_file_and_the_peft_folder_round_trip(llama_lora) -> None:
    adapter = decode_peft(*llama_lora, LLAMA, LIMITS)
    blob = encode_native(adapter, LLAMA)
    native = decode_native(blob, LLAMA, LIMITS)
    assert encode_native(native, LLAMA) == blob  # stable bytes: a re-upload shares its blob
    files = encode_peft(native, LLAMA)
    again = decode_peft(files["adapter_config.json"], files["adapter_model.safetensors"], LLAMA, LIMITS)
    for name, module in adapter.modules.items():
        other = again.modules[name]
        assert torch.equal(module.a, other.a) and torch.equal(module.b, other.b)
        assert adapter.scaling(module) == again.scaling(other)


def test_rslora_scales_by_the_square_root_of_the_rank(tmp_path: Path) -> None:
    folder = make_peft_lora(
        tiny_llama(), tmp_path, target_modules=["q_proj"], r=16, lora_alpha=8, use_rslora=True
    )
    adapter = decode_peft(*read_adapter(folder), LLAMA, LIMITS)
    assert adapter.use_rslora and adapter.scaling(adapter.modules[Q]) == 8 / math.sqrt(16)


def test_gpt2_conv1d_projections_are_adapted_and_written_back_with_fan_in_fan_out(tmp_path: Path) -> None:
    model = tiny_gpt2()
    geometry = _geometry(model)
    folder = make_peft_lora(model, tmp_path, target_modules=["c_attn", "c_fc"], r=2)
    adapter = decode_peft(*read_adapter(folder), geometry, LIMITS)
    module = adapter.modules["transformer.h.0.attn.c_attn"]
    assert module.a.shape == (2, 64) and module.b.shape == (192, 2)
    assert json.loads(encode_peft(adapter, geometry)["adapter_config.json"])["fan_in_fan_out"] is True


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"use_dora": True}, r"DoRA \(use_dora\) is not served"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save is set"),
        ({"bias": "all"}, r"bias is 'all'; biases are not served"),
        ({"lora_bias": True}, r"LoRA biases \(lora_bias\) are not served"),
        ({"trainable_token_indices": [1, 2]}, r"trainable tokens change the embeddings"),
        ({"layer_replication": [[0, 2]]}, r"layer_replication changes the base model's layers"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights 'pissa' rewrites the base model's weights"),
        (
            {"target_modules": ["q_proj", "lm_head"]},
            r"target module 'lm_head': embedding and lm_head targets",
        ),
        ({"target_modules": ["embed_tokens"]}, r"target module 'embed_tokens': embedding and lm_head"),
        ({"r": 65}, r"r is 65; a rank is an integer from 1 to 64 \(the server's limit\)"),
        ({"r": 0}, r"r is 0; a rank is an integer"),
        ({"r": "4"}, r"r is '4'; a rank is an integer"),
        ({"lora_alpha": None}, r"lora_alpha must be a finite number, got null"),
        ({"lora_alpha": 1e30}, r"lora_alpha is 1e\+30, over the bound"),
        ({"use_rslora": "yes"}, r"use_rslora must be true or false"),
        (
            {"rank_pattern": {"q_proj": 100}},
            r"rank_pattern\['q_proj'\] is 100; a rank is an integer from 1 to 64",
        ),
        (
            {"rank_pattern": {"q_proj": 8}},
            r"module 'model\.layers\.0\.mlp\.down_proj': lora_A has shape \[2, 128\]; expected \[4, 128\]",
        ),
        ({"rank_pattern": {"(": 2}}, r"pattern '\(' is not a regular expression"),
        ({"rank_pattern": {"x" * 600: 2}}, r"a rank_pattern key has 600 characters \(1-512 allowed\)"),
        ({"alpha_pattern": ["q_proj"]}, r"alpha_pattern must be a JSON object"),
        ({"task_type": "SEQ_CLS"}, r"task_type is 'SEQ_CLS'; this base model takes CAUSAL_LM adapters"),
    ],
)
def test_what_is_not_a_plain_lora_of_this_model_is_refused(llama_lora, changes: dict, match: str) -> None:
    config, model = llama_lora
    refused(_with(config, **changes), model, match)


def test_refused_tensors_are_named(llama_lora) -> None:
    config, model = llama_lora
    tensors = _tensors(model)
    a = tensors[f"base_model.model.{Q}.lora_A.weight"]
    cases = {
        "base_model.model.model.embed_tokens.lora_embedding_A": r"adapts an embedding or lm_head",
        "base_model.model.lm_head.lora_A.weight": r"module 'lm_head': embedding and lm_head targets are refused",
        f"base_model.model.{Q}.lora_magnitude_vector": r"is a DoRA magnitude; DoRA is not served",
        f"base_model.model.{Q}.base_layer.bias": r"is a bias; biases are not served",
        "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": r"the base model has no such projection",
    }
    for name, match in cases.items():
        extra = {name: a.clone()}
        if name.endswith("lora_A.weight"):
            extra[name.replace("lora_A", "lora_B")] = torch.zeros(64, a.shape[0])
        refused(config, _saved({**tensors, **extra}), match)
    unpaired = {k: v for k, v in tensors.items() if not k.startswith(f"base_model.model.{Q}.lora_B")}
    refused(config, _saved(unpaired), r"module 'model\.layers\.0\.self_attn\.q_proj' has no lora_B tensor")
    nan = {**tensors, f"base_model.model.{Q}.lora_A.weight": torch.full_like(a, float("nan"))}
    refused(config, _saved(nan), r"contains non-finite values")
    wide = {**tensors, f"base_model.model.{Q}.lora_B.weight": torch.zeros(65, a.shape[0])}
    refused(config, _saved(wide), r"lora_B has shape \[65, 4\]; expected \[64, 4\]")


def test_an_encoder_decoder_refuses_lora_and_a_geometry_without_projections_says_why(llama_lora) -> None:
    config, model = llama_lora
    t5 = replace(LLAMA, model_type="t5", encoder_decoder=True)
    with pytest.raises(PrefixValidationError, match=r"LoRA tasks are served on decoder-only models"):
        decode_peft(_with(config, task_type="SEQ_2_SEQ_LM"), model, t5, LIMITS)
    with pytest.raises(PrefixValidationError, match=r"does not list"):
        decode_peft(config, model, replace(LLAMA, projections=()), LIMITS)


def test_a_native_lora_file_of_bad_metadata_is_refused(llama_lora) -> None:
    adapter = decode_peft(*llama_lora, LLAMA, LIMITS)
    tensors, metadata = _native_parts(encode_native(adapter, LLAMA))
    for changes, match in [
        ({"r": "x"}, r"metadata r 'x' is not JSON"),
        (
            {"rank_pattern": json.dumps({"model.layers.9.mlp.down_proj": 2})},
            r"a pattern names .*which the file does not adapt",
        ),
        ({"use_rslora": "maybe"}, r"use_rslora must be true or false"),
        ({"base_model": "gpt2/layers=1/kv_heads=1/head_dim=1"}, r"was made for base model"),
    ]:
        with pytest.raises(PrefixValidationError, match=match):
            decode_native(safetensors.torch.save(tensors, metadata={**metadata, **changes}), LLAMA, LIMITS)
    with pytest.raises(PrefixValidationError, match=r"'<module>.lora_A' and '<module>.lora_B'"):
        decode_native(safetensors.torch.save({"x.lora_C": torch.zeros(1)}, metadata=metadata), LLAMA, LIMITS)


def _native_parts(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    (length,) = struct.unpack("<Q", blob[:8])
    return _tensors(blob), json.loads(blob[8 : 8 + length])["__metadata__"]
