"""The largest answer the default limits allow (``max_request_logprobs``: 262,144 entries) is served without
holding the server: lm-eval's scoring call at the limits (64 prompts of 256 token ids, ``max_tokens`` 0,
``echo``, 15 alternatives per token) answers 200 with every entry, ``/healthz`` keeps answering within a
second all the while (the answer is built and serialised off the event loop), the server's memory grows by
a bounded amount, and one entry more is a 400 that states the limit. Real HTTP, the demo model."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testing.server_process import ServerProcess

pytestmark = pytest.mark.e2e  # starts servers or other processes

PROMPTS, POSITIONS, ALTERNATIVES = 64, 256, 15  # 64 × 256 × (15 + 1) = 262,144 entries: the default limit
HEALTHZ_S = 1.0  # the most a liveness probe may wait, whatever one request asks
RSS_GROWTH = 600 << 20  # answers of ~15 MB: Python's objects for them, with room for a loaded machine


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    store = tmp_path_factory.mktemp("large").resolve().as_uri()
    with ServerProcess(demo_model_dir, store) as process:
        yield process


def scoring_body(model: str, positions: int) -> dict:
    rng = random.Random(7)
    prompts = [[rng.randrange(5, 500) for _ in range(positions)] for _ in range(PROMPTS)]
    return {"model": model, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": ALTERNATIVES}


def test_the_largest_answer_allowed_is_served_while_healthz_answers(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=600) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        latencies: list[float] = []
        done = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as prober:
                while not done.is_set():
                    started = time.perf_counter()
                    assert prober.get("/healthz").status_code == 200
                    latencies.append(time.perf_counter() - started)
                    done.wait(0.05)

        prober = threading.Thread(target=probe)
        before = server.rss_bytes()
        prober.start()
        try:
            answer = client.post("/v1/completions", json=scoring_body(model, POSITIONS))
        finally:
            done.set()
            prober.join()
        grown = server.rss_bytes() - before
        refused = client.post("/v1/completions", json=scoring_body(model, POSITIONS + 1))
    assert answer.status_code == 200, answer.text[:500]
    choices = answer.json()["choices"]
    assert len(choices) == PROMPTS
    for choice in choices:
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == POSITIONS and logprobs["token_logprobs"][0] is None
        # keyed by the tokens' strings (the legacy shape): distinct ids may decode alike
        assert all(1 <= len(top) <= ALTERNATIVES + 1 for top in logprobs["top_logprobs"][1:])
    assert len(latencies) > 10 and max(latencies) < HEALTHZ_S, sorted(latencies)[-5:]
    assert grown < RSS_GROWTH, f"the server grew by {grown >> 20} MiB"
    assert refused.status_code == 400
    assert "over the limit of 262144" in refused.json()["error"]["message"]
