"""The documents a reader of the repository follows stay true to the code: ``docs/API.md`` names every route
the app serves (every path of ``/openapi.json``, and the routes kept out of it) and every setting and
option of ``prefix-serve serve --help``; every relative link of the README and ``docs/`` resolves; and no
document sends the reader to a file the repository lacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from starlette.routing import Route

from server.api.app import create_app
from server.cli import build_parser
from server.config import ENV_PREFIX, ServeSettings

REPO = Path(__file__).resolve().parents[1]
API_MD = (REPO / "docs" / "API.md").read_text(encoding="utf-8")
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every path the app answers: its OpenAPI paths and the routes it keeps out of them (built, not served:
    no model is loaded)."""
    app = create_app(ServeSettings(model="demo", store=str(tmp_path_factory.mktemp("store"))))
    documented = set(app.openapi()["paths"])
    assert "/v1/generate" in documented and "/v1/admin/prefixes/{task_id}/download" in documented
    served = {route.path for route in app.routes if isinstance(route, Route)}
    return documented | served


def test_api_md_names_every_route(app_routes: set[str]) -> None:
    missing = sorted(path for path in app_routes if f"`{path}`" not in API_MD and f" {path}`" not in API_MD)
    assert not missing, f"docs/API.md does not name these routes: {missing}"


def serve_help() -> str:
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command")
    return commands.choices["serve"].format_help()  # type: ignore[union-attr]


def test_api_md_names_every_setting_of_serve_help() -> None:
    text = serve_help()
    variables = set(re.findall(rf"{ENV_PREFIX}[A-Z_]+[A-Z]", text))
    variables |= {f"{ENV_PREFIX}{name.upper()}" for name in ServeSettings.model_fields}
    options = set(re.findall(r"--[a-z][a-z-]+", text)) - {"--help"}
    assert len(variables) == len(ServeSettings.model_fields) and "--tenant-max-concurrent" in options
    missing = sorted(name for name in variables | options if name not in API_MD)
    assert not missing, f"docs/API.md does not name these settings of `prefix-serve serve --help`: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_relative_link_resolves(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link.split("#")[0] for link in links if "://" not in link and not link.startswith("#")]
    broken = [link for link in relative if link and not (document.parent / link).exists()]
    assert not broken, f"{document.name} links to files the repository lacks: {broken}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_no_document_points_outside_the_repository(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    assert not re.search(r"\bshared/|DESIGN\.md", text), (
        f"{document.name} names a file outside the repository"
    )
    named = set(
        re.findall(
            r"(?<![\w/.])((?:server|prefix_store|clients|tests|docs|bench|hardening|deploy|"
            r"examples|scripts|testing)/[\w./-]*[\w/])",
            text,
        )
    )
    missing = sorted(path for path in named if "*" not in path and not (REPO / path).exists())
    assert not missing, f"{document.name} names paths the repository lacks: {missing}"
