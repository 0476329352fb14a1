"""Schemathesis against a live server's OpenAPI: every operation, schema-valid (positive) and
schema-violating (negative) data, sent with an admin key, a user key and no key.

    python -m hardening.fuzz_api --examples 200 --out hardening/results/fuzz_api.json

Every response is checked; a run passes with zero 5xx and zero check failures. Checks run:

- ``not_a_server_error``: no 5xx, whatever is sent;
- ``status_code_conformance``: every status is declared in the OpenAPI (errors included);
- ``content_type_conformance``, ``response_headers_conformance``: as declared;
- ``response_schema_conformance``: bodies (error bodies included) match their declared schema;
- ``negative_data_rejection``: schema-violating data gets a 4xx (so the schema's bounds are enforced).

Half of the positive cases are steered: names in them are replaced by ones that exist (the base
model's id, a task whose prefix is re-uploaded before each batch, that prefix's file for uploads) and
OpenAI fields the server refuses unless neutral are left out, so that they reach the engine, the
registry and the store instead of stopping at "unknown task".

Deliberately not run: ``positive_data_acceptance``, since a schema-valid request may still be refused
for what JSON Schema cannot say: a multipart upload whose bytes are not a valid prefix (400), a prompt
past the configured token limit (413), ``max_new_tokens`` past the configured limit (422), a full queue
or a tenant's rate (429); each of those refusals is itself checked against the declared responses.
The stateful checks (``use_after_free``, ``ensure_resource_availability``…) need schemathesis' stateful
runner and links between operations; upload-then-delete is covered by the end-to-end tests instead.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from hardening.common import hardening_server, write_result
from hardening.prefixes import model_geometry, native_prefix
from testing.server_process import ServerProcess

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Negative data must be refused with a 4xx. 413 is added to schemathesis' list: a string past its
# maxLength can make the body itself larger than the server's body cap, which then refuses it first.
CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": ["400", "401", "403", "404", "405", "409", "413", "415", "422", "429"]
            }
        }
    }
)
MODES = {"positive": schemathesis.GenerationMode.POSITIVE, "negative": schemathesis.GenerationMode.NEGATIVE}
_REQUEST_TIMEOUT_S = 60.0


@dataclass
class FuzzReport:
    """What a fuzz run sent and what came back."""

    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: dict[str, Counter[str]] = field(default_factory=dict)  # "key/mode status" -> count
    samples: dict[str, str] = field(default_factory=dict)  # "operation key/mode status" -> a body
    failures: list[dict[str, str]] = field(default_factory=list)  # one per distinct (operation, check)
    operations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "server_errors": self.server_errors,
            "check_failures": len(self.failures),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "operations": {op: dict(sorted(c.items())) for op, c in self.by_operation.items()},
            "failures": self.failures,
            "samples": self.samples,
            "seconds": round(self.seconds, 1),
        }


@dataclass(frozen=True)
class Known:
    """Values that exist on the server, swapped into half of the positive cases so that they get past
    "unknown task" and reach the engine, the store and the registry: the base model's id, a task id
    whose prefix is (re-)uploaded before each batch of cases, and that prefix's file."""

    model_id: str
    task_id: str
    prefix: bytes


def known_values(server: ServerProcess, admin_key: str | None) -> Known:
    """The base model's id (from ``GET /v1/models``) and a valid prefix for ``server``'s model."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    models = requests.get(f"{server.url}/v1/models", headers=headers, timeout=30).json()
    return Known(models["data"][0]["id"], "fuzz-known", native_prefix(model_geometry(server.model_dir)))


def fuzz(
    base_url: str,
    keys: Mapping[str, str | None],
    *,
    examples: int,
    known: Known,
    seed: int = 0,
    modes: Mapping[str, schemathesis.GenerationMode] = MODES,
) -> FuzzReport:
    """Run ``examples`` generated cases per (operation, key, mode). ``keys`` maps a name ("admin", "user",
    "none") to an API key or None; ``keys["admin"]`` must be an admin key. Failures are collected, not
    raised, so that one run reports them all."""
    started = time.perf_counter()
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=CONFIG)
    report = FuzzReport()
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            report.operations.append(operation.label)
            for key_name, key in keys.items():
                for mode_name, mode in modes.items():
                    session.put(
                        f"{base_url}/v1/admin/prefixes/{known.task_id}",
                        files={"file": ("p.safetensors", known.prefix)},
                        headers=admin,
                    ).raise_for_status()
                    strategy = operation.as_strategy(generation_mode=mode)
                    if mode_name == "positive":
                        strategy = st.tuples(strategy, st.booleans()).map(lambda pair: _steer(*pair, known))
                    check = _checker(base_url, session, report, operation.label, key_name, key, mode_name)
                    run = hypothesis.settings(
                        max_examples=examples,
                        deadline=None,
                        database=None,
                        phases=[Phase.explicit, Phase.generate],  # collected, not raised: no shrinking
                        suppress_health_check=list(HealthCheck),
                        print_blob=False,
                    )(hypothesis.given(strategy)(check))
                    # Unsatisfiable: nothing to negate in an operation without parameters or body
                    with contextlib.suppress(hypothesis.errors.Unsatisfiable):
                        hypothesis.seed(seed)(run)()
    report.seconds = time.perf_counter() - started
    return report


def _steer(case: schemathesis.Case, steer: bool, known: Known) -> schemathesis.Case:
    """``case`` with the names it holds replaced by ones that exist (when ``steer``); still valid."""
    if not steer:
        return case
    for name in ("task_id", "model"):
        if case.path_parameters and name in case.path_parameters:
            case.path_parameters[name] = known.task_id
    if case.headers:  # a random If-Match precondition fails (412) before anything happens
        case.headers = {k: v for k, v in case.headers.items() if k.lower() != "if-match"}
    if isinstance(case.body, dict):
        case.body = _without_refused(case.body)
        if "task_id" in case.body:
            case.body["task_id"] = known.task_id
        if "model" in case.body:
            case.body["model"] = known.model_id
        if "file" in case.body or "adapter_model" in case.body:
            case.body = {"file": known.prefix}
    return case


# OpenAI fields the server refuses (422, named) unless neutral: steered cases leave them out
_REFUSED = frozenset(
    [
        "n",
        "best_of",
        "echo",
        "suffix",
        "logprobs",
        "top_logprobs",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "response_format",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "tool_calls",
        "audio",
        "modalities",
        "prediction",
        "web_search_options",
        "moderation",
        "reasoning_effort",
        "verbosity",
    ]
)


def _without_refused(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_refused(v) for k, v in value.items() if k not in _REFUSED}
    if isinstance(value, list):
        return [_without_refused(item) for item in value]
    return value


def _checker(
    base_url: str,
    session: requests.Session,
    report: FuzzReport,
    operation: str,
    key_name: str,
    key: str | None,
    mode_name: str,
) -> Callable[[schemathesis.Case], None]:
    """A test body: send one generated case with ``key`` and check its response into ``report``."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    checks = [*CHECKS, negative_data_rejection] if mode_name == "negative" else CHECKS

    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=_REQUEST_TIMEOUT_S)
        report.cases += 1
        report.statuses[response.status_code] += 1
        outcome = f"{key_name}/{mode_name} {response.status_code}"
        report.by_operation.setdefault(operation, Counter())[outcome] += 1
        report.samples.setdefault(f"{operation} {outcome}", response.content[:200].decode("utf-8", "replace"))
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except FailureGroup as group:
            _record(report, operation, key_name, mode_name, group.exceptions)
        except Failure as failure:
            _record(report, operation, key_name, mode_name, [failure])

    return check


def _record(
    report: FuzzReport, operation: str, key: str, mode: str, failures: tuple[Failure, ...] | list[Failure]
) -> None:
    """Keep one failure per (operation, mode, check, message)."""
    for failure in failures:
        if any(
            (f["operation"], f["mode"], f["check"], f["message"])
            == (operation, mode, failure.title, failure.message)
            for f in report.failures
        ):
            continue
        report.failures.append(
            {
                "operation": operation,
                "key": key,
                "mode": mode,
                "check": failure.title,
                "message": failure.message,
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=200, help="cases per operation, key and mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("hardening/results/fuzz_api.json"))
    args = parser.parse_args()
    with hardening_server() as (server, keys, _):
        known = known_values(server, keys["admin"])
        report = fuzz(server.url, keys, examples=args.examples, known=known, seed=args.seed)
        result = report.to_json() | {"examples_per_operation": args.examples, "seed": args.seed}
    print(
        f"fuzzed {report.cases} cases over {len(report.operations)} operations × {len(keys)} keys × 2 modes "
        f"in {report.seconds:.0f} s: {report.server_errors} 5xx, {len(report.failures)} check failures"
    )
    for failure in report.failures:
        print(f"  {failure['operation']} [{failure['key']}, {failure['mode']}] {failure['check']}")
    write_result(args.out, result)
    raise SystemExit(1 if report.server_errors or report.failures else 0)


if __name__ == "__main__":
    main()
