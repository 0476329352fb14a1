"""The offline demo model: deterministic, loadable with the Auto classes, Llama with grouped-query attention."""

from __future__ import annotations

import hashlib
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from server.cli import main
from server.demo_model import ensure_demo_model


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_cli_builds_the_same_model_twice(demo_model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["demo-model", str(tmp_path / "again")]) == 0
    assert "demo model written" in capsys.readouterr().out
    assert _digest(tmp_path / "again") == _digest(demo_model_dir)


def test_auto_classes_load_it_and_it_uses_gqa(demo_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    assert model.config.model_type == "llama"
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    text = "Prefix tuning keeps the model frozen. café 日本"
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # byte-level: every string round-trips
    assert tokenizer.eos_token_id is not None and tokenizer.chat_template


def test_ensure_builds_once_under_the_cache_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = ensure_demo_model()
    assert path.is_relative_to(tmp_path) and (path / "config.json").exists()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
