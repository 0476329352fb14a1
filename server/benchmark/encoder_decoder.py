"""An encoder-decoder model against what a PEFT user could run (the ``encoder-decoder`` section): a random
T5 (``build_t5``), 8 PEFT ``SEQ_2_SEQ_LM`` prefix-tuning tasks of 4-32 virtual tokens, the
baselines' workload (the prompt is the encoder's source), interleaved and repeated.

engine-mixed      the engine, tasks round-robin
engine-one-task   the same requests all on one task of the mixed tasks' mean length
peft-serial       PEFT one request at a time
peft-grouped      PEFT one batch per task, tasks one after another

PEFT's ``generate`` ignores prefix-tuning adapters on encoder-decoders (transformers 5), so its baseline
is PEFT's forward, greedy, the way the engine's tests check their tokens: the batch's sources encoded
once, then each step the decoder over every token so far with PEFT's prefix (its forward takes no cache
of its own beside the prefix).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSeq2SeqLM, PreTrainedModel, T5Config

from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.source import load_prefix_source
from server.benchmark.baselines import Log, mix_lengths
from server.benchmark.loops import EngineSystem, Event, closed_loop
from server.benchmark.peft_baseline import BatchAtATime
from server.benchmark.settings import BenchSettings
from server.benchmark.timeline import Timeline, summarize
from server.benchmark.workload import engine_requests, sample_shapes
from server.demo_model import build_demo_tokenizer
from server.engine.base_model import load_base_model
from server.engine.request import GenerationRequest
from testing.peft_reference import make_peft_adapter


def build_t5(folder: Path, settings: BenchSettings) -> Path:
    """A random T5 with the demo tokenizer: 4 + 4 layers of 256 (2 + 2 of 128 for the ``tiny`` geometry).
    Smaller than the ``small`` Llama: PEFT's baseline recomputes the decoder at every step, and one
    request at a time it would take most of the run."""
    tokenizer = build_demo_tokenizer()
    tiny = settings.geometry == "tiny"
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=128 if tiny else 256,
        d_kv=32,
        d_ff=344 if tiny else 688,
        num_layers=2 if tiny else 4,
        num_heads=4 if tiny else 8,
        pad_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class PeftSeq2SeqSystem(BatchAtATime):
    """An encoder-decoder with PEFT's forward, greedy (its ``generate`` ignores the prefix)."""

    def __init__(self, peft_models: dict[str, Any], *, grouped: bool) -> None:
        super().__init__(grouped=grouped)
        self.peft_models = peft_models

    @torch.inference_mode()
    def _run_batch(self, group: list[GenerationRequest]) -> list[Event]:
        peft_model = self.peft_models[group[0].task_id]
        device = next(peft_model.parameters()).device
        longest = max(len(r.prompt_ids) for r in group)
        source = torch.zeros(len(group), longest, dtype=torch.long, device=device)  # [B, S], right-padded
        mask = torch.zeros_like(source)
        for i, r in enumerate(group):
            source[i, : len(r.prompt_ids)] = torch.tensor(list(r.prompt_ids))
            mask[i, : len(r.prompt_ids)] = 1
        encoded = peft_model.get_encoder()(input_ids=source, attention_mask=mask)
        start = peft_model.config.decoder_start_token_id
        decoded = torch.full((len(group), 1), start, dtype=torch.long, device=device)  # [B, T]
        for _ in range(max(r.max_new_tokens for r in group)):
            logits = peft_model(  # input_ids only tell PEFT the batch size: the encoder is not run again
                input_ids=source, attention_mask=mask, encoder_outputs=encoded, decoder_input_ids=decoded
            ).logits  # [B, T, V]
            decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return [(r.request_id, r.max_new_tokens, True) for r in group]


def _peft_tasks(folder: Path, workdir: Path, lengths: list[int]) -> tuple[dict[str, Any], dict[str, Path]]:
    """One PEFT model per task over one copy of the base model, and each task's saved adapter."""
    from peft import PeftModel  # a benchmark extra, not a serving dependency

    base: PreTrainedModel = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    adapters = {
        f"task{i}": make_peft_adapter(base, workdir / f"t5-task{i}", num_virtual_tokens=length, seed=100 + i)
        for i, length in enumerate(lengths)
    }
    models = {task: PeftModel.from_pretrained(base, path).eval() for task, path in adapters.items()}
    return models, adapters


def encoder_decoder(settings: BenchSettings, workdir: Path, log: Log) -> dict[str, Any]:
    """Each system's ``summarize`` over ``settings.repeats`` interleaved runs."""
    folder = build_t5(workdir / "t5", settings)
    base = load_base_model(folder, device=settings.device, dtype=settings.dtype)
    lengths = mix_lengths(settings.tasks)
    peft_models, adapters = _peft_tasks(folder, workdir, lengths)
    limits = PrefixLimits()
    prefixes = {task: load_prefix_source(path, base.geometry, limits)[0] for task, path in adapters.items()}
    vocab = base.model.config.vocab_size
    mixed = engine_requests(sample_shapes(settings.workload, sorted(prefixes)), prefixes, vocab_size=vocab)
    mean_task = min(prefixes, key=lambda t: abs(prefixes[t].num_virtual_tokens - statistics.mean(lengths)))
    one_task = [replace(r, prefix=prefixes[mean_task], task_id=mean_task) for r in mixed]
    concurrency = settings.concurrency

    def engine() -> EngineSystem:
        return EngineSystem(base, max_batch_size=concurrency)

    closed_loop(engine(), mixed[:concurrency], concurrency)  # warm-up
    systems = {
        "engine-mixed": lambda: closed_loop(engine(), mixed, concurrency),
        "engine-one-task": lambda: closed_loop(engine(), one_task, concurrency),
        "peft-serial": lambda: closed_loop(PeftSeq2SeqSystem(peft_models, grouped=False), mixed, concurrency),
        "peft-grouped": lambda: closed_loop(PeftSeq2SeqSystem(peft_models, grouped=True), mixed, concurrency),
    }
    repeated: dict[str, list[Timeline]] = defaultdict(list)
    for repeat in range(settings.repeats):
        for name, run in systems.items():
            repeated[name].append(run())
            log(
                f"encoder-decoder {repeat + 1}/{settings.repeats}: {name} "
                f"{repeated[name][-1].tokens_per_s:.1f} tok/s"
            )
    return {
        "model": f"random T5, {base.geometry.num_layers} decoder layers, {len(prefixes)} PEFT tasks",
        "systems": {name: summarize(timelines) for name, timelines in repeated.items()},
    }
