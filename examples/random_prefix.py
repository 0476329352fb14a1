"""Write a random native prefix for a model, to try the server before training a real one.

    python examples/random_prefix.py summarize.safetensors --num-virtual-tokens 8 --seed 1

Without ``--model`` the prefix fits the offline demo model that ``prefix-serve serve`` uses by default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig

from prefix_store import ModelGeometry, Prefix, encode_native
from server.demo_model import ensure_demo_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", help="model folder (default: the demo model)")
    parser.add_argument("--num-virtual-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    geometry = ModelGeometry.from_config(AutoConfig.from_pretrained(args.model or ensure_demo_model()))
    generator = torch.Generator().manual_seed(args.seed)
    shape = geometry.prefix_shape(args.num_virtual_tokens)
    prefix = Prefix(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
    args.out.write_bytes(encode_native(prefix, geometry))
    print(f"wrote {args.out} ({args.num_virtual_tokens} virtual tokens for {geometry.fingerprint})")


if __name__ == "__main__":
    main()
