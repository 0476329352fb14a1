"""Admin routes: upload, list, inspect, download and delete the caller tenant's prefixes."""

from __future__ import annotations

import asyncio
import io
import zipfile
from datetime import UTC, datetime
from typing import Annotated, Literal, NoReturn

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from starlette.datastructures import FormData, UploadFile

from prefix_store.formats.native import decode_native, encode_native
from prefix_store.formats.peft import decode_peft, encode_peft
from prefix_store.soft_prompt import Adapter, kind_of
from prefix_store.storage.names import validate_task_id
from prefix_store.storage.store import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PrefixRecord
from server.api.conditions import Conditions, delete_conditions, upload_conditions
from server.api.errors import ApiError, error_responses
from server.api.schemas import TASK_ID_PATTERN, PrefixInfo, PrefixList, TenantUsageInfo, UploadResult
from server.api.state import AppState, CallerDep, StateDep, require_admin

router = APIRouter(
    prefix="/v1/admin/prefixes",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=error_responses(401, 403, 503),
)
TaskIdPath = Annotated[
    str,
    Path(
        description="1-128 characters of [A-Za-z0-9._-], not starting with '.' (anything else is 400)",
        # documented here, checked by validate_task_id: docs/API.md answers a bad name with 400, not 422
        json_schema_extra={"pattern": TASK_ID_PATTERN, "minLength": 1, "maxLength": 128},
    ),
]
_BINARY = {"type": "string", "format": "binary"}
_UPLOAD_BODY = {  # the multipart body upload_prefix reads itself (so that nothing is buffered past the cap)
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {
                        **_BINARY,
                        "description": "a native prefix, soft prompt or LoRA task (.safetensors)",
                    },
                    "adapter_config": {**_BINARY, "description": "a PEFT adapter_config.json"},
                    "adapter_model": {**_BINARY, "description": "a PEFT adapter_model.safetensors"},
                },
                "oneOf": [{"required": ["file"]}, {"required": ["adapter_config", "adapter_model"]}],
            }
        }
    },
}


def _info(state: AppState, record: PrefixRecord) -> PrefixInfo:
    return PrefixInfo(
        task_id=record.task_id,
        version=record.version,
        kind=record.kind,
        num_virtual_tokens=record.num_virtual_tokens,
        bytes=record.bytes,
        created_at=datetime.fromtimestamp(record.created_at, UTC),
        resident=state.registry.is_resident(record),
    )


async def _read_capped(upload: UploadFile, cap: int, field: str) -> bytes:
    data = await upload.read(cap + 1)
    if len(data) > cap:
        raise ApiError(413, "payload_too_large", f"{field} is over the limit of {cap} bytes")
    return data


@router.put(
    "/{task_id}",
    response_model=UploadResult,
    status_code=201,
    responses={
        200: {"model": UploadResult, "description": "an existing prefix was replaced"},
        **error_responses(400, 409, 412, 413, 422),
    },
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_prefix(
    task_id: TaskIdPath,
    request: Request,
    response: Response,
    state: StateDep,
    who: CallerDep,
    conditions: Annotated[Conditions, Depends(upload_conditions)],
) -> UploadResult:
    """Validate fully (format, geometry, finite values, the tenant's quota), then store atomically if the
    preconditions hold (checked by the store in the same atomic step)."""
    validate_task_id(task_id)
    request.state.task_id = task_id
    form = await request.form(max_files=2, max_fields=4)
    adapter, blob, source_format = await _decode_upload(state, form)
    conditions.refuse_weak_only()
    record, replaced = await asyncio.to_thread(
        state.store.put,
        who.tenant,
        task_id,
        blob,
        num_virtual_tokens=adapter.num_virtual_tokens,
        source_format=source_format,
        kind=kind_of(adapter),
        if_match=conditions.if_match,
        if_absent=conditions.if_absent,
        quota=state.auth.limits_for(who.tenant).quota,
    )
    response.status_code = 200 if replaced else 201
    return UploadResult(
        task_id=task_id,
        version=record.version,
        kind=record.kind,
        num_virtual_tokens=record.num_virtual_tokens,
        bytes=record.bytes,
        sha256=record.sha256,
        source_format=source_format,
    )


async def _decode_upload(state: AppState, form: FormData) -> tuple[Adapter, bytes, str]:
    """The uploaded prefix, soft prompt or LoRA task, its native bytes and the format it came in; raises on
    anything invalid."""
    file, config, model = form.get("file"), form.get("adapter_config"), form.get("adapter_model")
    geometry, limits = state.base.geometry, state.settings.prefix_limits.for_dtype(state.base.dtype)
    if isinstance(file, UploadFile) and config is None and model is None:
        blob = await _read_capped(file, limits.max_file_bytes, "file")
        adapter = await asyncio.to_thread(decode_native, blob, geometry, limits)
        source_format = "native"
    elif isinstance(config, UploadFile) and isinstance(model, UploadFile) and file is None:
        config_bytes = await _read_capped(config, limits.max_config_bytes, "adapter_config")
        model_bytes = await _read_capped(model, limits.max_file_bytes, "adapter_model")
        adapter = await asyncio.to_thread(decode_peft, config_bytes, model_bytes, geometry, limits)
        blob, source_format = encode_native(adapter, geometry), "peft"
    else:
        raise ApiError(
            400,
            "invalid_request",
            "send multipart field 'file' (a native prefix, soft prompt or LoRA task) or both "
            "'adapter_config' and 'adapter_model' (a PEFT PREFIX_TUNING, PROMPT_TUNING, P_TUNING or LORA adapter)",
        )
    adapter.to("cpu", state.base.dtype)  # refuse values the server's dtype cannot hold, before storing
    return adapter, blob, source_format


@router.get("", response_model=PrefixList, responses=error_responses(400, 422))
@router.get(  # not the task id "": the list
    "/", response_model=PrefixList, responses=error_responses(400, 422), include_in_schema=False
)
async def list_prefixes(
    state: StateDep,
    who: CallerDep,
    limit: Annotated[
        int, Query(ge=1, le=MAX_PAGE_SIZE, description="records on this page")
    ] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[
        str | None,
        Query(
            description="the previous page's next_cursor (none: the first page); not a task id: 400",
            # documented here, checked by the store: a bad cursor is a 400 with the naming rule, not a 422
            json_schema_extra={"pattern": TASK_ID_PATTERN, "minLength": 1, "maxLength": 128},
        ),
    ] = None,
) -> PrefixList:
    """One page of the tenant's tasks, by task id; ``next_cursor`` asks for the next (null: the last page).
    Every task present throughout a walk is on exactly one of its pages, whatever is uploaded meanwhile."""
    page = await asyncio.to_thread(state.store.list_page, who.tenant, cursor=cursor, limit=limit)
    usage = await asyncio.to_thread(state.store.usage, who.tenant)
    limits = state.auth.limits_for(who.tenant)
    return PrefixList(
        prefixes=[_info(state, record) for record in page.records],
        next_cursor=page.next_cursor,
        usage=TenantUsageInfo(
            prefixes=usage.prefixes,
            bytes=usage.bytes,
            max_prefixes=limits.max_prefixes,
            max_prefix_bytes=limits.max_prefix_bytes,
        ),
    )


@router.get("/{task_id}", response_model=PrefixInfo, responses=error_responses(400, 404, 422))
async def get_prefix(task_id: TaskIdPath, state: StateDep, who: CallerDep) -> PrefixInfo:
    record = await asyncio.to_thread(state.store.head, who.tenant, validate_task_id(task_id))
    return _info(state, record)


@router.get(
    "/{task_id}/download",
    response_class=Response,
    responses={
        200: {
            "description": "format=native: the stored .safetensors bytes; format=peft: a zip archive of a PEFT "
            "adapter folder (adapter_config.json, adapter_model.safetensors)",
            "content": {
                "application/octet-stream": {"schema": _BINARY},
                "application/zip": {"schema": _BINARY},
            },
            "headers": {"ETag": {"description": "the version, quoted", "schema": {"type": "string"}}},
        },
        **error_responses(400, 404, 422),
    },
)
async def download_prefix(
    task_id: TaskIdPath,
    state: StateDep,
    who: CallerDep,
    format: Annotated[
        Literal["native", "peft"],
        Query(description="native (the stored file) or peft (a PEFT adapter, zipped)"),
    ] = "native",
) -> Response:
    record = await asyncio.to_thread(state.store.head, who.tenant, validate_task_id(task_id))
    blob = await asyncio.to_thread(state.store.get_blob, record)
    headers = {"ETag": f'"{record.version}"'}
    if format == "native":
        headers["Content-Disposition"] = f'attachment; filename="{task_id}.safetensors"'
        return Response(blob, media_type="application/octet-stream", headers=headers)
    archive = await asyncio.to_thread(_peft_archive, state, blob)
    headers["Content-Disposition"] = f'attachment; filename="{task_id}.zip"'
    return Response(archive, media_type="application/zip", headers=headers)


def _peft_archive(state: AppState, blob: bytes) -> bytes:
    """A stored task as a zipped PEFT adapter folder (``PrefixValidationError`` where it has no PEFT form)."""
    geometry, limits = state.base.geometry, state.settings.prefix_limits.for_dtype(state.base.dtype)
    files = encode_peft(decode_native(blob, geometry, limits), geometry, state.base.model_id)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in sorted(files.items()):
            archive.writestr(name, content)
    return buffer.getvalue()


@router.delete("/{task_id}", status_code=204, responses=error_responses(400, 404, 412, 422))
async def delete_prefix(
    task_id: TaskIdPath,
    state: StateDep,
    who: CallerDep,
    conditions: Annotated[Conditions, Depends(delete_conditions)],
) -> Response:
    validate_task_id(task_id)
    conditions.refuse_weak_only()
    await asyncio.to_thread(state.store.delete, who.tenant, task_id, if_match=conditions.if_match)
    state.registry.forget(who.tenant, task_id)
    return Response(status_code=204)


@router.api_route(
    "/{task_path:path}", methods=["GET", "PUT", "DELETE"], response_model=None, include_in_schema=False
)
async def refuse_task_path(task_path: str) -> NoReturn:
    """Registered last: what reaches it has a "/" in its task id (``team/summarize``, ``a%2Fb``,
    ``team/summarize/download``), which no route above matches. A name, never a path: 400 with the
    naming rule (as for any other bad task id), not the router's bare 404."""
    validate_task_id(task_path)  # raises: a valid name has no "/" and would have matched above
    raise ApiError(404, "not_found", "Not Found")
