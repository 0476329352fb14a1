"""Run a list of requests through an engine core to completion: the simplest way to use the engine
(tests, benchmarks, scripts). All requests join at the first step, so this is a static batch."""

from __future__ import annotations

from collections.abc import Sequence

from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.request import GenerationRequest, GenerationResult, RequestOutput, token_cost
from server.engine.scheduler import SchedulerConfig


def generate(base: BaseModel, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Generate for all ``requests`` together; results come back in request order."""
    budget = sum(token_cost(r, r.prefix.num_virtual_tokens if r.prefix else 0) for r in requests)
    config = SchedulerConfig(max_batch_size=len(requests), max_batch_tokens=budget, max_waiting=len(requests))
    core = EngineCore(base, config)
    for request in requests:
        core.add_request(request)
    return collect_results(core, requests)


def collect_results(core: EngineCore, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Step ``core`` until every one of ``requests`` has finished; their results in request order."""
    outputs: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
    pending = set(outputs)
    while pending:
        for output in core.step():
            if output.request_id in outputs:
                outputs[output.request_id].append(output)
                if output.finish_reason is not None:
                    pending.discard(output.request_id)
    return [GenerationResult.from_outputs(outputs[r.request_id]) for r in requests]
