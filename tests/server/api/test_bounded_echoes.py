"""An error message quotes at most an excerpt of what the caller sent, over real HTTP: a field name as long
as the body, thousands of unknown fields, a huge content type, integers of hundreds or thousands of digits
in an uploaded file's header or adapter config, thousands of tensor names, a huge task id. Each answer is
the documented 4xx error body, never a 500, and its message stays short."""

from __future__ import annotations

import json
import struct

import httpx
import pytest

pytestmark = pytest.mark.e2e  # uses a live server

SHORT = 400  # characters: what "bounded" means here (a quoted excerpt is about 64, plus the sentence)
JSON = {"content-type": "application/json"}


@pytest.fixture
def client(limited_client: httpx.Client) -> httpx.Client:
    return limited_client


def _error(response: httpx.Response, status: int, error_type: str) -> dict[str, str]:
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["type"] == error_type and error["message"], error
    return error


def _safetensors(header: dict[str, object], data: bytes = b"\0" * 8) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _upload_file(client: httpx.Client, blob: bytes) -> httpx.Response:
    return client.put("/v1/admin/prefixes/bounded", files={"file": ("p.safetensors", blob)})


def _upload_peft(client: httpx.Client, config: dict[str, object]) -> httpx.Response:
    files = {
        "adapter_config": ("adapter_config.json", json.dumps(config).encode()),
        "adapter_model": ("adapter_model.safetensors", b"not read: the config is refused first"),
    }
    return client.put("/v1/admin/prefixes/bounded", files=files)


def test_a_huge_unknown_field_name_is_quoted_as_an_excerpt(client: httpx.Client) -> None:
    name = "f" * 60_000
    native = _error(client.post("/v1/generate", json={"prompt": "hi", name: 1}), 422, "validation_error")
    assert "(60000 characters): Extra inputs are not permitted" in native["message"]
    openai = client.post("/v1/completions", json={"model": "base", "prompt": "hi", name: 1})
    error = _error(openai, 400, "invalid_request_error")
    assert error["code"] == "unknown_parameter" and error["param"] == "f" * 64 + "…"
    assert max(len(native["message"]), len(error["message"])) < SHORT


def test_thousands_of_problems_are_counted_not_listed(client: httpx.Client) -> None:
    body = {"prompt": "hi", **{f"unknown_{n}": n for n in range(1000)}}
    message = _error(client.post("/v1/generate", json=body), 422, "validation_error")["message"]
    assert message.count("Extra inputs are not permitted") == 10 and message.endswith("and 990 more problems")
    assert len(message) < 1000


def test_a_huge_content_type_is_quoted_as_an_excerpt(client: httpx.Client) -> None:
    content_type = "text/" + "x" * 10_000
    response = client.post("/v1/generate", content=b"{}", headers={"content-type": content_type})
    message = _error(response, 422, "validation_error")["message"]
    assert "(10005 characters)" in message and len(message) < SHORT


def test_a_validators_message_quoting_the_input_is_cut(client: httpx.Client) -> None:
    messages = [{"role": "user", "content": [{"type": "x" * 5000}]}]
    response = client.post("/v1/chat/completions", json={"model": "base", "messages": messages})
    message = _error(response, 400, "invalid_request_error")["message"]
    assert "content parts of type 'xxx" in message and len(message) < 2 * SHORT


@pytest.mark.parametrize(
    ("shape", "shown"),
    [
        ([10**300, 2], "100000000000…(301 digits)"),
        # the declared byte size has 4401 digits: past what str() of an int may print (this was a 500)
        ([10**2200, 10**2200], "400000000000…(4401 digits) bytes"),
    ],
    ids=["301-digit-dimension", "4401-digit-size"],
)
def test_huge_dimensions_in_an_uploaded_header_are_shown_by_their_length(
    client: httpx.Client, shape: list[int], shown: str
) -> None:
    header = {
        "keys": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]},
        "values": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
    }
    message = _error(_upload_file(client, _safetensors(header)), 400, "invalid_prefix")["message"]
    assert shown in message and len(message) < SHORT
    assert client.get("/v1/admin/prefixes/bounded").status_code == 404  # nothing was stored


def test_thousands_of_tensor_names_are_counted_not_listed(client: httpx.Client) -> None:
    header = {f"n{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(800)}
    blob = _safetensors(header, b"\0" * 3200)
    message = _error(_upload_file(client, blob), 400, "invalid_prefix")["message"]
    assert "(800 in all)" in message and len(message) < SHORT


@pytest.mark.parametrize(
    ("field", "status", "error_type"),
    [("num_layers", 400, "invalid_prefix"), ("num_virtual_tokens", 413, "payload_too_large")],
)
def test_a_huge_integer_in_an_adapter_config_is_shown_by_its_length(
    client: httpx.Client, field: str, status: int, error_type: str
) -> None:
    config: dict[str, object] = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": 3,
        "num_layers": 4,
        "num_attention_heads": 2,
        "token_dim": 32,
    }
    config[field] = 10**300
    message = _error(_upload_peft(client, config), status, error_type)["message"]
    assert f"{field} is 100000000000…(301 digits)" in message and len(message) < SHORT


def test_a_huge_task_id_is_never_echoed(client: httpx.Client) -> None:
    task_id = "t" * 60_000
    in_body = _error(
        client.post("/v1/generate", json={"prompt": "hi", "task_id": task_id}), 400, "invalid_request"
    )
    in_path = _error(client.get(f"/v1/admin/prefixes/{'t' * 8000}"), 400, "invalid_request")
    assert max(len(in_body["message"]), len(in_path["message"])) < SHORT
