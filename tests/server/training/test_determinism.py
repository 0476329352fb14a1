"""Seeded runs are bit-identical, even side by side on a busy machine whose OpenMP may shrink its threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from server.training.determinism import omp_dynamic, pinned_threads
from tests.server.training.helpers import fixed_answer_data

# Numbers that depend on the thread count: with 8 threads torch splits this run's large reductions
# differently from 1-4 threads, so a run whose OpenMP gives it fewer threads ends with other bits.
THREAD_SENSITIVE = [
    *("--num-virtual-tokens", "64", "--prefix-projection", "--batch-size", "32", "--epochs", "3"),
    *("--threads", "8"),
]


def test_pinned_threads_fixes_the_count_and_restores_torchs_settings() -> None:
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    with pinned_threads(3) as threads:
        assert threads == torch.get_num_threads() == 3
        assert torch.are_deterministic_algorithms_enabled()
        assert omp_dynamic() in (False, None)  # None: no OpenMP runtime in this build
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
    with pinned_threads() as threads:  # no count given: the one torch already uses
        assert threads == before[0]


@pytest.mark.e2e
def test_two_seeded_runs_side_by_side_are_bit_identical(demo_model_dir: Path, tmp_path: Path) -> None:
    """Two processes train at once with the same seed, each loading the CPU the other runs on; the first
    lets OpenMP size its thread teams by the load average (OMP_DYNAMIC), as a machine set up so would."""
    data = fixed_answer_data(tmp_path / "data.jsonl")
    # PASSIVE: idle OpenMP threads sleep instead of spinning, so 2 x 8 threads on a small, busy machine
    # (CI's) do not starve each other for minutes; it changes no thread count, hence no bits
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "MKL_DYNAMIC": "TRUE", "OMP_WAIT_POLICY": "PASSIVE"}
    runs = []
    for name, extra in (("a", {"OMP_DYNAMIC": "TRUE"}), ("b", {})):
        command = [sys.executable, "-m", "server.cli", "train", "--model", str(demo_model_dir)]
        command += ["--data", str(data), "--eval-data", str(data), "--out", str(tmp_path / name)]
        command += ["--seed", "0", "--no-progress", *THREAD_SENSITIVE]
        runs.append(
            subprocess.Popen(
                command,
                env={**environment, **extra},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = _outputs_within(runs, seconds=180)  # under pytest's own timeout: a clear failure, not a signal
    assert [run.returncode for run in runs] == [0, 0], outputs
    native = [(tmp_path / name / "prefix.safetensors").read_bytes() for name in ("a", "b")]
    assert native[0] == native[1]
    summaries = [json.loads((tmp_path / name / "training.json").read_text()) for name in ("a", "b")]
    losses = [[(r["train_loss"], r["eval_loss"]) for r in s["history"]] for s in summaries]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert summaries[0]["threads"] == summaries[1]["threads"] == 8


def _outputs_within(runs: list[subprocess.Popen], seconds: float) -> list[str]:
    """Each run's output once all have exited; fails (both killed, outputs shown) past ``seconds`` in all."""
    deadline = time.monotonic() + seconds
    outputs = []
    try:
        for run in runs:
            outputs.append(run.communicate(timeout=max(deadline - time.monotonic(), 0.1))[0])
    except subprocess.TimeoutExpired:
        for run in runs:
            run.kill()
        pytest.fail(f"the runs took over {seconds} s: {[run.communicate()[0][-2000:] for run in runs]}")
    return outputs
