"""What the SDK refuses before sending anything (no request reaches the wire), and the retry
decisions, which need no server."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest
from prefix_client import Client, InvalidInputError, RateLimitError, RetryPolicy, ServiceUnavailableError
from prefix_client._exceptions import make_status_error, parse_retry_after
from prefix_client._retry import Replay

from tests.clients.recorder import Recorder


@pytest.fixture
def offline() -> tuple[Client, Recorder]:
    """A client whose every request would be recorded (and would fail: nothing listens there)."""
    recorder = Recorder()
    return Client("http://127.0.0.1:9", http_client=recorder.sync(), max_retries=0), recorder


def _refused(client: Client, recorder: Recorder, path: Path, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match) as caught:
        client.upload_prefix("task", path)
    assert isinstance(caught.value, ValueError)
    assert recorder.requests == []


def _safetensors(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_upload_refuses_what_cannot_be_a_prefix(
    offline: tuple[Client, Recorder], peft_adapter: Path, native_prefix: Path, tmp_path: Path
) -> None:
    client, recorder = offline
    _refused(client, recorder, tmp_path / "nothing", "no such file or folder")

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    shutil.copy(peft_adapter / "adapter_model.safetensors", no_config)
    _refused(client, recorder, no_config, "no adapter_config.json")

    adalora = tmp_path / "adalora"
    shutil.copytree(peft_adapter, adalora)
    config = json.loads((adalora / "adapter_config.json").read_text())
    (adalora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "ADALORA"}))
    _refused(
        client,
        recorder,
        adalora,
        "peft_type is 'ADALORA'; PrefixServe serves PREFIX_TUNING, PROMPT_TUNING, P_TUNING, LORA adapters only",
    )

    lora = tmp_path / "lora"
    shutil.copytree(peft_adapter, lora)
    (lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    _refused(client, recorder, lora, r"a LORA adapter holds '….lora_A.weight' and '….lora_B.weight' tensors")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(peft_adapter / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"prompt_embeddings": [1.0]}))
    _refused(client, recorder, pickled, r"no adapter_model.safetensors \(found adapter_model.bin: pickle")

    checkpoint = tmp_path / "prefix.pt"
    checkpoint.write_bytes(pickle.dumps([1, 2]))
    _refused(client, recorder, checkpoint, "pickle checkpoints are never loaded")
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickle.dumps([1, 2]))
    _refused(client, recorder, disguised, "this is a pickle checkpoint")

    _refused(client, recorder, peft_adapter / "adapter_model.safetensors", "this is a PEFT adapter_model")
    _refused(client, recorder, peft_adapter / "adapter_config.json", "upload its folder instead")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"abc", "only 3 bytes"),
        (struct.pack("<Q", 10_000) + b"{}", "header claims 10000 bytes"),
        (struct.pack("<Q", 4) + b"nope", "header is not JSON"),
        (_safetensors([1, 2]), "not a JSON object"),  # type: ignore[arg-type]
        (
            _safetensors({"keys": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}),
            "tensor 'keys' has a malformed",
        ),
        (
            _safetensors({"keys": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "missing: values",
        ),
        (
            _safetensors(
                {
                    "__metadata__": {"format": "other"},
                    "keys": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "values": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\0" * 8,
            ),
            "metadata format 'prefix-serve/1', this file has 'other'",
        ),
        (
            _safetensors(
                {
                    "__metadata__": {"kind": "soft_prompt"},
                    "keys": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                b"\0" * 4,
            ),
            "a native soft prompt holds tensors 'embeddings'; missing: embeddings",
        ),
        (
            _safetensors(
                {
                    "__metadata__": {"kind": "ia3"},
                    "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                b"\0" * 4,
            ),
            "metadata kind 'ia3' is not 'prefix', 'soft_prompt' or 'lora'",
        ),
    ],
)
def test_upload_checks_the_safetensors_structure(
    offline: tuple[Client, Recorder], tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "prefix.safetensors"
    path.write_bytes(content)
    _refused(*offline, path, match)


@pytest.mark.parametrize("task_id", ["", ".hidden", "a/b", "../x", "x" * 129, "tab\t", "ünï"])
def test_task_ids_are_checked_before_any_call(offline: tuple[Client, Recorder], task_id: str) -> None:
    client, recorder = offline
    for call in (
        lambda: client.generate("hi", task_id=task_id),
        lambda: client.stream("hi", task_id=task_id),
        lambda: client.get_prefix(task_id),
        lambda: client.delete_prefix(task_id),
        lambda: client.download_prefix(task_id, "out"),
    ):
        with pytest.raises(InvalidInputError, match="invalid task id"):
            call()
    assert recorder.requests == []


def test_unknown_generation_parameters_are_refused(offline: tuple[Client, Recorder]) -> None:
    client, recorder = offline
    with pytest.raises(TypeError, match="max_tokens"):
        client.generate("hi", max_tokens=3)  # type: ignore[call-arg]
    assert recorder.requests == []


def _answer(
    status: int, headers: dict[str, str] | None = None, error_type: str = "rate_limited"
) -> httpx.Response:
    body = {"error": {"type": error_type, "message": "m"}}
    return httpx.Response(status, json=body, headers=headers, request=httpx.Request("GET", "http://x/"))


def test_retry_decisions() -> None:
    policy = RetryPolicy(max_retries=3, initial_backoff=0.5, max_backoff=4.0, max_retry_after=60)
    limited = make_status_error(_answer(429, {"Retry-After": "2"}))
    assert isinstance(limited, RateLimitError) and limited.retry_after == 2.0
    assert 2.0 <= policy.after_status(0, limited) <= 2.2  # honoured, never shorter
    assert policy.after_status(3, limited) is None  # out of retries
    quota = make_status_error(_answer(429, error_type="quota_exceeded"))  # no Retry-After: waiting won't help
    assert policy.after_status(0, quota) is None
    unavailable = make_status_error(_answer(503, error_type="store_unavailable"))
    assert isinstance(unavailable, ServiceUnavailableError)
    waits = [policy.after_status(attempt, unavailable) for attempt in range(3)]
    assert (
        0.25 <= waits[0] <= 0.5 and 0.5 <= waits[1] <= 1.0 and 1.0 <= waits[2] <= 2.0
    )  # exponential, jittered
    assert all(0 < policy.backoff(10) <= 4.0 for _ in range(20))  # capped
    assert policy.after_status(0, make_status_error(_answer(500, error_type="internal_error"))) is None
    assert policy.after_status(0, make_status_error(_answer(404, error_type="not_found"))) is None

    request = httpx.Request("PUT", "http://x/")
    refused, lost = httpx.ConnectError("refused", request=request), httpx.ReadError("reset", request=request)
    assert policy.after_transport_error(0, refused, Replay.IF_NOT_APPLIED) is not None
    assert policy.after_transport_error(0, lost, Replay.IF_NOT_APPLIED) is None
    assert policy.after_transport_error(0, lost, Replay.SAFE) is not None
    assert policy.after_transport_error(0, httpx.UnsupportedProtocol("ftp"), Replay.SAFE) is None
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 1.5 ") == 1.5
    in_ten = format_datetime(datetime.now(UTC) + timedelta(seconds=10), usegmt=True)
    assert 8 <= parse_retry_after(in_ten) <= 10
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    assert parse_retry_after("-5") == 0.0


def test_a_non_api_error_body_still_maps_by_status() -> None:
    response = httpx.Response(502, text="<html>Bad Gateway</html>", request=httpx.Request("GET", "http://x/"))
    error = make_status_error(response)
    assert (
        type(error).__name__ == "ServerError"
        and error.type == "http_error"
        and "Bad Gateway" in error.message
    )
