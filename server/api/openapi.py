"""The OpenAPI document with the server's configured generation limits written into the request schemas,
so that clients (and fuzzers) read the bounds this server enforces: ``max_new_tokens``/``max_tokens`` ≤
``--max-new-tokens`` with the default an unset field gets, at most ``max_stop_sequences`` stop sequences
of 1 to ``max_stop_sequence_chars`` characters."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI

from server.api.errors import is_openai_path
from server.api.openai.protocol import COMPLETIONS_DEFAULT_MAX_TOKENS
from server.api.plan import AS_MANY_AS_FIT_TOKENS
from server.api.schemas import GenerateBody
from server.config import ServeSettings

# request schema -> its fields bounded by the server's max_new_tokens, and what an unset one means:
# that many tokens (cut to the limit), or None: as many as fit in the model's context
_TOKEN_FIELDS: dict[str, dict[str, int | None]] = {
    "GenerateBody": {"max_new_tokens": GenerateBody.model_fields["max_new_tokens"].default},
    "CompletionRequest": {"max_tokens": COMPLETIONS_DEFAULT_MAX_TOKENS},
    "ChatCompletionRequest": {"max_tokens": None, "max_completion_tokens": None},
}


def install_openapi(app: FastAPI, settings: ServeSettings) -> None:
    """Make ``app.openapi()`` (and so ``GET /openapi.json``) carry ``settings``' limits."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            apply_limits(document["components"]["schemas"], settings)
            drop_openai_422(document)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def drop_openai_422(document: dict[str, Any]) -> None:
    """The OpenAI routes answer schema errors with 400: take out the 422 FastAPI declares for them (and its
    schemas, once nothing refers to them)."""
    for path, operations in document["paths"].items():
        if is_openai_path(path):
            for operation in operations.values():
                operation["responses"].pop("422", None)
    if "#/components/schemas/HTTPValidationError" not in json.dumps(document["paths"]):
        for name in ("HTTPValidationError", "ValidationError"):
            document["components"]["schemas"].pop(name, None)


def apply_limits(components: dict[str, Any], settings: ServeSettings) -> None:
    """Bound the generation fields of the request schemas in ``components`` in place."""
    limit = settings.max_new_tokens
    for name, token_fields in _TOKEN_FIELDS.items():
        properties = components.get(name, {}).get("properties", {})
        for field, default in token_fields.items():
            prop = properties.get(field, {})
            if limit is not None:
                for branch in _branches(prop, "integer"):
                    branch["maximum"] = limit
            if default is None:
                unset = f"as many as fit in the model's context, up to {limit or AS_MANY_AS_FIT_TOKENS}"
            else:
                prop["default"] = default if limit is None else min(default, limit)  # cut to the limit
                unset = f"{prop['default']}, cut to what the model's context leaves"
            bound = f"{limit} (this server's limit)" if limit else "what the model's context leaves"
            prop["description"] = f"at most {bound}; unset: {unset}"
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
