"""The preconditions of a prefix upload or delete (RFC 9110 §13.1): ``If-Match`` (``*``, a list of entity
tags compared strongly, or one bare version) and ``If-None-Match: *`` (create only), parsed into what the
store checks in the same atomic step as its write."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Header, Request

from prefix_store.storage.excerpt import excerpt
from prefix_store.storage.store import ANY_VERSION
from server.api.errors import ApiError

# the conditional headers, as the OpenAPI document shows them (``_header_list`` reads every line of them)
IfMatchHeader = Annotated[
    str | None,
    Header(
        description='the task\'s current version: "*" (any), entity tags ("<version>", the ETag of the '
        "download; weak W/ tags never match) or one bare version; otherwise 412",
    ),
]
IfNoneMatchHeader = Annotated[
    str | None,
    Header(description='"*": create the task only if it does not exist (otherwise 412)'),
]

_MAX_ENTITY_TAGS = 64
# one element of an entity-tag list (RFC 9110 §8.8.3), then "," or the end: [W/]"<etagc>*", or a bare
# version (docs/API.md takes the version unquoted too, as the SDK and the CLI send it)
_LIST_ELEMENT = re.compile(r'[ \t]*(?:(W/)?"([^"\x00-\x20\x7f]*)"|([^",\x00-\x20\x7f]+))?[ \t]*(,|\Z)')


@dataclass(frozen=True)
class Conditions:
    """The store's preconditions of a request's ``If-Match`` and ``If-None-Match`` (RFC 9110 §13.1)."""

    if_match: str | tuple[str, ...] | None = None  # ANY_VERSION, or the versions of the strong tags
    if_absent: bool = False  # If-None-Match: *
    weak_only: str | None = None  # an If-Match that lists only weak tags (which never match), as sent

    @classmethod
    def of(cls, if_match: str | None, if_none_match: str | None) -> Conditions:
        """Parse the headers' values; 400 for a malformed one, an ``If-None-Match`` other than ``*``, or
        both headers (they cannot both hold)."""
        if if_match is not None and if_none_match is not None:
            raise ApiError(
                400, "invalid_request", "send If-Match or If-None-Match, not both: they cannot both hold"
            )
        if if_none_match is not None:
            value = if_none_match.strip(" \t")
            if value != "*":
                raise ApiError(
                    400,
                    "invalid_request",
                    f"If-None-Match on an upload takes only * (create the task only if it does not exist), "
                    f"not {excerpt(value)}",
                )
            return cls(if_absent=True)
        if if_match is None:
            return cls()
        value = if_match.strip(" \t")
        if value == "*":
            return cls(if_match=ANY_VERSION)
        tags = _entity_tags(value)
        strong = tuple(opaque for weak, opaque in tags if not weak)
        return cls(if_match=strong, weak_only=None if strong else value)

    def refuse_weak_only(self) -> None:
        """412 for an ``If-Match`` that names only weak tags: it compares strongly, so none can match."""
        if self.weak_only is not None:
            raise ApiError(
                412,
                "precondition_failed",
                f"If-Match {excerpt(self.weak_only)} names only weak entity tags, which never match: "
                'If-Match compares strongly; send the version, or the ETag of the download ("<version>")',
            )


def upload_conditions(
    request: Request, if_match: IfMatchHeader = None, if_none_match: IfNoneMatchHeader = None
) -> Conditions:
    """The preconditions of an upload (the parameters document the headers; every line is read)."""
    return Conditions.of(_header_list(request, "if-match"), _header_list(request, "if-none-match"))


def delete_conditions(request: Request, if_match: IfMatchHeader = None) -> Conditions:
    """The preconditions of a delete: ``If-Match`` only (an ``If-None-Match`` could only refuse: it is
    refused, not ignored)."""
    if "if-none-match" in request.headers:
        raise ApiError(400, "invalid_request", "DELETE takes If-Match, not If-None-Match")
    return Conditions.of(_header_list(request, "if-match"), None)


def _header_list(request: Request, name: str) -> str | None:
    """A header sent in one line or several, as one comma-separated list (RFC 9110 §5.3); None if absent."""
    lines = request.headers.getlist(name)
    return ", ".join(lines) if lines else None


def _entity_tags(value: str) -> list[tuple[bool, str]]:
    """``(weak, opaque tag)`` of each element of an ``If-Match`` list (empty elements skipped); a bare
    version alone is a strong tag. 400 for anything else, or more than 64 tags."""
    tags: list[tuple[bool, str]] = []
    bare, position = False, 0
    while True:
        element = _LIST_ELEMENT.match(value, position)
        if element is None:
            raise _malformed_if_match(value)
        weak, quoted, unquoted, separator = element.groups()
        if quoted is not None:
            tags.append((weak is not None, quoted))
        elif unquoted is not None:
            tags.append((unquoted.startswith("W/"), unquoted.removeprefix("W/")))
            bare = True
        if not separator:
            break
        position = element.end()
    if not tags or (bare and len(tags) > 1):  # a bare version is only ever sent alone
        raise _malformed_if_match(value)
    if len(tags) > _MAX_ENTITY_TAGS:
        raise ApiError(
            400,
            "invalid_request",
            f"If-Match lists {len(tags)} entity tags, over the limit of {_MAX_ENTITY_TAGS}",
        )
    return tags


def _malformed_if_match(value: str) -> ApiError:
    return ApiError(
        400,
        "invalid_request",
        'If-Match takes *, entity tags ("<version>", as the ETag of the download) or one bare version, '
        f"not {excerpt(value)}",
    )
