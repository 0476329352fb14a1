"""A training command run in a child process, measured: wall time and the child's own peak memory."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measured:
    seconds: float  # wall time of the whole command (model load, training, export)
    peak_rss_bytes: int  # the child's maximum resident set size (its own, from wait4)


def run_measured(command: list[str], log_path: Path, *, env: dict[str, str] | None = None) -> Measured:
    """Run ``command`` with its output in ``log_path``; raises ``RuntimeError`` with the log's tail if it
    fails. ``wait4`` reports this child's peak RSS alone (``RUSAGE_CHILDREN`` would mix all children)."""
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command[:4])}… failed ({process.returncode}):\n{tail}")
    return Measured(seconds=seconds, peak_rss_bytes=usage.ru_maxrss * 1024)  # ru_maxrss is KiB on Linux
