"""``If-Match`` and ``If-None-Match`` on the prefix upload and delete, over real HTTP (RFC 9110 §13.1):
``*``, strong comparison (a weak tag never matches), lists of tags, create-only uploads, malformed headers,
and messages that quote only an excerpt of what was sent. After every refusal the stored bytes and the
version generation uses are the ones from before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from prefix_store.formats.native import encode_native
from server.engine.base_model import BaseModel
from tests.server.api.live_server import live_server
from tests.server.engine.helpers import random_prefix

pytestmark = pytest.mark.e2e  # starts a server process

Headers = list[tuple[str, str]]  # (name, value); a name may come twice


@pytest.fixture(scope="module")
def client(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with (
        live_server(demo_model_dir, tmp_path_factory.mktemp("store")) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def blobs(llama_base: BaseModel) -> list[bytes]:
    """Three different valid native prefixes."""
    return [encode_native(random_prefix(llama_base, 3, seed=seed), llama_base.geometry) for seed in (1, 2, 3)]


def _put(client: httpx.Client, task_id: str, blob: bytes, headers: Headers | None = None) -> httpx.Response:
    return client.put(
        f"/v1/admin/prefixes/{task_id}", files={"file": ("p.safetensors", blob)}, headers=headers
    )


def _delete(client: httpx.Client, task_id: str, headers: Headers | None = None) -> httpx.Response:
    return client.delete(f"/v1/admin/prefixes/{task_id}", headers=headers)


def _refused(response: httpx.Response, status: int, error_type: str) -> str:
    """The message of a documented error body with ``status`` and ``error_type``."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type and error["message"], error
    return error["message"]


def _serving(client: httpx.Client, task_id: str) -> tuple[str, bytes]:
    """The version generation uses for the task, and the bytes the store holds for it."""
    answer = client.post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 1, "task_id": task_id})
    assert answer.status_code == 200, answer.text
    download = client.get(f"/v1/admin/prefixes/{task_id}/download")
    assert download.headers["etag"] == f'"{answer.json()["prefix_version"]}"'
    return answer.json()["prefix_version"], download.content


def _create(client: httpx.Client, task_id: str, blob: bytes) -> str:
    created = _put(client, task_id, blob)
    assert created.status_code == 201, created.text
    return created.json()["version"]


def _items(**headers: str) -> Headers:
    return [(name.replace("_", "-"), value) for name, value in headers.items()]


def test_if_match_star_needs_a_current_version(client: httpx.Client, blobs: list[bytes]) -> None:
    star = _items(If_Match="*")
    message = _refused(_put(client, "star", blobs[0], star), 412, "precondition_failed")
    assert "does not exist" in message
    assert client.get("/v1/admin/prefixes/star").status_code == 404  # nothing was stored
    _refused(_delete(client, "star", star), 412, "precondition_failed")

    first = _create(client, "star", blobs[0])
    replaced = _put(client, "star", blobs[1], star)
    assert replaced.status_code == 200 and replaced.json()["version"] != first
    assert _serving(client, "star") == (replaced.json()["version"], blobs[1])
    assert _delete(client, "star", star).status_code == 204
    assert client.get("/v1/admin/prefixes/star").status_code == 404


def test_if_match_compares_strongly_a_weak_tag_never_matches(
    client: httpx.Client, blobs: list[bytes]
) -> None:
    version = _create(client, "weak", blobs[0])
    for weak in (f'W/"{version}"', f"W/{version}", f'W/"0-stale", W/"{version}"'):
        message = _refused(_put(client, "weak", blobs[1], _items(If_Match=weak)), 412, "precondition_failed")
        assert "weak" in message
        _refused(_delete(client, "weak", _items(If_Match=weak)), 412, "precondition_failed")
    assert _serving(client, "weak") == (version, blobs[0])
    mixed = _items(If_Match=f'W/"{version}", "0-stale"')  # the strong one is stale: no match
    message = _refused(_put(client, "weak", blobs[1], mixed), 412, "precondition_failed")
    assert "does not match the current version" in message
    assert _serving(client, "weak") == (version, blobs[0])


def test_if_match_takes_the_etag_the_bare_version_or_a_list(client: httpx.Client, blobs: list[bytes]) -> None:
    version = _create(client, "listed", blobs[0])
    etag = client.get("/v1/admin/prefixes/listed/download").headers["etag"]
    second = _put(client, "listed", blobs[1], _items(If_Match=etag))
    assert second.status_code == 200
    third = _put(client, "listed", blobs[2], _items(If_Match=second.json()["version"]))  # bare, as the SDK
    assert third.status_code == 200
    current = third.json()["version"]

    stale = _items(If_Match=f'"{version}", "{second.json()["version"]}"')
    _refused(_put(client, "listed", blobs[0], stale), 412, "precondition_failed")
    assert _serving(client, "listed") == (current, blobs[2])
    listed = _put(client, "listed", blobs[0], _items(If_Match=f'"{version}", "{current}",'))
    assert listed.status_code == 200
    current = listed.json()["version"]
    # a header sent twice is one list (RFC 9110 §5.3)
    twice = [("If-Match", f'"{version}"'), ("If-Match", f'"{current}"')]
    assert _delete(client, "listed", twice).status_code == 204
    assert client.get("/v1/admin/prefixes/listed").status_code == 404


def test_a_delete_with_if_match_of_a_task_that_does_not_exist_is_412(
    client: httpx.Client, blobs: list[bytes]
) -> None:
    version = _create(client, "gone", blobs[0])
    assert _delete(client, "gone").status_code == 204
    _refused(_delete(client, "gone", _items(If_Match=f'"{version}"')), 412, "precondition_failed")
    _refused(_delete(client, "gone"), 404, "not_found")  # without a precondition: as before


def test_if_none_match_star_creates_only(client: httpx.Client, blobs: list[bytes]) -> None:
    create_only = _items(If_None_Match="*")
    created = _put(client, "once", blobs[0], create_only)
    assert created.status_code == 201
    version = created.json()["version"]
    message = _refused(_put(client, "once", blobs[1], create_only), 412, "precondition_failed")
    assert f"the task exists (version {version})" in message
    assert _serving(client, "once") == (version, blobs[0])  # nothing stored, the old version serves
    listed = client.get("/v1/admin/prefixes").json()["prefixes"]
    assert [p["version"] for p in listed if p["task_id"] == "once"] == [version]
    assert _delete(client, "once").status_code == 204
    again = _put(client, "once", blobs[1], create_only)  # deleted: it may be created again
    assert again.status_code == 201 and _serving(client, "once") == (again.json()["version"], blobs[1])


@pytest.mark.parametrize(
    ("method", "headers", "names"),
    [
        ("PUT", _items(If_None_Match=f'"{"1-" + "0" * 12}"'), "If-None-Match"),
        ("PUT", _items(If_None_Match='W/"x"'), "If-None-Match"),
        ("PUT", _items(If_Match="*", If_None_Match="*"), "not both"),
        ("DELETE", _items(If_None_Match="*"), "If-None-Match"),
        ("PUT", _items(If_Match='"unterminated'), "If-Match"),
        ("PUT", _items(If_Match='*, "x"'), "If-Match"),
        ("PUT", _items(If_Match="1-aaa, 2-bbb"), "If-Match"),  # a bare version only ever comes alone
        ("PUT", _items(If_Match='"a" "b"'), "If-Match"),
        ("PUT", _items(If_Match=""), "If-Match"),
        ("DELETE", _items(If_Match=", ,"), "If-Match"),
        ("PUT", _items(If_Match=", ".join(f'"{n}-x"' for n in range(65))), "over the limit of 64"),
    ],
    ids=[
        "none-match-tag",
        "none-match-weak",
        "both",
        "delete-none-match",
        "unterminated",
        "star-in-list",
        "bare-list",
        "no-comma",
        "empty",
        "only-commas",
        "65-tags",
    ],
)
def test_malformed_or_unsupported_conditions_are_400_and_change_nothing(
    client: httpx.Client,
    blobs: list[bytes],
    request: pytest.FixtureRequest,
    method: str,
    headers: Headers,
    names: str,
) -> None:
    task_id = f"guarded-{request.node.callspec.id}"
    version = _create(client, task_id, blobs[0])
    if method == "PUT":
        response = _put(client, task_id, blobs[1], headers)
    else:
        response = _delete(client, task_id, headers)
    assert names in _refused(response, 400, "invalid_request")
    assert _serving(client, task_id) == (version, blobs[0])


def test_messages_quote_an_excerpt_of_a_huge_if_match(client: httpx.Client, blobs: list[bytes]) -> None:
    version = _create(client, "quoted", blobs[0])
    tag = '"' + "7-" + "a" * 10_000 + '"'  # h11 takes request heads up to 16 KiB
    mismatch = _refused(_put(client, "quoted", blobs[1], _items(If_Match=tag)), 412, "precondition_failed")
    malformed = _refused(_put(client, "quoted", blobs[1], _items(If_Match=tag + "x")), 400, "invalid_request")
    weak = _refused(_delete(client, "quoted", _items(If_Match="W/" + tag)), 412, "precondition_failed")
    create_only = _items(If_None_Match=tag)
    refused = _refused(_put(client, "quoted", blobs[1], create_only), 400, "invalid_request")
    assert "(10002 characters)" in mismatch and "(10005 characters)" in malformed
    assert "(10006 characters)" in weak and "(10004 characters)" in refused
    assert max(len(message) for message in (mismatch, malformed, weak, refused)) < 400
    assert _serving(client, "quoted") == (version, blobs[0])
