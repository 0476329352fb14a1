"""Schemathesis against a live server's OpenAPI: every operation, schema-valid (positive) and
schema-violating (negative) data, sent with an admin key, a user key and no key.

    python -m bench.hardening.fuzz_api --examples 200 --out bench/results/fuzz_api.json

Every response is checked; a run passes with zero 5xx and zero check failures. Checks run:

- ``not_a_server_error``: no 5xx, whatever is sent;
- ``status_code_conformance``: every status is declared in the OpenAPI (errors included);
- ``content_type_conformance``, ``response_headers_conformance``: as declared;
- ``response_schema_conformance``: bodies (error bodies included) match their declared schema;
- ``negative_data_rejection``: schema-violating data gets a 4xx (so the schema's bounds are enforced).

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
from schemathesis import APIOperation
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
MODES = {"positive": schemathesis.GenerationMode.POSITIVE, "negative": schemathesis.GenerationMode.NEGATIVE}
_REQUEST_TIMEOUT_S = 60.0


@dataclass
class FuzzReport:
    """What a fuzz run sent and what came back."""

    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: dict[str, Counter[str]] = field(default_factory=dict)  # "key/mode status" -> count
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
            "seconds": round(self.seconds, 1),
        }


def fuzz(
    base_url: str,
    keys: Mapping[str, str | None],
    *,
    examples: int,
    seed: int = 0,
    modes: Mapping[str, schemathesis.GenerationMode] = MODES,
    on_case: Callable[[], None] | None = None,
) -> FuzzReport:
    """Run ``examples`` generated cases per (operation, key, mode). ``keys`` maps a name ("admin", "user",
    "none") to an API key or None. Failures are collected, not raised, so one run reports them all."""
    started = time.perf_counter()
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    report = FuzzReport()
    seen: set[tuple[str, str, str]] = set()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            report.operations.append(operation.label)
            for key_name, key in keys.items():
                for mode_name, mode in modes.items():
                    run = _one_case(base_url, session, report, seen, operation, key_name, key, mode_name)
                    run = hypothesis.given(operation.as_strategy(generation_mode=mode))(run)
                    run = hypothesis.settings(
                        max_examples=examples,
                        deadline=None,
                        database=None,
                        phases=[Phase.explicit, Phase.generate],  # collected, not raised: no shrinking
                        suppress_health_check=list(HealthCheck),
                        print_blob=False,
                    )(run)
                    # Unsatisfiable: nothing to negate in an operation without parameters or body
                    with contextlib.suppress(hypothesis.errors.Unsatisfiable):
                        hypothesis.seed(seed)(run)()
                    if on_case is not None:
                        on_case()
    report.seconds = time.perf_counter() - started
    return report


def _one_case(
    base_url: str,
    session: requests.Session,
    report: FuzzReport,
    seen: set[tuple[str, str, str]],
    operation: APIOperation,
    key_name: str,
    key: str | None,
    mode_name: str,
) -> Callable[[schemathesis.Case], None]:
    """Send one generated case with ``key`` and check its response into ``report``."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    checks = [*CHECKS, negative_data_rejection] if mode_name == "negative" else CHECKS

    def one(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=_REQUEST_TIMEOUT_S)
        report.cases += 1
        report.statuses[response.status_code] += 1
        report.by_operation.setdefault(operation.label, Counter())[f"{key_name}/{mode_name} {response.status_code}"] += 1
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except FailureGroup as group:
            _record(report, seen, operation.label, key_name, mode_name, group.exceptions)
        except Failure as failure:
            _record(report, seen, operation.label, key_name, mode_name, [failure])

    return one


def _record(
    report: FuzzReport,
    seen: set[tuple[str, str, str]],
    operation: str,
    key: str,
    mode: str,
    failures: tuple[Failure, ...] | list[Failure],
) -> None:
    for failure in failures:
        identity = (operation, mode, failure.title)
        if identity in seen:
            continue
        seen.add(identity)
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
    from bench.hardening.common import fuzz_server, write_result

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=200, help="cases per operation, key and mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fuzz_api.json"))
    args = parser.parse_args()
    with fuzz_server() as (server, keys):
        report = fuzz(server.url, keys, examples=args.examples, seed=args.seed)
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
