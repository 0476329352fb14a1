"""Valid prefixes and LoRA tasks for the hardening runs, built from a model folder's config (no weights
are loaded: the projections come from the model built on the meta device)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from prefix_store.formats.native import encode_native
from prefix_store.formats.peft import ADAPTER_CONFIG_NAME, ADAPTER_MODEL_NAME, encode_peft
from prefix_store.geometry import ModelGeometry
from prefix_store.lora import LoraAdapter, LoraModule
from prefix_store.prefix import Prefix
from server.engine.base_model import lora_projections


def model_geometry(model_dir: Path) -> ModelGeometry:
    """The geometry of the model in ``model_dir``, its projections included (a causal LM's)."""
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return replace(ModelGeometry.from_config(config), projections=lora_projections(model))


def random_lora(geometry: ModelGeometry, rank: int = 4, seed: int = 0) -> LoraAdapter:
    """A LoRA task on every projection of the first layer's attention-sized maps (all of them, here)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {
        p.name: LoraModule(
            torch.randn(rank, p.in_features, generator=generator) * 0.1,
            torch.randn(p.out_features, rank, generator=generator) * 0.1,
            alpha=2.0 * rank,
        )
        for p in geometry.projections
    }
    return LoraAdapter(modules)


def lora_files(geometry: ModelGeometry, rank: int = 4, seed: int = 0) -> dict[str, bytes]:
    """A valid PEFT ``LORA`` adapter: its files by name."""
    return encode_peft(random_lora(geometry, rank, seed), geometry)


def random_prefix(geometry: ModelGeometry, num_virtual_tokens: int, seed: int) -> Prefix:
    generator = torch.Generator().manual_seed(seed)
    shape = geometry.prefix_shape(num_virtual_tokens)
    return Prefix(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))


def native_prefix(geometry: ModelGeometry, num_virtual_tokens: int = 4, seed: int = 0) -> bytes:
    """A valid native prefix file for the model of ``geometry``."""
    return encode_native(random_prefix(geometry, num_virtual_tokens, seed), geometry)


def peft_files(geometry: ModelGeometry, num_virtual_tokens: int = 4, seed: int = 0) -> dict[str, bytes]:
    """A valid PEFT ``PREFIX_TUNING`` adapter: its files by name."""
    return encode_peft(random_prefix(geometry, num_virtual_tokens, seed), geometry)


def upload(client: httpx.Client, task_id: str, blob: bytes) -> httpx.Response:
    """PUT a native prefix file as multipart field ``file``."""
    return client.put(f"/v1/admin/prefixes/{task_id}", files={"file": ("prefix.safetensors", blob)})


def upload_peft(client: httpx.Client, task_id: str, config: bytes, model: bytes) -> httpx.Response:
    """PUT a PEFT adapter as multipart fields ``adapter_config`` and ``adapter_model``."""
    files = {
        "adapter_config": (ADAPTER_CONFIG_NAME, config),
        "adapter_model": (ADAPTER_MODEL_NAME, model),
    }
    return client.put(f"/v1/admin/prefixes/{task_id}", files=files)
