"""Shared fixtures: the offline demo model (tiny Llama with GQA), a tiny GPT-2 and Qwen2, all on the CPU
in float32, and the real SmolLM2. And the ``e2e`` marker's guard: a test that starts a process (a server,
Redis, nginx, a CLI run) must be marked ``e2e``, so that ``pytest -m "not e2e"`` is the fast subset."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from server.demo_model import build_demo_model, build_demo_tokenizer
from server.engine.base_model import BaseModel, load_base_model


@contextlib.contextmanager
def _processes_allowed(item: pytest.Item) -> Iterator[None]:
    """Around a test's set-up and call: unless it is marked ``e2e``, starting a process fails the test
    (fixtures of wider scope that the test is the first to use included)."""
    if item.get_closest_marker("e2e") is not None:
        yield
        return
    start = subprocess.Popen._execute_child

    def refuse(self: subprocess.Popen, args: object, *rest: object, **kwargs: object) -> None:
        raise AssertionError(f"{item.nodeid} starts a process ({args!r}): mark it with pytest.mark.e2e")

    subprocess.Popen._execute_child = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        subprocess.Popen._execute_child = start  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _processes_allowed(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _processes_allowed(item):
        return (yield)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="session")
def gpt2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 (absolute positions, no GQA) with the demo tokenizer."""
    out = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    tokenizer = build_demo_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=64,
        n_layer=3,
        n_head=4,
        initializer_range=0.1,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(7)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 (RoPE, GQA, biased q/k/v projections) with the demo tokenizer."""
    out = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    tokenizer = build_demo_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(11)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama_base(demo_model_dir: Path) -> BaseModel:
    return load_base_model(demo_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def gpt2_base(gpt2_model_dir: Path) -> BaseModel:
    return load_base_model(gpt2_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def qwen2_base(qwen2_model_dir: Path) -> BaseModel:
    return load_base_model(qwen2_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session", params=["llama", "gpt2", "qwen2"])
def base(request: pytest.FixtureRequest) -> BaseModel:
    """Each engine test runs on every architecture: Llama (GQA), GPT-2 (absolute positions), Qwen2 (biases)."""
    return request.getfixturevalue(f"{request.param}_base")


@pytest.fixture(scope="session")
def smollm2_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a float32 folder (converted from its GGUF once per machine and
    kept under ~/.cache/prefix-serve, so later runs load it in a second)."""
    from server.model_source import DEFAULT_MODEL, resolve_model

    return Path(resolve_model(DEFAULT_MODEL).path)
