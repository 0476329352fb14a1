"""The OpenAI request models' numeric and string fields, fuzzed beyond what the OpenAPI document lets
schemathesis generate: integers of any size (past Python's 4,300-digit ``int`` limit, written straight into
the JSON), floats, negative and non-ASCII-digit ``logit_bias`` keys, any text in the string fields. Every
answer is a 200 or a 4xx in OpenAI's shape with a bounded message: never a 5xx, never a dropped
connection. Hypothesis, over real HTTP, against the hardening server (small generation limits)."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hardening.conftest import Hardened

pytestmark = pytest.mark.e2e  # starts servers or other processes

NUMERIC = [
    "max_tokens",
    "n",
    "best_of",
    "logprobs",
    "top_k",
    "seed",
    "min_tokens",
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
]
TEXT = ["model", "user", "stop", "suffix"]
HUGE = "9" * 5000  # a JSON number Python cannot turn into text (its 4,300-digit limit)

numbers = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from([HUGE, f"-{HUGE}", "1e400", "-0", "0.0", "5.0", "1" * 25]),
)
logit_bias_keys = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["³", "١٢", "𝟙", "٣", "0x10", "-1", " 7", HUGE]),
    st.integers().map(str),
)


def _body(field: str, raw: str, strings: dict[str, str], bias: dict[str, float]) -> str:
    """A completions body with ``field`` set to the raw JSON number ``raw`` and the fuzzed strings."""
    body: dict[str, object] = {"prompt": "Once", "max_tokens": 2, **strings}
    body.setdefault("model", "demo")
    if bias:
        body["logit_bias"] = bias
    text = json.dumps(body)
    return f'{text[:-1]}, "{field}": {raw}}}'


def _assert_answered(response: httpx.Response) -> None:
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text[:300]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert len(error["message"]) <= 2500, len(error["message"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(NUMERIC),
    raw=numbers,
    strings=st.dictionaries(st.sampled_from(TEXT), st.text(max_size=300), max_size=2),
    bias=st.dictionaries(logit_bias_keys, st.floats(-100, 100), max_size=3),
)
def test_no_number_or_string_in_a_completion_request_gets_a_5xx(
    api_server: Hardened, field: str, raw: str, strings: dict[str, str], bias: dict[str, float]
) -> None:
    with api_server.client() as client:
        base_id = client.get("/v1/models").json()["data"][0]["id"]
        if strings.get("model") is None:
            strings = {**strings, "model": base_id}
        response = client.post(
            "/v1/completions",
            content=_body(field, raw, strings, bias),
            headers={"content-type": "application/json"},
        )
    _assert_answered(response)
