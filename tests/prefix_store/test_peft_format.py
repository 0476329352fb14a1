"""PEFT PREFIX_TUNING adapters: decoded exactly as PEFT puts them in the cache, written so PEFT loads them."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from prefix_store.errors import PrefixValidationError
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.native import decode_native, encode_native
from prefix_store.formats.peft import decode_peft, encode_peft, write_peft_folder
from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix
from testing.peft_reference import make_peft_adapter, peft_greedy_tokens

pytestmark = [
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

LIMITS = PrefixLimits()
PROMPT = [5, 6, 7, 8, 9]


def tiny_llama() -> PreTrainedModel:
    """Llama with grouped-query attention: 4 query heads share 2 key/value heads of 16 features."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> PreTrainedModel:
    # initializer_range 0.1: at GPT-2's default 0.02 this tiny model greedily repeats one token whatever the prefix.
    config = GPT2Config(
        vocab_size=128,
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


BUILDERS: dict[str, Callable[[], PreTrainedModel]] = {"llama": tiny_llama, "gpt2": tiny_gpt2}
LLAMA = ModelGeometry.from_config(tiny_llama().config)


def read_adapter(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()


def base_greedy_tokens(model: PreTrainedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            next_id = model(input_ids=ids).logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(tiny_llama(), tmp_path_factory.mktemp("llama-adapter"), num_virtual_tokens=3)


def adapter_files(llama_adapter: Path, **config_changes: object) -> tuple[bytes, bytes]:
    """The Llama adapter's files, with some config fields replaced (or removed, for None)."""
    config_bytes, model_bytes = read_adapter(llama_adapter)
    config = json.loads(config_bytes)
    config.update(config_changes)
    config = {k: v for k, v in config.items() if v is not None}
    return json.dumps(config).encode(), model_bytes


def refused(
    config: bytes, model: bytes, match: str, *, status: int = 400, limits: PrefixLimits = LIMITS
) -> None:
    with pytest.raises(PrefixValidationError, match=match) as caught:
        decode_peft(config, model, LLAMA, limits)
    assert caught.value.status == status


# --- decoding agrees with PEFT ------------------------------------------------------------------


def test_peft_writes_what_the_format_module_expects(llama_adapter: Path) -> None:
    config = json.loads((llama_adapter / "adapter_config.json").read_text())
    tensors = safetensors.torch.load((llama_adapter / "adapter_model.safetensors").read_bytes())

    # GQA: PEFT stores the key/value heads (2, not the 4 query heads) and token_dim = 2 × 16.
    assert (config["peft_type"], config["num_attention_heads"], config["token_dim"]) == (
        "PREFIX_TUNING",
        2,
        32,
    )
    assert {name: tuple(t.shape) for name, t in tensors.items()} == {"prompt_embeddings": (3, 2 * 2 * 2 * 16)}


@pytest.mark.parametrize("prefix_projection", [False, True], ids=["embedding", "projection"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoded_prefix_is_what_peft_puts_in_the_cache(
    arch: str, prefix_projection: bool, tmp_path: Path
) -> None:
    build = BUILDERS[arch]
    adapter = make_peft_adapter(
        build(), tmp_path, num_virtual_tokens=4, prefix_projection=prefix_projection, seed=1
    )
    geometry = ModelGeometry.from_config(build().config)

    prefix = decode_peft(*read_adapter(adapter), geometry, LIMITS)

    peft_model = PeftModel.from_pretrained(build(), adapter)
    cache = peft_model.get_prompt(batch_size=1)
    assert isinstance(cache, DynamicCache) and len(cache.layers) == geometry.num_layers
    assert prefix.keys.shape == geometry.prefix_shape(4)
    for layer in range(geometry.num_layers):
        assert torch.equal(prefix.keys[layer], cache.layers[layer].keys[0])  # [kv_heads, P, head_dim]
        assert torch.equal(prefix.values[layer], cache.layers[layer].values[0])


@pytest.mark.parametrize("prefix_projection", [False, True], ids=["embedding", "projection"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_to_native_to_peft_round_trip_keeps_greedy_tokens(
    arch: str, prefix_projection: bool, tmp_path: Path
) -> None:
    build = BUILDERS[arch]
    geometry = ModelGeometry.from_config(build().config)
    original = make_peft_adapter(
        build(), tmp_path / "original", num_virtual_tokens=4, prefix_projection=prefix_projection, seed=1
    )

    prefix = decode_peft(*read_adapter(original), geometry, LIMITS)
    stored = decode_native(encode_native(prefix, geometry), geometry, LIMITS)
    exported = write_peft_folder(stored, geometry, tmp_path / "exported", base_model_name_or_path="tiny")

    original_model = PeftModel.from_pretrained(build(), original)
    exported_model = PeftModel.from_pretrained(build(), exported)
    expected = peft_greedy_tokens(original_model, PROMPT, max_new_tokens=8)
    assert peft_greedy_tokens(exported_model, PROMPT, max_new_tokens=8) == expected
    assert expected != base_greedy_tokens(build(), PROMPT, max_new_tokens=8), "the prefix must matter"
    for original_layer, exported_layer in zip(
        original_model.get_prompt(batch_size=1).layers,
        exported_model.get_prompt(batch_size=1).layers,
        strict=True,
    ):
        assert torch.equal(original_layer.keys, exported_layer.keys)
        assert torch.equal(original_layer.values, exported_layer.values)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exported_config_matches_what_peft_writes(arch: str, tmp_path: Path) -> None:
    build = BUILDERS[arch]
    geometry = ModelGeometry.from_config(build().config)
    peft_config = json.loads(
        (make_peft_adapter(build(), tmp_path, num_virtual_tokens=3) / "adapter_config.json").read_text()
    )
    prefix = Prefix(keys=torch.randn(geometry.prefix_shape(3)), values=torch.randn(geometry.prefix_shape(3)))

    ours = json.loads(encode_peft(prefix, geometry)["adapter_config.json"])

    assert set(ours) == set(peft_config) - {"peft_version"}
    for field in (
        "peft_type",
        "task_type",
        "num_layers",
        "num_attention_heads",
        "token_dim",
        "num_virtual_tokens",
        "num_transformer_submodules",
        "inference_mode",
        "prefix_projection",
        "encoder_hidden_size",
        "base_model_name_or_path",
    ):
        assert ours[field] == peft_config[field], field
    loaded = PeftModel.from_pretrained(build(), write_peft_folder(prefix, geometry, tmp_path / "ours"))
    assert loaded.peft_config["default"].inference_mode and not loaded.training


def test_encode_peft_refuses_a_prefix_of_another_geometry() -> None:
    with pytest.raises(
        PrefixValidationError, match=r"does not fit the base model llama/layers=2/kv_heads=2/head_dim=16"
    ):
        encode_peft(Prefix(keys=torch.zeros(2, 4, 3, 16), values=torch.zeros(2, 4, 3, 16)), LLAMA)


def test_a_bfloat16_adapter_is_accepted(llama_adapter: Path) -> None:
    config, model = read_adapter(llama_adapter)
    embeddings = safetensors.torch.load(model)["prompt_embeddings"]
    bf16_model = safetensors.torch.save({"prompt_embeddings": embeddings.to(torch.bfloat16)})

    prefix = decode_peft(config, bf16_model, LLAMA, LIMITS)

    assert prefix.keys.dtype == torch.bfloat16
    assert torch.equal(prefix.keys, decode_peft(config, model, LLAMA, LIMITS).keys.to(torch.bfloat16))


# --- the reference helpers ----------------------------------------------------------------------


def test_make_peft_adapter_is_seeded_and_leaves_the_base_model_and_global_rng_alone(tmp_path: Path) -> None:
    base = tiny_llama()
    weights = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    rng_state = torch.random.get_rng_state()

    first = make_peft_adapter(base, tmp_path / "a", num_virtual_tokens=3, prefix_projection=True, seed=5)
    again = make_peft_adapter(
        tiny_llama(), tmp_path / "b", num_virtual_tokens=3, prefix_projection=True, seed=5
    )
    other = make_peft_adapter(
        tiny_llama(), tmp_path / "c", num_virtual_tokens=3, prefix_projection=True, seed=6
    )

    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert all(torch.equal(weights[name], tensor) for name, tensor in base.state_dict().items())
    assert set(base.state_dict()) == set(weights)
    assert read_adapter(first)[1] == read_adapter(again)[1] != read_adapter(other)[1]


def test_peft_greedy_tokens_stops_after_eos_and_needs_eval_mode(llama_adapter: Path) -> None:
    peft_model = PeftModel.from_pretrained(tiny_llama(), llama_adapter)
    tokens = peft_greedy_tokens(peft_model, PROMPT, max_new_tokens=6)

    eos = tokens[2]
    until_eos = tokens[: tokens.index(eos) + 1]  # [..., eos], at most 3 tokens

    assert peft_greedy_tokens(peft_model, PROMPT, max_new_tokens=6, eos_token_id=eos) == until_eos
    peft_model.train()
    with pytest.raises(ValueError, match="eval mode"):
        peft_greedy_tokens(peft_model, PROMPT, max_new_tokens=1)


# --- adapter_config.json errors -----------------------------------------------------------------


def test_a_real_adalora_adapter_is_refused_naming_its_type(tmp_path: Path) -> None:
    lora = get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    config, model = read_adapter(tmp_path)

    refused(
        json.dumps({**json.loads(config), "peft_type": "ADALORA"}).encode(),
        model,
        r"adapter_config\.json is a 'ADALORA' adapter; only PEFT prompt-learning and LoRA adapters are "
        r"accepted \(PREFIX_TUNING, PROMPT_TUNING, P_TUNING, LORA\)",
    )


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"peft_type": None}, r"adapter_config\.json has no 'peft_type'; only PEFT prompt-learning and LoRA"),
        ({"peft_type": "ADALORA"}, r"is a 'ADALORA' adapter"),
        (
            {"task_type": "SEQ_2_SEQ_LM"},
            r"task_type is 'SEQ_2_SEQ_LM'; this base model takes CAUSAL_LM adapters",
        ),
        ({"num_transformer_submodules": 2}, r"num_transformer_submodules is 2; a CAUSAL_LM adapter has 1"),
        (
            {"modules_to_save": ["lm_head"]},
            r"modules_to_save is set; an adapter may not change the frozen base",
        ),
        (
            {"num_layers": 3},
            r"adapter_config\.json: num_layers is 3 but must be 2 \(the base model's layers\)",
        ),
        (
            {"num_attention_heads": 4},
            r"num_attention_heads is 4 but must be 2 \(the base model's key/value heads\)",
        ),
        (
            {"token_dim": 64},
            r"token_dim is 64 but must be 32 \(key/value heads × head_dim = 2 × 16\)",
        ),
        ({"num_layers": None}, r"adapter_config\.json has no 'num_layers'"),
        ({"token_dim": "32"}, r"token_dim must be an integer, got '32'"),
        ({"num_attention_heads": 2.0}, r"num_attention_heads must be an integer, got 2\.0"),
        ({"num_virtual_tokens": True}, r"num_virtual_tokens must be an integer, got true"),
        ({"num_virtual_tokens": 0}, r"adapter_config\.json: num_virtual_tokens is 0; it must be at least 1"),
    ],
    ids=[
        "no-type",
        "prompt-tuning",
        "seq2seq",
        "submodules",
        "modules-to-save",
        "layers",
        "query-heads",
        "token-dim",
        "missing-field",
        "string-field",
        "float-field",
        "bool-field",
        "zero-tokens",
    ],
)
def test_wrong_config_is_refused(llama_adapter: Path, changes: dict[str, object], match: str) -> None:
    refused(*adapter_files(llama_adapter, **changes), match)


def test_config_absent_fields_that_peft_defaults_are_accepted(llama_adapter: Path) -> None:
    config, model = adapter_files(llama_adapter, task_type=None, num_transformer_submodules=None)

    assert decode_peft(config, model, LLAMA, LIMITS).num_virtual_tokens == 3


def test_more_virtual_tokens_than_the_limit_are_refused_with_413(llama_adapter: Path) -> None:
    refused(
        *read_adapter(llama_adapter),
        r"adapter_config\.json: num_virtual_tokens is 3, over the limit of 2",
        status=413,
        limits=PrefixLimits(max_virtual_tokens=2),
    )


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (
            b"{'peft_type': 'PREFIX_TUNING'}",
            r"adapter_config\.json is not valid JSON \(Expecting property name",
        ),
        (b"\xff\xfe{}", r"adapter_config\.json is not valid JSON \('utf-8' codec"),
        (b'["PREFIX_TUNING"]', r"adapter_config\.json must be a JSON object, got list"),
        (b"", r"adapter_config\.json is not valid JSON"),
    ],
    ids=["python-dict", "not-utf8", "array", "empty"],
)
def test_config_that_is_not_a_json_object_is_refused(llama_adapter: Path, config: bytes, match: str) -> None:
    refused(config, read_adapter(llama_adapter)[1], match)


def test_oversize_config_is_refused_with_413(llama_adapter: Path) -> None:
    config, model = adapter_files(llama_adapter, padding="x" * (64 * 1024))

    refused(config, model, r"adapter_config\.json is \d+ bytes, over the limit of 65536 bytes", status=413)


# --- adapter_model.safetensors errors -----------------------------------------------------------


def test_nan_in_prompt_embeddings_is_refused(llama_adapter: Path) -> None:
    config, model = read_adapter(llama_adapter)
    embeddings = safetensors.torch.load(model)["prompt_embeddings"]
    embeddings[2, 7] = float("nan")

    refused(
        config,
        safetensors.torch.save({"prompt_embeddings": embeddings}),
        r"adapter_model\.safetensors: tensor 'prompt_embeddings' contains non-finite values \(1 NaN, 0 infinite\)",
    )


def test_wrong_tensor_name_is_refused(llama_adapter: Path) -> None:
    config, model = read_adapter(llama_adapter)
    embeddings = safetensors.torch.load(model)["prompt_embeddings"]

    refused(
        config,
        safetensors.torch.save({"base_model.prompt_encoder.default.embedding.weight": embeddings}),
        r"adapter_model\.safetensors: expected exactly the tensors 'prompt_embeddings'; missing 'prompt_embeddings'; "
        r"unexpected 'base_model\.prompt_encoder\.default\.embedding\.weight'",
    )


def test_a_native_file_uploaded_as_adapter_model_is_explained(llama_adapter: Path) -> None:
    prefix = Prefix(keys=torch.zeros(LLAMA.prefix_shape(3)), values=torch.zeros(LLAMA.prefix_shape(3)))

    refused(
        read_adapter(llama_adapter)[0],
        encode_native(prefix, LLAMA),
        r"this is a native prefix file, not a PEFT adapter_model\.safetensors",
    )


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        (
            (4, 128),
            r"tensor 'prompt_embeddings' has shape \[4, 128\]; expected \[num_virtual_tokens, num_layers \* 2 "
            r"\* token_dim\] = \[3, 128\]",
        ),
        ((3, 64), r"has shape \[3, 64\]; expected .* = \[3, 128\]"),
        ((3, 2, 64), r"has shape \[3, 2, 64\]; expected"),
    ],
    ids=["tokens-disagree-with-config", "too-narrow", "3-d"],
)
def test_prompt_embeddings_of_the_wrong_shape_are_refused(
    llama_adapter: Path, shape: tuple[int, ...], match: str
) -> None:
    refused(
        read_adapter(llama_adapter)[0],
        safetensors.torch.save({"prompt_embeddings": torch.zeros(shape)}),
        match,
    )


def test_integer_prompt_embeddings_are_refused(llama_adapter: Path) -> None:
    model = safetensors.torch.save({"prompt_embeddings": torch.zeros(3, 128, dtype=torch.int16)})

    refused(
        read_adapter(llama_adapter)[0], model, r"tensor 'prompt_embeddings' has dtype 'I16'; only floating"
    )


def test_a_pickled_adapter_model_is_refused(llama_adapter: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"prompt_embeddings": torch.zeros(3, 128)}, buffer)

    refused(read_adapter(llama_adapter)[0], buffer.getvalue(), r"adapter_model\.safetensors is a zip archive")


def test_oversize_adapter_model_is_refused_with_413(llama_adapter: Path) -> None:
    config, model = read_adapter(llama_adapter)

    refused(
        config,
        model,
        r"adapter_model\.safetensors is \d+ bytes, over the limit of 100 bytes",
        status=413,
        limits=PrefixLimits(max_file_bytes=100),
    )
