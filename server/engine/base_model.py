"""Loading the one frozen base model that every task shares."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from prefix_store.geometry import ModelGeometry, Projection
from server.engine.encoder_decoder import EncoderDecoder, check_encoder_decoder
from server.engine.model_kind import DecoderOnly, ModelKind
from server.engine.model_support import check_attention_layout
from server.engine.paged_attention import use_paged_attention

log = logging.getLogger(__name__)

DeviceOption = Literal["auto", "cpu", "cuda"]
DtypeOption = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class BaseModel:
    """The resident base model, its tokenizer and the facts the engine needs about it."""

    model_id: str  # the name clients use for "no prefix" (the folder name or hub id)
    model: PreTrainedModel  # frozen, eval mode, on `device`
    tokenizer: PreTrainedTokenizerBase
    geometry: ModelGeometry
    device: torch.device
    dtype: torch.dtype
    max_positions: int | None  # prefix + prompt + new tokens must fit (a hard limit for GPT-2's table)
    eos_token_ids: frozenset[int]
    encoder_decoder: EncoderDecoder | None = None  # T5, BART: how the engine runs their encoder

    @property
    def kind(self) -> ModelKind:
        """How the engine feeds this model (decoder-only, or encoder-decoder)."""
        return self.encoder_decoder or DecoderOnly(self.model)


def resolve_device(option: DeviceOption) -> torch.device:
    if option == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if option == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(option)


def resolve_dtype(option: DtypeOption, device: torch.device) -> torch.dtype:
    if option != "auto":
        return getattr(torch, option)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(i) for i in eos)
    return frozenset(ids)


def max_positions_of(config: PretrainedConfig) -> int | None:
    """How many positions the model has (prefix + prompt + new tokens must fit); None = no fixed table."""
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(positions) if positions else None


def lora_projections(model: PreTrainedModel) -> tuple[Projection, ...]:
    """The linear maps of a causal LM that a LoRA task may adapt: every ``nn.Linear`` and GPT-2 ``Conv1D``
    but the output embedding (``lm_head``)."""
    output = model.get_output_embeddings()
    projections = []
    for name, module in model.named_modules():
        if module is output:
            continue
        if isinstance(module, torch.nn.Linear):
            projections.append(Projection(name, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):  # weight [in, out]
            in_features, out_features = module.weight.shape
            projections.append(Projection(name, int(in_features), int(out_features), transposed=True))
    return tuple(projections)


def load_base_model(
    model_path: str | Path,
    *,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    model_id: str | None = None,
) -> BaseModel:
    """Load a Hugging Face causal LM or encoder-decoder (T5, BART families) folder (or hub id) once, frozen,
    in eval mode, its attention switched to the engine's (``UnsupportedModel`` for one the engine cannot
    serve). ``model_id`` names it in the API (default: the folder's name)."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model_config = AutoConfig.from_pretrained(model_path)
    encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
    if encoder_decoder:  # never its decoder alone as a causal LM
        check_encoder_decoder(model_config)
    model_class = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    model = model_class.from_pretrained(model_path, dtype=torch_dtype)
    model.to(torch_device).eval().requires_grad_(False)
    check_attention_layout(model.config)  # UnsupportedModel: what the engine cannot serve, before any use
    use_paged_attention(model)
    config = model.config.get_text_config()
    base = BaseModel(
        model_id=model_id or Path(str(model_path)).name or str(model_path),
        model=model,
        tokenizer=tokenizer,
        geometry=replace(
            ModelGeometry.from_config(config),
            embedding_dim=model.get_input_embeddings().embedding_dim,
            projections=() if encoder_decoder else lora_projections(model),
        ),
        device=torch_device,
        dtype=torch_dtype,
        max_positions=max_positions_of(config),
        eos_token_ids=_eos_token_ids(model, tokenizer),
        encoder_decoder=EncoderDecoder.prepare(model) if encoder_decoder else None,
    )
    log.info(
        "loaded base model %s (%s) on %s in %s",
        base.model_id,
        base.geometry.fingerprint,
        torch_device,
        torch_dtype,
    )
    return base
