"""The running batch: rows join, leave and outgrow the buffers without any row noticing."""

from __future__ import annotations

import torch

from server.engine.base_model import BaseModel
from server.engine.generation import generate
from server.engine.prefill_batch import BatchRow, PrefillBatch
from server.engine.runner import ModelRunner
from server.engine.running_batch import RunningBatch
from tests.server.engine.helpers import random_prefix, request

LONG_PROMPT = "Summarize the following text in one sentence: " + "the weather today is sunny. " * 6


def test_rows_joining_leaving_and_growing_the_buffers_match_solo_runs(base: BaseModel) -> None:
    specs = [  # (prompt, prefix length, steps)
        ("hello world", 3, 70),  # long-lived: forces the column buffers to grow past 64
        ("a", 0, 5),
        (LONG_PROMPT, 17, 12),  # joins later with more slots than the window has: room on the left
        ("Translate the sentence into French.", 1, 30),
    ]
    requests = [
        request(base, f"r{i}", prompt, random_prefix(base, p, seed=i) if p else None, max_new_tokens=steps)
        for i, (prompt, p, steps) in enumerate(specs)
    ]
    solo = {r.request_id: generate(base, [r])[0].token_ids for r in requests}
    runner = ModelRunner(base)
    batch: RunningBatch[str] = RunningBatch(base.geometry, capacity=3, device=base.device, dtype=base.dtype)
    produced: dict[str, list[int]] = {r.request_id: [] for r in requests}
    arrivals = {0: [0, 1], 3: [2], 8: [3]}
    step, widest = 0, 0
    while step == 0 or len(batch):
        if len(batch):
            batch.prepare_step()
            tokens = runner.forward(batch).argmax(-1)
            batch.advance(tokens)
            for request_id, token in zip(batch.rows, tokens.tolist(), strict=True):
                produced[request_id].append(token)
        for i in arrivals.get(step, []):
            r = requests[i]
            prefill = PrefillBatch.from_rows(
                [BatchRow(r.request_id, r.prompt_ids, r.prefix)], base.geometry, base.device, base.dtype
            )
            tokens = runner.forward(prefill).argmax(-1)
            prefill.advance(tokens)
            batch.add(prefill, [r.request_id], tokens)
            produced[r.request_id].append(int(tokens[0]))
        done = [i for i, rid in enumerate(batch.rows) if len(produced[rid]) >= len(solo[rid])]
        batch.remove(done)
        window = batch.window
        if len(batch):
            assert batch.valid[: len(batch), window.start].any()  # no leading column that no row uses
        assert not batch.valid[len(batch) :].any()  # freed rows hold nothing
        widest = max(widest, batch.columns)
        step += 1
    assert widest > 64
    assert produced == solo
    assert (batch.row_capacity, batch.columns) == (1, 64)  # an empty batch gives its memory back


def test_mask_sees_each_rows_slots_and_its_own_new_token(llama_base: BaseModel) -> None:
    base = llama_base
    rows = [BatchRow("a", [5, 6, 7], random_prefix(base, 2, seed=0)), BatchRow("b", [5], None)]
    prefill = PrefillBatch.from_rows(rows, base.geometry, base.device, base.dtype)
    tokens = ModelRunner(base).forward(prefill).argmax(-1)
    prefill.advance(tokens)
    batch: RunningBatch[str] = RunningBatch(base.geometry, capacity=4, device=base.device, dtype=base.dtype)
    batch.add(prefill, ["a", "b"], tokens)
    assert batch.input_positions.tolist() == [[5], [1]]
    allowed = (batch.attention_mask(torch.float32)[:, 0, 0] == 0).tolist()
    assert allowed == [[True] * 5 + [True], [False] * 4 + [True] + [True]]


def test_the_buffers_hold_the_rows_in_use_not_the_capacity(llama_base: BaseModel) -> None:
    """One long row allocates one row of its length, not ``capacity`` rows; rows that leave give their
    memory back."""
    base, runner = llama_base, ModelRunner(llama_base)
    batch: RunningBatch[str] = RunningBatch(base.geometry, capacity=8, device=base.device, dtype=base.dtype)

    def join(request_id: str, prompt: str) -> None:
        r = request(base, request_id, prompt)
        prefill = PrefillBatch.from_rows(
            [BatchRow(r.request_id, r.prompt_ids, None)], base.geometry, base.device, base.dtype
        )
        tokens = runner.forward(prefill).argmax(-1)
        prefill.advance(tokens)
        batch.add(prefill, [r.request_id], tokens)

    join("long", LONG_PROMPT)
    assert batch.row_capacity == 1 and batch.keys[0].shape[0] == 1
    for i in range(7):
        join(f"short{i}", "hi")
    assert batch.row_capacity == 8
    batch.remove(list(range(1, 8)))
    assert batch.rows == ["long"] and batch.row_capacity == 2
    assert not batch.valid[1:].any()
