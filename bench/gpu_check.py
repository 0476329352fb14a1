"""Correctness of the engine on a CUDA device, against float32 references on the CPU.

    python -m bench.gpu_check --out gpu_check.json

On a random Llama-shaped model with grouped-query attention (weights shared by every copy):
  fp32-cuda-vs-cpu  greedy tokens of each request alone, CUDA float32 vs CPU float32 (SDPA kernels)
  bf16-vs-fp32      CUDA bfloat16 greedy tokens vs the CPU float32 reference, compared up to the first
                    step where the reference's top-2 logit margin is below --margin (where a bf16
                    rounding could honestly flip the choice)
  batch-invariance  a mixed batch (prefixes of 0-31 tokens, prompts of 1-60 tokens) vs the same
                    requests alone, on CUDA in float32 and in bfloat16
  padded-rows       the KV blocks of a continuous batch with prefix-less one-token rows beside long
                    prefixed rows stay finite (no NaN from fully masked padding queries), in bfloat16
  peft              engine vs PEFT's forward-loop reference on CUDA float32, token for token
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import PrefixTuningConfig, get_peft_model

from prefix_store.prefix import Prefix
from server.benchmark.models import build_model
from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.generation import generate
from server.engine.request import GenerationRequest
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.training.prefill_batch import BatchRow, PrefillBatch

PREFIX_LENGTHS = [0, 1, 7, 16, 31]
PROMPT_LENGTHS = [1, 5, 23, 60, 12]
NEW_TOKENS = 24


def copy_to(base: BaseModel, device: str, dtype: torch.dtype) -> BaseModel:
    """The same weights on another device / dtype."""
    model = type(base.model)(base.model.config)
    model.load_state_dict(base.model.state_dict())
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return BaseModel(**{**base.__dict__, "model": model, "device": torch.device(device), "dtype": dtype})


def make_requests(base: BaseModel, seed: int = 0) -> list[GenerationRequest]:
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for i, (p, n) in enumerate(zip(PREFIX_LENGTHS, PROMPT_LENGTHS, strict=True)):
        shape = base.geometry.prefix_shape(p)
        prefix = (
            Prefix(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
            if p
            else None
        )
        prompt = torch.randint(2, len(base.tokenizer), (n,), generator=generator).tolist()
        requests.append(
            GenerationRequest(f"r{i}", prompt, prefix, SamplingParams(), NEW_TOKENS, ignore_eos=True)
        )
    return requests


def on(base: BaseModel, requests: list[GenerationRequest]) -> list[GenerationRequest]:
    placed = []
    for r in requests:
        prefix = r.prefix.to(base.device, base.dtype) if r.prefix else None
        placed.append(GenerationRequest(**{**r.__dict__, "prefix": prefix}))
    return placed


def solo_tokens(base: BaseModel, requests: list[GenerationRequest]) -> list[list[int]]:
    return [generate(base, [r])[0].token_ids for r in on(base, requests)]


def batch_tokens(base: BaseModel, requests: list[GenerationRequest]) -> list[list[int]]:
    return [r.token_ids for r in generate(base, on(base, requests))]


def reference_margins(base: BaseModel, request: GenerationRequest, tokens: list[int]) -> list[float]:
    """Top-2 logit margins of ``base`` along the greedy trajectory ``tokens`` (teacher forced)."""
    runner, margins, history = ModelRunner(base), [], list(request.prompt_ids)
    for token in tokens:
        batch = PrefillBatch.from_rows(
            [BatchRow("m", history, request.prefix)], base.geometry, base.device, base.dtype
        )
        top = torch.topk(runner.forward(batch)[0], 2).values
        margins.append(float(top[0] - top[1]))
        history.append(token)
    return margins


def compare_where_confident(candidate: list[int], reference: list[int], margins: list[float], margin: float):
    compared = 0
    for got, want, m in zip(candidate, reference, margins, strict=True):
        if m < margin:
            break
        if got != want:
            return compared, False
        compared += 1
    return compared, True


def padded_rows_stay_finite(base: BaseModel) -> dict:
    core = EngineCore(base, SchedulerConfig(max_batch_size=8, max_batch_tokens=1 << 16))
    requests = on(base, make_requests(base, seed=5))
    for r in requests:
        core.add_request(r)
    finite = True
    for step in range(NEW_TOKENS):
        if step == 3:  # late joiners: one-token prompts without a prefix beside long prefixed rows
            for j in range(3):
                core.add_request(
                    GenerationRequest(f"late{j}", [5], None, SamplingParams(), 8, ignore_eos=True)
                )
        core.step()
        blocks = sorted({b for r in core.rows for b in r.kv.prefix_blocks + r.kv.blocks})
        for keys in core.kv.pool.keys:
            finite &= bool(torch.isfinite(keys[blocks]).all())
    return {"attention": base.model.config._attn_implementation, "finite": finite}


def peft_check(base: BaseModel) -> dict:
    from testing.peft_reference import peft_greedy_tokens

    torch.manual_seed(3)
    peft_model = get_peft_model(base.model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=9))
    peft_model.prompt_encoder.to(base.device)
    peft_model.eval()
    cache = peft_model.get_prompt(batch_size=1)
    prefix = Prefix(
        torch.stack([layer.keys[0] for layer in cache.layers]),
        torch.stack([layer.values[0] for layer in cache.layers]),
    )
    prompt = list(range(10, 40))
    want = peft_greedy_tokens(peft_model, prompt, 16)
    got = generate(base, [GenerationRequest("p", prompt, prefix, SamplingParams(), 16, ignore_eos=True)])[
        0
    ].token_ids
    return {"equal": got == want, "tokens": len(want)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--geometry", default="small")
    parser.add_argument("--margin", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    # a wider weight init than the default makes the random model's choices decisive (large margins)
    cpu32 = build_model(args.geometry, device="cpu", dtype=torch.float32, seed=0, initializer_range=0.1)
    dev32, dev16 = copy_to(cpu32, args.device, torch.float32), copy_to(cpu32, args.device, torch.bfloat16)
    requests = make_requests(cpu32)
    reference = solo_tokens(cpu32, requests)
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device
    }

    fp32 = solo_tokens(dev32, requests)
    results["fp32-cuda-vs-cpu"] = {
        "requests": len(requests),
        "equal": sum(a == b for a, b in zip(fp32, reference, strict=True)),
    }

    bf16 = solo_tokens(dev16, requests)
    compared = []
    for r, got, want in zip(requests, bf16, reference, strict=True):
        steps, agree = compare_where_confident(got, want, reference_margins(cpu32, r, want), args.margin)
        compared.append({"request": r.request_id, "confident_steps": steps, "agree": agree})
    results["bf16-vs-fp32"] = {
        "margin": args.margin,
        "rows": compared,
        "all_agree": all(c["agree"] for c in compared),
    }

    results["batch-invariance"] = {
        "float32": sum(a == b for a, b in zip(batch_tokens(dev32, requests), fp32, strict=True)),
        "bfloat16": sum(a == b for a, b in zip(batch_tokens(dev16, requests), bf16, strict=True)),
        "of": len(requests),
    }
    results["padded-rows"] = [padded_rows_stay_finite(dev16)]
    results["peft"] = peft_check(dev32)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(results, indent=2))
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
