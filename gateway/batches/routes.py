"""``/v1/files`` and ``/v1/batches``, shaped like OpenAI's so the official SDK works unchanged.

Everything is scoped to the API key that created it: another key sees 404, as if the object
did not exist. ``DELETE /v1/batches/{id}`` (not in OpenAI's API) removes a finished batch's
record and its output files at once.
"""

from __future__ import annotations

import json
import secrets
from urllib.parse import quote
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from gateway.batches.files import FileTooLarge, new_file_id
from gateway.batches.service import BatchService
from gateway.batches.store import ACTIVE, now
from gateway.batches.upload import receive_upload
from broker_config.messages import ENDPOINTS
from gateway.context import GatewayContext, get_context, require_api_key
from gateway.errors import APIError
from gateway.http_guard import file_too_large

files_router = APIRouter(prefix="/v1/files")
batches_router = APIRouter(prefix="/v1/batches")
Owner = Annotated[str, Depends(require_api_key)]
Ctx = Annotated[GatewayContext, Depends(get_context)]


def _service(request: Request) -> BatchService:
    service = getattr(request.app.state, "batches", None)
    if service is None:
        raise APIError(503, "The batch service is not running.", code="service_unavailable")
    return service


Service = Annotated[BatchService, Depends(_service)]
Limit = Annotated[int, Query(ge=1, le=10_000)]


def upload_quota_exceeded(cap: int, used: int) -> APIError:
    """Per-key storage cap: 429 as OpenAI does for quotas, but not worth an automatic retry."""
    err = APIError(429, f"This API key's files would exceed its storage limit of {cap} bytes ({used} bytes in "
                        "use, batch outputs included). Delete files you no longer need (DELETE /v1/files/{id}).",
                   code="upload_quota_exceeded", param="file", type="insufficient_quota")
    err.headers["x-should-retry"] = "false"
    return err


def open_batches_exceeded(cap: int) -> APIError:
    err = APIError(429, f"This API key already has {cap} open batches, its limit. Wait for one to complete, "
                        "or cancel one, then try again.", code="open_batches_limit_exceeded")
    err.headers["x-should-retry"] = "false"  # batches take minutes to hours: the SDK's quick retries cannot help
    return err


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


# ---------------------------------------------------------------------------------------- files


def content_disposition(filename: str) -> str:
    """``attachment`` with any stored name (RFC 6266): an ASCII fallback without quotes, backslashes
    or control characters, and the name itself as ``filename*`` (UTF-8, percent-encoded). A header
    holds no NUL, CR or LF and only latin-1, so the name as given (``☃``, one with a NUL) cannot go
    in as it is: the server would fail on it (500, or a dropped connection)."""
    printable = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in filename) or "file"
    clean = "".join(c for c in filename if c >= " " and c != "\x7f") or "file"
    return f"attachment; filename=\"{printable}\"; filename*=UTF-8''{quote(clean, safe='')}"



def file_object(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "expires_at": row["expires_at"], "filename": row["filename"], "purpose": row["purpose"],
            "status": "processed", "status_details": None}


def _file(service: BatchService, file_id: str, owner: str) -> Any:
    row = service.store.get_file(file_id, owner)
    if row is None:
        raise APIError(404, f"No such File object: {file_id}", code="not_found", param="file_id")
    return row


def _upload_ttl(fields: dict[str, str], default: float) -> float:
    """The file's lifetime: the service's default, shortened by ``expires_after``."""
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if seconds is None:
        return default
    if anchor not in (None, "created_at") or not seconds.isdigit() or not 3600 <= int(seconds) <= 30 * 86400:
        raise APIError(400, "expires_after needs anchor 'created_at' and seconds between 3600 and 2592000.",
                       code="invalid_request", param="expires_after")
    return min(default, int(seconds))


_UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["batch"]},
                   "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                   "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000}}}}}}}


@files_router.post("", openapi_extra=_UPLOAD_FORM)
async def upload_file(owner: Owner, service: Service, ctx: Ctx, request: Request) -> JSONResponse:
    """Multipart fields: ``file``, ``purpose`` (``batch``), optional ``expires_after[anchor|seconds]``.

    The body is streamed to its place as it arrives (see upload.py), stopping as soon as the file
    size limit or the key's upload quota is passed; the key was checked before any of it was read
    (gateway/http_guard.py).
    """
    cap = ctx.limits(owner).upload_bytes  # 0: no per-key cap
    used = service.store.stored_bytes(owner) if cap else 0
    if cap and used >= cap:
        raise upload_quota_exceeded(cap, used)
    max_bytes = service.settings.max_file_bytes
    room = cap - used if cap else max_bytes
    file_id = new_file_id()
    try:
        upload = await receive_upload(request, service.files, file_id, min(max_bytes, room))
    except FileTooLarge:
        if room < max_bytes:
            raise upload_quota_exceeded(cap, used) from None
        raise file_too_large(max_bytes) from None
    try:
        purpose = upload.fields.get("purpose")
        if purpose != "batch":
            raise APIError(400, f"Unsupported purpose {purpose!r}: this service accepts only 'batch' files.",
                           code="invalid_request", param="purpose")
        ttl = _upload_ttl(upload.fields, service.settings.input_file_ttl)
    except APIError:
        service.files.delete(file_id)
        raise
    filename = (upload.filename or "upload.jsonl").rsplit("/", 1)[-1][:255]
    if not service.store.add_upload(file_id, owner, filename, purpose, upload.size, int(now() + ttl), cap):
        service.files.delete(file_id)  # another upload of this key took the room meanwhile
        raise upload_quota_exceeded(cap, service.store.stored_bytes(owner))
    return JSONResponse(file_object(_file(service, file_id, owner)))


@files_router.get("")
async def list_files(owner: Owner, service: Service, purpose: str | None = None, limit: Limit = 10_000,
                     after: str | None = None, order: Literal["asc", "desc"] = "desc") -> JSONResponse:
    rows, more = service.store.list_files(owner, purpose=purpose, limit=limit, after=after, order=order)
    return JSONResponse(_page([file_object(r) for r in rows], more))


@files_router.get("/{file_id}")
async def retrieve_file(file_id: str, owner: Owner, service: Service) -> JSONResponse:
    return JSONResponse(file_object(_file(service, file_id, owner)))


@files_router.get("/{file_id}/content")
async def file_content(file_id: str, owner: Owner, service: Service) -> StreamingResponse:
    row = _file(service, file_id, owner)
    if not service.files.path(file_id).exists():
        raise APIError(404, f"The contents of {file_id} are gone.", code="not_found", param="file_id")
    return StreamingResponse(service.files.read_chunks(file_id), media_type="application/octet-stream",
                             headers={"Content-Disposition": content_disposition(row["filename"])})


@files_router.delete("/{file_id}")
async def delete_file(file_id: str, owner: Owner, service: Service) -> JSONResponse:
    _file(service, file_id, owner)
    service.delete_file(file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


# -------------------------------------------------------------------------------------- batches


class ExpiresAfter(BaseModel):
    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(ge=3600, le=30 * 86400)


class CreateBatch(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: ExpiresAfter | None = None


def batch_object(row: Any) -> dict[str, Any]:
    errors = json.loads(row["errors"]) if row["errors"] else None
    return {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"], "model": row["model"],
        "errors": errors, "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
        "status": row["status"], "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
        "created_at": row["created_at"], "in_progress_at": row["in_progress_at"], "expires_at": row["expires_at"],
        "finalizing_at": row["finalizing_at"], "completed_at": row["completed_at"], "failed_at": row["failed_at"],
        "expired_at": row["expired_at"], "cancelling_at": row["cancelling_at"], "cancelled_at": row["cancelled_at"],
        "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
        "usage": {"input_tokens": row["prompt_tokens"], "output_tokens": row["completion_tokens"],
                  "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
    }


def _batch(service: BatchService, batch_id: str, owner: str) -> Any:
    row = service.store.get_batch(batch_id, owner)
    if row is None:
        raise APIError(404, f"No such batch: {batch_id}", code="not_found", param="batch_id")
    return row


@batches_router.post("")
async def create_batch(body: CreateBatch, owner: Owner, service: Service, ctx: Ctx) -> JSONResponse:
    if body.endpoint not in ENDPOINTS:
        raise APIError(400, f"Unsupported endpoint '{body.endpoint}': use one of {', '.join(ENDPOINTS)}.",
                       code="invalid_request", param="endpoint")
    if body.completion_window != "24h":
        raise APIError(400, "completion_window must be '24h'.", code="invalid_request", param="completion_window")
    if body.metadata is not None and (len(body.metadata) > 16 or any(len(k) > 64 or len(v) > 512
                                                                       for k, v in body.metadata.items())):
        raise APIError(400, "metadata: at most 16 keys of 64 characters, values of 512.", code="invalid_request",
                       param="metadata")
    src = service.store.get_file(body.input_file_id, owner)
    if src is None:
        raise APIError(404, f"No such File object: {body.input_file_id}", code="not_found", param="input_file_id")
    if src["purpose"] != "batch":
        raise APIError(400, "The input file must have been uploaded with purpose 'batch'.", code="invalid_request",
                       param="input_file_id")
    batch_id = "batch_" + secrets.token_hex(12)
    ttl = body.output_expires_after.seconds if body.output_expires_after else None
    cap = ctx.limits(owner).open_batches
    if not service.store.create_batch(batch_id, owner, body.endpoint, body.input_file_id, body.completion_window,
                                      now() + 24 * 3600, body.metadata, ttl, max_open=cap):
        raise open_batches_exceeded(cap)
    service.dispatcher.wake()
    return JSONResponse(batch_object(_batch(service, batch_id, owner)))


@batches_router.get("")
async def list_batches(owner: Owner, service: Service, limit: Annotated[int, Query(ge=1, le=100)] = 20,
                       after: str | None = None) -> JSONResponse:
    rows, more = service.store.list_batches(owner, limit=limit, after=after)
    return JSONResponse(_page([batch_object(r) for r in rows], more))


@batches_router.get("/{batch_id}")
async def retrieve_batch(batch_id: str, owner: Owner, service: Service) -> JSONResponse:
    return JSONResponse(batch_object(_batch(service, batch_id, owner)))


@batches_router.post("/{batch_id}/cancel")
async def cancel_batch(batch_id: str, owner: Owner, service: Service) -> JSONResponse:
    row = _batch(service, batch_id, owner)
    if row["status"] in ("validating", "in_progress"):
        service.store.set_status(batch_id, "cancelling", only_from=("validating", "in_progress"))
        service.dispatcher.wake()
    elif row["status"] not in ("cancelling", "cancelled"):
        raise APIError(409, f"Cannot cancel a batch that is {row['status']}.", code="invalid_state")
    return JSONResponse(batch_object(_batch(service, batch_id, owner)))


@batches_router.delete("/{batch_id}")
async def delete_batch(batch_id: str, owner: Owner, service: Service) -> JSONResponse:
    row = _batch(service, batch_id, owner)
    if row["status"] in ACTIVE:
        raise APIError(409, f"The batch is {row['status']}: cancel it first.", code="invalid_state")
    for file_id in (row["output_file_id"], row["error_file_id"]):
        if file_id:
            service.delete_file(file_id)
    service.store.delete_batch(batch_id)
    return JSONResponse({"id": batch_id, "object": "batch.deleted", "deleted": True})
