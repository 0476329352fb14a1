"""The documentation a server serves about itself, over real HTTP: ``/docs`` and ``/redoc`` work with no
network (every asset local and served), ``/openapi.json`` carries this server's limits and defaults,
and ``/health`` is documented beside ``/healthz``."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import httpx
import pytest

from tests.server.api.live_server import NEW_TOKENS_LIMIT

pytestmark = pytest.mark.e2e  # starts servers or other processes


@pytest.fixture
def client(limited_client: httpx.Client) -> httpx.Client:
    return limited_client


class _References(HTMLParser):
    """Every URL a page's tags load (``src``, ``href``) or a ReDoc element reads (``spec-url``)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href", "spec-url") and value]


def _references(html: str) -> list[str]:
    parser = _References()
    parser.feed(html)
    return parser.urls


@pytest.mark.parametrize(("page", "marker"), [("/docs", "SwaggerUIBundle"), ("/redoc", "Redoc")])
def test_the_docs_load_only_local_assets_and_each_is_served(
    client: httpx.Client, page: str, marker: str
) -> None:
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not re.search(r"(https?:)?//[A-Za-z0-9]", html), "a URL to another host"
    assert "fonts.googleapis" not in html and "cdn" not in html.lower()
    assets = [url for url in _references(html) if url.endswith((".js", ".css"))]
    assert {url.rsplit(".", 1)[1] for url in assets} == ({"js", "css"} if page == "/docs" else {"js"})
    for url in assets:
        assert url.startswith("/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 50_000, url  # the real bundle, not a stub
        kind = "javascript" if url.endswith(".js") else "css"
        assert kind in asset.headers["content-type"], (url, asset.headers["content-type"])
    scripts = "".join(client.get(url).text for url in assets if url.endswith(".js"))
    assert marker in scripts


def test_swagger_ui_reads_this_servers_openapi_and_no_online_validator(client: httpx.Client) -> None:
    html = client.get("/docs").text
    assert "url: '/openapi.json'" in html
    assert '"validatorUrl": null' in html
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")  # Swagger UI 5 renders 3.1


def test_the_openapi_shows_the_configured_limit_and_the_real_defaults(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    native = schemas["GenerateBody"]["properties"]["max_new_tokens"]
    assert (native["maximum"], native["default"]) == (
        NEW_TOKENS_LIMIT,
        NEW_TOKENS_LIMIT,
    )  # 64 cut to the limit
    assert f"at most {NEW_TOKENS_LIMIT}" in native["description"] and "65536" not in str(schemas)
    completions = schemas["CompletionRequest"]["properties"]["max_tokens"]
    assert completions["default"] == 16 and completions["anyOf"][0]["maximum"] == NEW_TOKENS_LIMIT
    for field in ("max_tokens", "max_completion_tokens"):
        chat = schemas["ChatCompletionRequest"]["properties"][field]
        assert chat["anyOf"][0]["maximum"] == NEW_TOKENS_LIMIT and "as many as fit" in chat["description"]
    # what the schema says is what the server does: an unset max_new_tokens gets the default
    answer = client.post("/v1/generate", json={"prompt": "Once upon a time"}).json()
    assert answer["usage"]["completion_tokens"] == NEW_TOKENS_LIMIT or answer["finish_reason"] != "length"


def test_health_is_an_alias_of_healthz_and_documented(client: httpx.Client) -> None:
    assert client.get("/health").json() == client.get("/healthz").json() == {"status": "ok"}
    paths = client.get("/openapi.json").json()["paths"]
    assert paths["/health"]["get"]["responses"]["200"] == paths["/healthz"]["get"]["responses"]["200"]
    assert "alias" in paths["/health"]["get"]["summary"]
    assert not {"/docs", "/redoc", "/docs/assets"} & set(paths)
