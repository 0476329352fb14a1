"""Task ids are names, never paths: traversal, absolute paths, NUL, look-alike characters, overlong and
hidden names are refused with 400 on every route before any I/O (an upload's body is not even read),
and nothing is written anywhere under the store's parent folder."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import hypothesis
import pytest
from hypothesis import strategies as st

from hardening.hostile_uploads import tree
from hardening.prefixes import model_geometry, native_prefix
from prefix_store.errors import InvalidName
from prefix_store.storage.names import validate_task_id
from server.api.schemas import TASK_ID_PATTERN
from tests.hardening.conftest import Hardened

pytestmark = pytest.mark.e2e  # starts servers or other processes

HOSTILE_NAMES = [
    "../etc/passwd",
    "..",
    ".",
    "../../../../tmp/owned",
    "..\\..\\windows",
    "/etc/passwd",
    "/abs/path",
    "C:\\Windows\\system32",
    "a/b",
    "nul\x00byte",
    "\x00",
    "t\u0430sk",  # Cyrillic a
    "\uff54\uff41\uff53\uff4b",  # fullwidth "task"
    "task\u200b",  # zero-width space
    "caf\u00e9",
    "x" * 129,
    "x" * 4096,
    ".hidden",
    "..hidden",
    " leading-space",
    "trailing-space ",
    "a\nb",
    "%2e%2e",
    "semi;colon",
    "star*",
    "~user",
    "\n",  # a final newline: the router's `$` matches before it (found by the generated names)
    "task\n",
]


def _path_segment(name: str) -> str:
    """``name`` as one percent-encoded path segment, dots included: the client does not collapse
    ``..`` and the server's router receives the name itself."""
    return quote(name, safe="").replace(".", "%2E")


@pytest.fixture
def untouched(api_server: Hardened) -> Iterator[None]:
    """Nothing under the store's parent folder (the store, the keys file, their neighbours) changes."""
    root = api_server.store.parent
    before = tree(root)
    yield
    assert tree(root) == before


def _refused(response: httpx.Response, name: str) -> None:
    """400 with the naming rule; a "/" too (another URL to the router, no route's I/O runs for it)."""
    assert response.status_code == 400, (name, response.status_code, response.text)
    assert response.json() == {"error": {"type": "invalid_request", "message": _naming_rule()}}


def _naming_rule() -> str:
    with pytest.raises(InvalidName) as refused:
        validate_task_id("a/b")
    return str(refused.value)


def test_hostile_names_are_refused_on_every_route(api_server: Hardened, untouched: None) -> None:
    blob = native_prefix(model_geometry(api_server.server.model_dir))
    with api_server.client() as client:
        for name in HOSTILE_NAMES:
            segment = _path_segment(name)
            for method, path in (
                ("PUT", f"/v1/admin/prefixes/{segment}"),
                ("GET", f"/v1/admin/prefixes/{segment}"),
                ("DELETE", f"/v1/admin/prefixes/{segment}"),
                ("GET", f"/v1/admin/prefixes/{segment}/download"),
            ):
                files = {"file": ("p.safetensors", blob)} if method == "PUT" else None
                _refused(client.request(method, path, files=files), name)
            generated = client.post(
                "/v1/generate", json={"task_id": name, "prompt": "hi", "max_new_tokens": 1}
            )
            assert generated.status_code == 400, (name, generated.text)
            for model_path in ("/v1/completions", "/v1/chat/completions"):
                body = {"model": name, "max_tokens": 1}
                body |= (
                    {"prompt": "hi"}
                    if model_path == "/v1/completions"
                    else {"messages": [{"role": "user", "content": "hi"}]}
                )
                assert client.post(model_path, json=body).status_code in (400, 404, 422)  # never found
        assert [
            p["task_id"]
            for p in client.get("/v1/admin/prefixes").json()["prefixes"]
            if p["task_id"] in HOSTILE_NAMES
        ] == []


def test_a_bad_name_is_refused_before_the_body_is_read(api_server: Hardened, untouched: None) -> None:
    """An upload to a bad name is answered 400, not 413, however large its body: nothing was read."""

    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="p"\r\n\r\n'
        for _ in range(8):
            yield b"\0" * (1 << 20)

    with api_server.client() as client:
        response = client.put(
            f"/v1/admin/prefixes/{_path_segment('..hidden')}",
            content=body(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert response.status_code == 400, response.text


_INVALID = st.text(max_size=140).filter(lambda name: not re.fullmatch(TASK_ID_PATTERN, name))


@hypothesis.settings(max_examples=40, deadline=None, database=None)
@hypothesis.given(name=_INVALID)
def test_generated_invalid_names_are_refused(api_server: Hardened, name: str) -> None:
    with api_server.client() as client:
        if name not in ("", ".", ".."):
            _refused(client.get(f"/v1/admin/prefixes/{_path_segment(name)}"), name)
        generated = client.post("/v1/generate", json={"task_id": name, "prompt": "hi", "max_new_tokens": 1})
        assert generated.status_code in (400, 422), (
            generated.text
        )  # 422: not a JSON string (a lone surrogate)


@hypothesis.settings(database=None)
@hypothesis.given(name=st.text(max_size=140) | st.from_regex(TASK_ID_PATTERN, fullmatch=True))
def test_the_documented_pattern_is_the_rule_the_server_applies(name: str) -> None:
    documented = re.fullmatch(TASK_ID_PATTERN, name) is not None
    try:
        validate_task_id(name)
        accepted = True
    except InvalidName:
        accepted = False
    assert documented == accepted
