"""The engine as the API sees it: submit a request, await its result.

This first engine runs one request at a time on a single worker thread that owns the model, so the
event loop never blocks on a forward pass. (The continuous-batching engine replaces its inside; the
API keeps calling ``generate``.)
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from server.engine.base_model import BaseModel
from server.engine.generation import GenerationRequest, GenerationResult, check_fits, generate


class GenerationService:
    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run ``request`` to completion; raises ``RequestTooLong`` before queueing if it cannot fit."""
        check_fits(self.base, request)
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._worker, generate, self.base, [request])
        return results[0]

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
