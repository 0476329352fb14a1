"""A lint that fails on unsafe deserialisation or eval anywhere in the project's own sources."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("server", "prefix_store", "clients", "bench", "examples")
UNSAFE = re.compile(
    r"(?<!safetensors\.)torch\.load\(|pickle\.loads?\(|(?<![.\w])eval\(|(?<![.\w])exec\(|yaml\.load\("
)


def test_no_unsafe_deserialisation_or_eval_in_sources() -> None:
    files = [path for folder in SOURCE_DIRS for path in (ROOT / folder).rglob("*.py")]
    assert len(files) > 20
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if UNSAFE.search(line)
    ]
    assert hits == []
