"""Hostile uploads over real HTTP: the catalogue of ``hostile.py`` and its hypothesis strategies, each
sent as a replacement of a task that serves (and as a new task), with every invariant checked.

    python -m hardening.hostile_uploads --examples 300 --out hardening/results/hostile_uploads.json

A run passes when every upload gets a right 4xx with docs/API.md's error body (no path, no stack trace),
the store's directory tree is byte-for-byte unchanged, the task still serves its previous version
with the same output, no canary file appears, and the server's RSS grows by less than the tolerance.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st

from hardening.common import hardening_server, write_result
from hardening.hostile import (
    HostileUpload,
    bad_lora_configs,
    bad_peft_configs,
    canary_catalogue,
    corrupted_headers,
    damaged_bytes,
    lora_catalogue,
    multipart_catalogue,
    native_catalogue,
    non_finite,
    peft_catalogue,
)
from hardening.prefixes import lora_files, model_geometry, native_prefix, peft_files, upload
from prefix_store.formats.peft import ADAPTER_CONFIG_NAME, ADAPTER_MODEL_NAME
from prefix_store.geometry import ModelGeometry
from testing.server_process import ServerProcess

VICTIM, NEWCOMER = "victim", "newcomer"  # a task that serves; a name that must never come to exist
PROMPT = {"task_id": VICTIM, "prompt": "The hostile upload", "max_new_tokens": 4}
RSS_TOLERANCE_BYTES = 48 * 1024 * 1024


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` with its size and SHA-256: any write shows."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def send(client: httpx.Client, task_id: str, upload: HostileUpload) -> httpx.Response:
    url = f"/v1/admin/prefixes/{task_id}"
    if upload.files is not None:
        return client.put(url, files=upload.files)
    content = upload.content() if callable(upload.content) else upload.content
    return client.put(url, content=content, headers=upload.headers)


def problem(response: httpx.Response, upload: HostileUpload, secrets: Iterable[str]) -> str | None:
    """What is wrong with the answer to a hostile upload, or None."""
    if response.status_code not in upload.statuses:
        return f"status {response.status_code}, expected {sorted(upload.statuses)}: {response.text[:300]}"
    try:
        body = response.json()
    except ValueError:
        return f"the body is not JSON: {response.text[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if set(body) != {"error"} or not isinstance(error, dict) or set(error) != {"type", "message"}:
        return f"not docs/API.md's error body: {body}"
    if not all(isinstance(error[k], str) and error[k] for k in ("type", "message")):
        return f"empty or non-string error fields: {body}"
    leaked = [s for s in ("Traceback", 'File "', *secrets) if s in response.text]
    return f"the error leaks {leaked}: {error['message'][:200]}" if leaked else None


@dataclass
class HostileReport:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    problems: list[dict[str, str]] = field(default_factory=list)
    by_family: Counter[str] = field(default_factory=Counter)
    store_unchanged: bool = True
    previous_version_serving: bool = True
    canary_created: bool = False
    rss_before: int = 0
    rss_after: int = 0
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return (
            not self.problems
            and self.store_unchanged
            and self.previous_version_serving
            and not self.canary_created
            and self.rss_after - self.rss_before < RSS_TOLERANCE_BYTES
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "uploads": self.sent,
            "refused": sum(n for status, n in self.statuses.items() if 400 <= status < 500),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "by_family": dict(self.by_family),
            "problems": self.problems,
            "store_unchanged": self.store_unchanged,
            "previous_version_serving": self.previous_version_serving,
            "canary_created": self.canary_created,
            "rss_before_mib": round(self.rss_before / 2**20, 1),
            "rss_after_mib": round(self.rss_after / 2**20, 1),
            "rss_growth_mib": round((self.rss_after - self.rss_before) / 2**20, 1),
            "seconds": round(self.seconds, 1),
            "passed": self.passed,
        }


class HostileRun:
    """Sends hostile uploads to one server and checks the invariants around them."""

    def __init__(self, server: ServerProcess, client: httpx.Client, store_root: Path, canary: Path) -> None:
        self.server, self.client, self.store_root, self.canary = server, client, store_root, canary
        self.report = HostileReport()
        key = client.headers.get("authorization", "").removeprefix("Bearer ")
        self.secrets = [str(store_root), str(canary.parent), *([key] if key else [])]  # never in an error

    def __enter__(self) -> HostileRun:
        assert upload(self.client, VICTIM, native_prefix(model_geometry(self.server.model_dir))).is_success
        self.victim = self.client.get(f"/v1/admin/prefixes/{VICTIM}").json()
        self.output = self.client.post("/v1/generate", json=PROMPT).json()
        self.before = tree(self.store_root)
        self.report.rss_before = self.server.rss_bytes()
        self.started = time.perf_counter()
        return self

    def send(self, upload: HostileUpload, family: str, task_id: str = VICTIM) -> str | None:
        """Send one upload; record and return what is wrong with the answer, or None."""
        self.report.sent += 1
        self.report.by_family[family] += 1
        try:
            response = send(self.client, task_id, upload)
        except httpx.TransportError as exc:
            found = f"no response: {type(exc).__name__}: {exc}"
            self.report.problems.append(
                {"family": family, "upload": upload.name, "task": task_id, "problem": found}
            )
            return found
        self.report.statuses[response.status_code] += 1
        found = problem(response, upload, self.secrets)
        if found is not None:
            self.report.problems.append(
                {"family": family, "upload": upload.name, "task": task_id, "problem": found}
            )
        return found

    def __exit__(self, *exc: object) -> None:
        report = self.report
        report.seconds = time.perf_counter() - self.started
        report.rss_after = self.server.rss_bytes()
        report.store_unchanged = tree(self.store_root) == self.before
        now = self.client.get(f"/v1/admin/prefixes/{VICTIM}").json()
        again = self.client.post("/v1/generate", json=PROMPT).json()
        report.previous_version_serving = (
            now["version"] == self.victim["version"]
            and again["prefix_version"] == self.victim["version"]
            and again["token_ids"] == self.output["token_ids"]
            and self.client.get(f"/v1/admin/prefixes/{NEWCOMER}").status_code == 404
        )
        report.canary_created = self.canary.exists()


def catalogue(
    geometry: ModelGeometry, canary: Path, *, max_virtual_tokens: int, cap_bytes: int
) -> dict[str, list[HostileUpload]]:
    """Every named hostile upload, by family."""
    return {
        "native": native_catalogue(geometry, max_virtual_tokens=max_virtual_tokens),
        "peft": peft_catalogue(geometry, max_virtual_tokens=max_virtual_tokens),
        "lora": lora_catalogue(geometry),
        "multipart": multipart_catalogue(geometry, cap_bytes=cap_bytes),
        "pickle": canary_catalogue(canary),
    }


def strategies(geometry: ModelGeometry) -> dict[str, st.SearchStrategy[HostileUpload]]:
    """Hypothesis strategies of hostile uploads, by family."""
    config = peft_files(geometry)[ADAPTER_CONFIG_NAME]
    model = peft_files(geometry)[ADAPTER_MODEL_NAME]
    lora_model = lora_files(geometry)[ADAPTER_MODEL_NAME]

    def as_file(name: str) -> Callable[[bytes], HostileUpload]:
        return lambda blob: HostileUpload(
            name, files={"file": ("p.safetensors", blob)}, statuses=frozenset({400, 413})
        )

    def as_peft_model(blob: bytes) -> HostileUpload:
        files = {"adapter_config": (ADAPTER_CONFIG_NAME, config), "adapter_model": (ADAPTER_MODEL_NAME, blob)}
        return HostileUpload("adapter_model damaged", files=files, statuses=frozenset({400, 413}))

    def as_peft_config(blob: bytes) -> HostileUpload:
        files = {"adapter_config": (ADAPTER_CONFIG_NAME, blob), "adapter_model": (ADAPTER_MODEL_NAME, model)}
        return HostileUpload("adapter_config wrong", files=files, statuses=frozenset({400, 413}))

    def as_lora_config(blob: bytes) -> HostileUpload:
        files = {
            "adapter_config": (ADAPTER_CONFIG_NAME, blob),
            "adapter_model": (ADAPTER_MODEL_NAME, lora_model),
        }
        return HostileUpload("LoRA adapter_config wrong", files=files, statuses=frozenset({400, 413}))

    return {
        "corrupted header": corrupted_headers(geometry).map(as_file("corrupted header")),
        "damaged bytes": damaged_bytes(geometry).map(as_file("damaged bytes")),
        "non-finite values": non_finite(geometry).map(as_file("non-finite values")),
        "damaged adapter_model": damaged_bytes(geometry).map(as_peft_model),
        "wrong adapter_config": bad_peft_configs(geometry).map(as_peft_config),
        "wrong LoRA adapter_config": bad_lora_configs(geometry).map(as_lora_config),
    }


def fuzz_uploads(run: HostileRun, geometry: ModelGeometry, *, examples: int, seed: int) -> None:
    """``examples`` uploads from each strategy; every problem is recorded (no shrinking)."""
    for family, strategy in strategies(geometry).items():
        settings = hypothesis.settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        hypothesis.seed(seed)(settings(hypothesis.given(strategy)(_sender(run, family))))()


def _sender(run: HostileRun, family: str) -> Callable[[HostileUpload], None]:
    def send_one(upload: HostileUpload) -> None:
        run.send(upload, family)

    return send_one


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=300, help="uploads per hypothesis strategy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("hardening/results/hostile_uploads.json"))
    args = parser.parse_args()
    with (
        hardening_server() as (server, keys, store),
        httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {keys['admin']}"}, timeout=60
        ) as client,
    ):
        geometry = model_geometry(server.model_dir)
        canary = store.parent / "canary"
        cap = int(server.env["PREFIX_SERVE_MAX_UPLOAD_BYTES"]) + 256 * 1024
        with HostileRun(server, client, store, canary) as run:
            named = catalogue(
                geometry,
                canary,
                max_virtual_tokens=int(server.env["PREFIX_SERVE_MAX_VIRTUAL_TOKENS"]),
                cap_bytes=cap,
            )
            for family, uploads in named.items():
                for hostile in uploads:
                    run.send(hostile, family)
                    run.send(hostile, family, NEWCOMER)
            fuzz_uploads(run, geometry, examples=args.examples, seed=args.seed)
    report = run.report
    print(
        f"{report.sent} hostile uploads in {report.seconds:.0f} s: "
        f"{report.to_json()['refused']} refused with a 4xx, {len(report.problems)} problems; store unchanged: "
        f"{report.store_unchanged}; previous version serving: {report.previous_version_serving}; canary created: "
        f"{report.canary_created}; RSS {report.rss_before / 2**20:.0f} -> {report.rss_after / 2**20:.0f} MiB"
    )
    for found in report.problems[:20]:
        print(f"  [{found['family']}] {found['upload']}: {found['problem']}")
    write_result(args.out, report.to_json() | {"examples_per_strategy": args.examples, "seed": args.seed})
    raise SystemExit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
