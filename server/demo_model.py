"""The offline demo model: a small Llama-architecture causal LM with grouped-query attention and a
byte-level BPE tokenizer trained in-process. Deterministic, built without any network access."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEMO_SEED = 1234
DEMO_VOCAB_SIZE = 512
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# A small, fixed corpus: enough for the BPE trainer to learn common English merges.
_CORPUS = """
Prefix tuning keeps the language model frozen and learns a small continuous prefix for each task.
The prefix is a sequence of virtual tokens whose keys and values are prepended to every attention layer.
A server can keep one base model in memory and switch between thousands of tasks at no cost.
Summarize the following text in one sentence. Translate the sentence into French. Answer the question.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a little model that wanted to learn many tasks without forgetting any of them.
Write a short poem about the sea. Classify the sentiment of this review as positive or negative.
The weather today is sunny with a light breeze from the west and temperatures around twenty degrees.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2026. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\
def add(a, b): return a + b  # code is text too; print("hello, world") and json {"key": "value"}.
User: hello there! Assistant: hello, how can I help you today? User: tell me a joke. Assistant: sure.
"""


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the built-in corpus (deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines * 8, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=2048,
    )
    fast.chat_template = DEMO_CHAT_TEMPLATE
    return fast


def demo_model_config(vocab_size: int, eos_token_id: int, pad_token_id: int) -> LlamaConfig:
    """Geometry of the demo model: 4 layers, 4 query heads sharing 2 key/value heads (GQA), head_dim 16."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        initializer_range=0.1,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def build_demo_model(out_dir: str | Path) -> Path:
    """Build the demo model and tokenizer into ``out_dir``; returns the folder.

    Written to a temporary sibling folder and renamed into place, so a crash or a concurrent builder
    never leaves a half-written model behind.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_demo_tokenizer()
    config = demo_model_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        model = LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            return out_dir  # another process finished first; its model is identical
        os.chmod(staging, 0o755)
        os.rename(staging, out_dir)
        Path(staging).mkdir()  # let TemporaryDirectory clean up its (now empty) name
    return out_dir


def default_demo_model_dir() -> Path:
    """Where ``prefix-serve serve`` builds the demo model on first use."""
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache_home / "prefix-serve" / "demo-model-v1"


def ensure_demo_model(path: Path | None = None) -> Path:
    """Return the demo model folder, building it first if it is not there yet."""
    path = path or default_demo_model_dir()
    if not (path / "config.json").exists():
        build_demo_model(path)
    return path
