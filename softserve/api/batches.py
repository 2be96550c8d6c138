"""The Batch API (OpenAI's shape; tenant-scoped), and how a batch line is answered.

    POST /v1/batches                 {"input_file_id", "endpoint", "completion_window": "24h", "metadata"?}
    GET  /v1/batches                 after, limit: newest first
    GET  /v1/batches/{id}
    POST /v1/batches/{id}/cancel
    GET  /v1/files/{id}/content      a file's bytes (a batch's output and error files, uploads)

Input files are uploaded with `POST /v1/files` and purpose `batch`. The operations live in
softserve/service/batches.py, the runner in softserve/batch/runner.py; `RouteLineExecutor` answers each
line with the very code of /v1/completions and /v1/chat/completions, as a background row.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from softserve.api import schemas as S
from softserve.api.errors import error_body, service_error_body, http_status
from softserve.api.openai_params import check_supported
from softserve.api.openai_routes import run_chat_completion, run_completion
from softserve.batch.lines import LineResult
from softserve.service import batches as service
from softserve.service.auth import Principal
from softserve.service.batches import BatchCreateRequest, BatchService
from softserve.service.errors import NotFound, ServiceError
from softserve.service.runtime import Runtime
from softserve.service.tuning import get_file

from .deps import PrincipalDep, TuningDep

__all__ = ["router", "RouteLineExecutor"]

router = APIRouter(tags=["batches"])

_SCHEMAS = {"/v1/completions": S.CompletionRequest, "/v1/chat/completions": S.ChatCompletionRequest}


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0] if exc.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ()))
    return f"body.{loc}: {first.get('msg', 'invalid')}" if loc else f"body: {first.get('msg', 'invalid')}"


class RouteLineExecutor:
    """Answers batch lines with the routes' own code, in process (no HTTP), as background rows."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def check(self, endpoint: str, body: dict[str, Any]) -> str | None:
        try:
            check_supported(_SCHEMAS[endpoint].model_validate(body))
        except ValidationError as exc:
            return _validation_message(exc)
        except ServiceError as exc:
            return exc.message
        return None

    async def run(self, tenant: str, role: str, endpoint: str, body: dict[str, Any], request_id: str) -> LineResult:
        principal = Principal(tenant=tenant, role=role)
        try:
            request = _SCHEMAS[endpoint].model_validate(body)
            run = run_completion if endpoint == "/v1/completions" else run_chat_completion
            response = await run(request, self.runtime, principal, request_id=request_id, background=True,
                                 assignment=request.user or None)
        except ValidationError as exc:
            return LineResult(400, error_body(400, _validation_message(exc), code="invalid_parameter"))
        except ServiceError as exc:
            return LineResult(http_status(exc), service_error_body(exc))
        return LineResult(200, response.model_dump(mode="json"))


def get_batches(request: Request) -> BatchService:
    return request.app.state.batches


BatchesDep = Annotated[BatchService, Depends(get_batches)]


@router.post("/v1/batches")
async def create_batch(body: BatchCreateRequest, batches: BatchesDep, principal: PrincipalDep) -> dict[str, Any]:
    return await run_in_threadpool(service.create_batch, batches, principal, body)  # reads the file: off the loop


@router.get("/v1/batches")
def list_batches(batches: BatchesDep, principal: PrincipalDep, limit: int = Query(20, ge=1, le=100),
                 after: str | None = Query(None, description="a batch id: list older batches")) -> dict[str, Any]:
    return service.list_batches(batches, principal, after=after, limit=limit)


@router.get("/v1/batches/{batch_id}")
def get_batch(batch_id: str, batches: BatchesDep, principal: PrincipalDep) -> dict[str, Any]:
    return service.get_batch(batches, principal, batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, batches: BatchesDep, principal: PrincipalDep) -> dict[str, Any]:
    return service.cancel_batch(batches, principal, batch_id)


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, manager: TuningDep, principal: PrincipalDep) -> Response:
    get_file(manager, principal, file_id)
    try:
        data = manager.files.read_bytes(principal.tenant, file_id)
    except KeyError:
        raise NotFound(f"file {file_id!r} not found", param="file_id", code="file_not_found") from None
    return Response(data, media_type="application/jsonl")
