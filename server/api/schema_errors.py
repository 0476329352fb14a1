"""A request body that does not match its schema, said for a client: every problem with its place
(``messages.0.content: …``), invalid JSON with its line and column, a body that is not a JSON object with
what came instead; the field at fault and OpenAI's code for the kind of problem. What the caller sent is
quoted in excerpts only: a field name, a problem's text and the number of problems listed are bounded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from fastapi import Request

from prefix_store.storage.excerpt import EXCERPT_CHARS, excerpt


class SchemaError(NamedTuple):
    message: str  # every problem, "; "-separated
    param: str | None  # the first problem's field, as OpenAI writes it; None: the whole body
    code: str  # OpenAI's code for the first problem's kind


_BODY_RULE = "the body must be a JSON object (content-type: application/json)"
_MAX_PROBLEMS = 10  # problems listed in a message; the rest are counted
_MAX_PROBLEM_CHARS = 300  # of pydantic's text of one problem (a validator's may quote the input)
_MAX_MESSAGE_CHARS = 2000
_JSON_KINDS = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}


# OpenAI's codes for the kinds of schema error it names; any other is "invalid_value" ("invalid_type")
_SCHEMA_CODES = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "unsupported_parameter": "unsupported_parameter",
}
# the branch names pydantic puts in a location inside a union (``content.list[ContentPart].0``)
_UNION_BRANCHES = {"str", "int", "float", "bool", "list", "dict", "none"}


def describe_schema_errors(errors: Sequence[Any], body: Any, request: Request) -> SchemaError:
    """A ``RequestValidationError``'s errors as one: the problems in the message (the first ten, then how
    many more), the first one's field as ``param`` and its kind as ``code`` (for the OpenAI shape)."""
    problems = [_schema_problem(error, body, request) for error in errors[:_MAX_PROBLEMS]]
    if len(errors) > _MAX_PROBLEMS:
        problems.append(f"and {len(errors) - _MAX_PROBLEMS} more problems")
    first = errors[0] if errors else {"loc": (), "type": ""}
    kind = first["type"]
    code = _SCHEMA_CODES.get(kind, "invalid_type" if kind.endswith("_type") else "invalid_value")
    message = "; ".join(problems)
    if len(message) > _MAX_MESSAGE_CHARS:
        message = f"{message[:_MAX_MESSAGE_CHARS]}…"
    return SchemaError(message, _param(first["loc"]), code)


def _param(loc: Sequence[Any]) -> str | None:
    """The field a location names, as OpenAI writes it (``messages.0.content``); None: the whole body."""
    if not loc or loc[0] != "body" or (len(loc) == 2 and isinstance(loc[1], int)):  # a JSON offset
        return None
    parts: list[str] = []
    for part in loc[1:]:
        if isinstance(part, str) and (part in _UNION_BRANCHES or not part.isidentifier()):
            break  # pydantic's name of a union's branch, not a field
        text = str(part)  # a caller's name for an unknown field can be as long as the body
        parts.append(text if len(text) <= EXCERPT_CHARS else f"{text[:EXCERPT_CHARS]}…")
    return ".".join(parts) or None


def _schema_problem(error: Any, body: Any, request: Request) -> str:
    """One of a ``RequestValidationError``'s errors, said for a client: where, and what is wrong."""
    loc = tuple(error["loc"])
    if error["type"] == "json_invalid":
        return _invalid_json(error, body)
    if loc == ("body",) and error["type"] in ("missing", "model_attributes_type", "dict_type"):
        return f"{_BODY_RULE}; {_what_came(error.get('input'), request)}"
    where = ".".join(_place(part) for part in loc if part != "body") or "body"
    what = error["msg"]
    if len(what) > _MAX_PROBLEM_CHARS:
        what = f"{what[:_MAX_PROBLEM_CHARS]}… ({len(what)} characters)"
    return f"{where}: {what}"


def _place(part: Any) -> str:
    """One step of a problem's location: a field name or an index, a long name (a caller's unknown
    field) quoted as an excerpt."""
    text = str(part)
    return text if len(text) <= EXCERPT_CHARS else excerpt(text)


def _invalid_json(error: Any, document: Any) -> str:
    """``invalid JSON: <reason> at line L column C`` (FastAPI gives the reason and the offset only)."""
    reason = error.get("ctx", {}).get("error", "not JSON")
    offset = error["loc"][-1]
    if not isinstance(document, str) or not isinstance(offset, int):
        return f"invalid JSON: {reason}"
    line = document.count("\n", 0, offset) + 1
    column = offset - document.rfind("\n", 0, offset)  # as json.JSONDecodeError counts: from 1
    return f"invalid JSON: {reason} at line {line} column {column}"


def _what_came(body: Any, request: Request) -> str:
    if isinstance(body, bytes | bytearray):  # not parsed: the content type is not JSON
        content_type = request.headers.get("content-type")
        return f"got content-type {excerpt(content_type)}" if content_type else "got no content-type"
    if body is None:
        return "got no body"
    return f"got {_JSON_KINDS.get(type(body), 'another JSON value')}"
