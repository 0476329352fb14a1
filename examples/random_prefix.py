"""Write a random prefix for a model, to try the server before training a real one: a native
``.safetensors`` file, or with ``--peft`` a PEFT ``PREFIX_TUNING`` adapter folder.

    python examples/random_prefix.py summarize.safetensors --num-virtual-tokens 8 --seed 1
    python examples/random_prefix.py --peft adapter/ --num-virtual-tokens 8 --seed 2

``--model`` takes what ``prefix-serve serve --model`` takes; without it the prefix fits the server's
default model (the built-in smollm2-135m-instruct).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig

from prefix_store.formats.native import encode_native
from prefix_store.formats.peft import write_peft_folder
from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix
from server.model_source import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="the .safetensors file, or with --peft the adapter folder")
    parser.add_argument(
        "--peft",
        action="store_true",
        help="write a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)",
    )
    parser.add_argument(
        "--model", help="a built-in name, .gguf file or model folder (default: smollm2-135m-instruct)"
    )
    parser.add_argument("--num-virtual-tokens", type=int, default=8, help="prefix length (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()
    model = str(resolve_model(args.model).path)
    geometry = ModelGeometry.from_config(AutoConfig.from_pretrained(model))
    generator = torch.Generator().manual_seed(args.seed)
    shape = geometry.prefix_shape(args.num_virtual_tokens)
    prefix = Prefix(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
    if args.peft:
        write_peft_folder(prefix, geometry, args.out, base_model_name_or_path=model)
    else:
        args.out.write_bytes(encode_native(prefix, geometry))
    print(f"wrote {args.out} ({args.num_virtual_tokens} virtual tokens for {geometry.fingerprint})")


if __name__ == "__main__":
    main()
