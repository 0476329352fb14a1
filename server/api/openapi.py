"""The OpenAPI document with the server's configured generation limits written into the request schemas,
so that clients (and fuzzers) read the bounds this server enforces rather than the wire schemas' outer
bounds: ``max_new_tokens``/``max_tokens`` ≤ ``--max-new-tokens``, at most ``max_stop_sequences`` stop
sequences of 1 to ``max_stop_sequence_chars`` characters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI

from server.config import ServeSettings

_BODIES = {  # request schema -> its fields bounded by the server's max_new_tokens
    "GenerateBody": ("max_new_tokens",),
    "CompletionRequest": ("max_tokens",),
    "ChatCompletionRequest": ("max_tokens", "max_completion_tokens"),
}


def install_openapi(app: FastAPI, settings: ServeSettings) -> None:
    """Make ``app.openapi()`` (and so ``GET /openapi.json``) carry ``settings``' limits."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            apply_limits(build()["components"]["schemas"], settings)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def apply_limits(components: dict[str, Any], settings: ServeSettings) -> None:
    """Bound the generation fields of the request schemas in ``components`` in place."""
    for name, token_fields in _BODIES.items():
        properties = components.get(name, {}).get("properties", {})
        for field in token_fields:
            prop = properties.get(field, {})
            if isinstance(prop.get("default"), int):  # a default past the limit is cut to it
                prop["default"] = min(prop["default"], settings.max_new_tokens)
            for branch in _branches(prop, "integer"):
                branch["maximum"] = min(
                    branch.get("maximum", settings.max_new_tokens), settings.max_new_tokens
                )
        stop = properties.get("stop", {})
        for array in _branches(stop, "array"):
            array["maxItems"] = min(
                array.get("maxItems", settings.max_stop_sequences), settings.max_stop_sequences
            )
            _bound_string(array.setdefault("items", {"type": "string"}), settings)
        for string in _branches(stop, "string"):
            _bound_string(string, settings)


def _branches(schema: dict[str, Any], json_type: str) -> Iterator[dict[str, Any]]:
    """``schema`` or the branches of its ``anyOf`` that have ``json_type``."""
    if schema.get("type") == json_type:
        yield schema
    for branch in schema.get("anyOf", ()):
        yield from _branches(branch, json_type)


def _bound_string(schema: dict[str, Any], settings: ServeSettings) -> None:
    schema["minLength"] = 1
    schema["maxLength"] = min(
        schema.get("maxLength", settings.max_stop_sequence_chars), settings.max_stop_sequence_chars
    )
