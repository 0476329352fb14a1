"""Decoder families beyond the suite's Llama, GPT-2 and Qwen2, each a tiny random model built here: every
case of a family in one mixed batch (rows with PEFT prefixes of different lengths, with a PEFT soft prompt
(PROMPT_TUNING), with a PEFT LoRA on every projection the model has, and base rows, prompts of different
lengths), each row's greedy tokens equal to PEFT's forward loop. The sliding-window families
have windows shorter than prefix + prompt + output, so a local layer's window leaves the prefix (PEFT's
semantics: the model's own mask over the prefix slots at cache positions 0…P-1)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    CohereConfig,
    FalconConfig,
    GemmaConfig,
    GPTJConfig,
    GPTNeoXConfig,
    GraniteConfig,
    MixtralConfig,
    MptConfig,
    Olmo2Config,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3Config,
    StableLmConfig,
    Starcoder2Config,
)
from transformers.models.deepseek_v3 import DeepseekV3Config
from transformers.models.gemma2 import Gemma2Config
from transformers.models.gemma3 import Gemma3TextConfig
from transformers.models.mamba import MambaConfig
from transformers.models.mistral import MistralConfig
from transformers.models.qwen2 import Qwen2Config
from transformers.models.qwen3_next import Qwen3NextConfig

from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.source import load_prefix_source
from prefix_store.lora import LoraAdapter
from prefix_store.soft_prompt import SoftPrompt
from server.demo_model import build_demo_tokenizer
from server.engine.base_model import BaseModel, load_base_model
from server.engine.generation import generate
from server.engine.model_support import UnsupportedModel, check_attention_layout
from server.engine.paged_attention import use_paged_attention
from server.engine.soft_prompts import soft_prompt_prefix
from testing.peft_reference import (
    make_peft_adapter,
    make_peft_lora,
    make_peft_soft_prompt,
    peft_greedy_tokens,
)
from tests.server.engine.helpers import request

PREFIX_LENGTHS = (3, 9)  # one inside the smallest window, one longer than it
SOFT_PROMPT_LENGTH = 5
PROMPTS = ["hi there", "Once upon a time there was a little model that wanted to learn many tasks at once."]
NEW_TOKENS = 10
WINDOW = 8  # shorter than prefix + prompt + output of every row


def _common(vocab_size: int, eos: int) -> dict[str, object]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": 0.1,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }


def _llama_like(
    config_class: type[PretrainedConfig], **extra: object
) -> Callable[[int, int], PretrainedConfig]:
    """A family configured with Llama's names (hidden_size, num_key_value_heads, …), two layers."""
    return lambda v, e: config_class(**_common(v, e), num_hidden_layers=2, **extra)


FAMILIES: dict[str, Callable[[int, int], PretrainedConfig]] = {
    "qwen3": _llama_like(Qwen3Config, head_dim=16),
    "phi3": _llama_like(Phi3Config),
    "mixtral": _llama_like(MixtralConfig, num_local_experts=2, num_experts_per_tok=1),
    "qwen2-moe": _llama_like(Qwen2MoeConfig, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=64),
    "gemma": _llama_like(GemmaConfig, head_dim=16),
    "starcoder2": _llama_like(Starcoder2Config),
    "olmo2": _llama_like(Olmo2Config),
    "granite": _llama_like(GraniteConfig),
    "stablelm": _llama_like(StableLmConfig),
    "cohere": _llama_like(CohereConfig),
    "gpt-neox": lambda v, e: GPTNeoXConfig(
        **{**_common(v, e), "num_key_value_heads": 4}, num_hidden_layers=2
    ),
    "opt": lambda v, e: OPTConfig(
        vocab_size=v,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=512,
        bos_token_id=e,
        eos_token_id=e,
        pad_token_id=e,
        init_std=0.1,
    ),
    # ALiBi, in BLOOM's own attention code (rerouted by family_attention)
    "bloom": lambda v, e: BloomConfig(
        vocab_size=v,
        hidden_size=64,
        n_layer=2,
        n_head=4,
        initializer_range=0.1,
        tie_word_embeddings=False,  # tied, the tiny model repeats its last input whatever it attends to
        bos_token_id=e,
        eos_token_id=e,
        pad_token_id=e,
    ),
    # its own attention code too: grouped kv heads, broadcast to every query head in its cache, rotary
    "falcon": lambda v, e: FalconConfig(
        vocab_size=v,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        initializer_range=0.1,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        bos_token_id=e,
        eos_token_id=e,
        pad_token_id=e,
    ),
    "gptj": lambda v, e: GPTJConfig(
        vocab_size=v,
        n_embd=64,
        n_layer=2,
        n_head=4,
        rotary_dim=8,
        n_positions=512,
        bos_token_id=e,
        eos_token_id=e,
        initializer_range=0.1,
    ),
    # every layer local
    "mistral-sliding": lambda v, e: MistralConfig(
        **_common(v, e), num_hidden_layers=2, sliding_window=WINDOW
    ),
    # local layers up to max_window_layers, global above
    "qwen2-sliding": lambda v, e: Qwen2Config(
        **_common(v, e),
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=2,
    ),
    # local and global layers alternating, scores soft-capped (the model's eager attention, as transformers')
    "gemma2-softcap": lambda v, e: Gemma2Config(
        **_common(v, e), num_hidden_layers=2, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=50.0
    ),
    # local and global layers, with different rotary bases
    "gemma3-local-global": lambda v, e: Gemma3TextConfig(
        **_common(v, e),
        num_hidden_layers=3,
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[BaseModel, Path]:
    """The family's tiny model (and its folder), with the demo tokenizer."""
    out = tmp_path_factory.mktemp("families") / request.param
    tokenizer = build_demo_tokenizer()
    config = FAMILIES[request.param](len(tokenizer), tokenizer.eos_token_id)
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return load_base_model(out, device="cpu", dtype="float32"), out


def test_a_mixed_batch_equals_pefts_forward_loop(family: tuple[BaseModel, Path], tmp_path: Path) -> None:
    base, folder = family

    def fresh() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(folder, dtype="float32")

    cases = []
    made = [
        make_peft_adapter(fresh(), tmp_path / f"p{length}", num_virtual_tokens=length, seed=30 + i)
        for i, length in enumerate(PREFIX_LENGTHS)
    ]
    made.append(
        make_peft_soft_prompt(fresh(), tmp_path / "soft", num_virtual_tokens=SOFT_PROMPT_LENGTH, seed=40)
    )
    made.append(make_peft_lora(fresh(), tmp_path / "lora", target_modules=_lora_targets(base), r=4, seed=50))
    for adapter in made:
        loaded, _ = load_prefix_source(adapter, base.geometry, PrefixLimits())
        conditioning = {
            "prefix": soft_prompt_prefix(base, loaded) if isinstance(loaded, SoftPrompt) else loaded
        }
        if isinstance(loaded, LoraAdapter):
            conditioning = {"prefix": None, "lora": loaded}
        for j, prompt in enumerate(PROMPTS):
            plain = request(base, f"{adapter.name}-{j}", prompt, max_new_tokens=NEW_TOKENS)
            cases.append((adapter, replace(plain, **conditioning)))
    cases += [
        (None, request(base, f"base-{j}", prompt, max_new_tokens=NEW_TOKENS))
        for j, prompt in enumerate(PROMPTS)
    ]
    results = generate(base, [engine_request for _, engine_request in cases])
    for (adapter, engine_request), result in zip(cases, results, strict=True):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
        reference = PeftModel.from_pretrained(model, adapter).eval() if adapter is not None else model
        want = _greedy(reference, list(engine_request.prompt_ids))
        assert result.token_ids == want, engine_request.request_id


def _lora_targets(base: BaseModel) -> str:
    """Every projection of the model, as one expression of exact paths; on a model with fused MoE experts
    (3-D parameters), the attention projections: there PEFT maps MLP names onto the experts' parameters too
    (``target_parameters``), which the server refuses."""
    projections = base.geometry.projections
    if any(parameter.dim() == 3 for parameter in base.model.parameters()):
        projections = tuple(p for p in projections if any("attn" in part for part in p.name.split(".")))
    return "(?:" + "|".join(re.escape(p.name) for p in projections) + ")"


def _greedy(model: torch.nn.Module, prompt_ids: list[int]) -> list[int]:
    if isinstance(model, PeftModel):
        return peft_greedy_tokens(model, prompt_ids, NEW_TOKENS)
    ids = torch.tensor([prompt_ids])
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (MambaConfig(num_hidden_layers=2, hidden_size=32), "linear_attention layers"),
        (
            Qwen3NextConfig(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"]),
            "linear_attention layers",
        ),
        (DeepseekV3Config(num_hidden_layers=2), "multi-head latent attention"),
    ],
    ids=["state-space", "hybrid linear attention", "latent attention"],
)
def test_attention_the_pool_cannot_hold_is_refused_with_its_reason(
    config: PretrainedConfig, reason: str
) -> None:
    with pytest.raises(UnsupportedModel, match=reason):
        check_attention_layout(config)


def test_served_layouts_pass_the_check() -> None:
    vocab, eos = 100, 0
    for build in FAMILIES.values():
        check_attention_layout(build(vocab, eos))


REFUSED_AT_LOAD: dict[str, Callable[[int, int], PretrainedConfig]] = {
    # ALiBi in its own attention code, which the engine does not reroute (BLOOM's and Falcon's it does)
    "mpt": lambda v, e: MptConfig(vocab_size=v, d_model=64, n_heads=4, n_layers=2),
}


@pytest.mark.parametrize("name", list(REFUSED_AT_LOAD))
def test_a_model_computing_attention_itself_is_refused_at_load(name: str, tmp_path: Path) -> None:
    tokenizer = build_demo_tokenizer()
    config = REFUSED_AT_LOAD[name](len(tokenizer), tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match="attention interface"):
        load_base_model(tmp_path, device="cpu", dtype="float32")


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"alibi": True}, "alibi=True"),
        ({"new_decoder_architecture": False, "multi_query": True}, "multi-query"),
    ],
    ids=["alibi", "multi-query"],
)
def test_falcon_variants_the_engine_does_not_reroute_are_refused_at_load(
    extra: dict[str, object], reason: str
) -> None:
    config = FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **extra)
    with pytest.raises(UnsupportedModel, match=reason):
        use_paged_attention(AutoModelForCausalLM.from_config(config))


def test_the_readme_support_table_is_the_matrix() -> None:
    """Every family of the matrix is in the README's table as tested, every one refused at load as refused."""
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    table = readme[readme.index("## Model families") : readme.index("## Performance")]
    status = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if len(cells) == 3 and cells[1] in ("tested", "refused"):
            status |= dict.fromkeys(re.findall(r"`([^`]+)`", cells[0]), cells[1])
    assert status == {**dict.fromkeys(FAMILIES, "tested"), **dict.fromkeys(REFUSED_AT_LOAD, "refused")}
