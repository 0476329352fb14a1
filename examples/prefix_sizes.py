"""How big is a prefix next to its base model? Computed from model configs alone (no weights needed).

    python examples/prefix_sizes.py [--num-virtual-tokens 20]

Base models are built on PyTorch's ``meta`` device to count their parameters; a prefix holds
``2 × layers × kv_heads × head_dim`` numbers per virtual token.
"""

from __future__ import annotations

import argparse

from transformers import AutoConfig, GPT2Config, LlamaConfig, MistralConfig

from server.demo_model import demo_model_config
from server.training.sizes import prefix_size

# the published shapes of well-known checkpoints (config.json fields), no download needed
GEOMETRIES = {
    "demo model (this repo)": demo_model_config(vocab_size=512, eos_token_id=0, pad_token_id=1),
    "GPT-2 medium (the paper's)": GPT2Config(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257),
    "Llama-2-7B (MHA)": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32,
    ),
    "Mistral-7B (GQA 8 kv heads)": MistralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    ),
    "Llama-3-8B (GQA 8 kv heads)": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    ),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--model", action="append", default=[], help="also a local model folder (repeatable)")
    args = parser.parse_args()
    configs = dict(GEOMETRIES) | {path: AutoConfig.from_pretrained(path) for path in args.model}
    tokens = args.num_virtual_tokens
    print(
        f"| model | base parameters | prefix ({tokens} virtual tokens) | share of base | prefix bytes (bf16) |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, config in configs.items():
        size = prefix_size(config, tokens)
        print(
            f"| {name} | {size.base_parameters:,} | {size.prefix_parameters:,} | {100 * size.fraction:.3f}% "
            f"| {size.bytes_bfloat16 / 1024:,.0f} KiB |"
        )


if __name__ == "__main__":
    main()
