"""Loading the base model: frozen, eval mode, geometry and limits derived from the config."""

from __future__ import annotations

import pytest
import torch

from server.engine.base_model import BaseModel, load_base_model
from server.engine.request import RequestTooLong, check_fits
from tests.server.engine.helpers import random_prefix, request


def test_llama_geometry_and_frozen_weights(llama_base: BaseModel) -> None:
    assert llama_base.geometry.fingerprint == "llama/layers=4/kv_heads=2/head_dim=16"
    assert not llama_base.model.training
    assert all(not p.requires_grad for p in llama_base.model.parameters())
    assert llama_base.eos_token_ids == {llama_base.tokenizer.eos_token_id}


def test_gpt2_geometry_and_position_limit(gpt2_base: BaseModel) -> None:
    assert gpt2_base.geometry.fingerprint == "gpt2/layers=3/kv_heads=4/head_dim=16"
    assert gpt2_base.max_positions == 256
    prefix = random_prefix(gpt2_base, 20, seed=0)
    check_fits(gpt2_base, request(gpt2_base, "ok", "hello", prefix, max_new_tokens=200), 20)
    with pytest.raises(RequestTooLong, match=r"prefix \(20\) \+ prompt \(\d+\) \+ max_new_tokens \(240\)"):
        check_fits(gpt2_base, request(gpt2_base, "too-long", "hello", prefix, max_new_tokens=240), 20)


def test_dtype_option_is_applied(demo_model_dir) -> None:
    base = load_base_model(demo_model_dir, device="cpu", dtype="bfloat16")
    assert base.dtype == torch.bfloat16
    assert next(base.model.parameters()).dtype == torch.bfloat16


def test_cuda_without_a_gpu_is_a_clear_error(demo_model_dir) -> None:
    if torch.cuda.is_available():
        base = load_base_model(demo_model_dir, device="cuda")
        assert base.device.type == "cuda"
        return
    with pytest.raises(ValueError, match="no CUDA device is available"):
        load_base_model(demo_model_dir, device="cuda")
