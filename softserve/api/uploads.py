"""Upload bodies: read within a size limit, and multipart parsed only when it is whole.

The admission gate (softserve/api/admission.py) has already checked the key and taken an upload slot.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from softserve.service.errors import ClientGone, InvalidRequest, TooLarge

__all__ = ["read_body_limited", "parse_multipart", "part_bytes", "check_complete"]


async def read_body_limited(request: Request, limit: int) -> bytes:
    # Content-Length is only a fast path: chunked bodies or lying clients are cut off while reading.
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise TooLarge(f"request body is larger than the limit ({limit} bytes)", code="upload_too_large")
    buf = bytearray()
    try:
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise TooLarge(f"request body is larger than the limit ({limit} bytes)", code="upload_too_large")
    except ClientDisconnect:
        raise ClientGone("client closed the connection") from None
    return bytes(buf)


_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^\s;]+))', re.IGNORECASE)


def check_complete(body: bytes, content_type: str) -> None:
    """A body cut short (a dropped connection with a matching Content-Length, a broken client) must
    not be stored as if it were whole: the parser would silently drop the parts it never saw (e.g.
    adapter_config, turning a P_TUNING upload into PROMPT_TUNING). The last delimiter must close."""
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise InvalidRequest("multipart/form-data needs a boundary parameter", code="invalid_multipart")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    last = body.rfind(delimiter)
    if last < 0 or body[last + len(delimiter): last + len(delimiter) + 2] != b"--":
        raise InvalidRequest("multipart body is incomplete: it does not end with the closing boundary; "
                       "nothing was stored, send the whole upload again", code="invalid_multipart")


async def parse_multipart(request: Request, body: bytes) -> Any:
    """Parse an already size-checked, complete body with Starlette's multipart parser."""
    check_complete(body, request.headers.get("content-type", ""))
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replay = Request(request.scope, receive)
    try:
        return await replay.form(max_files=4, max_fields=8)
    except Exception as e:  # malformed multipart
        raise InvalidRequest(f"malformed multipart body: {e}", code="invalid_multipart") from None


async def part_bytes(form: Any, field: str, limit: int) -> bytes | None:
    value = form.get(field)
    if value is None:
        return None
    if isinstance(value, UploadFile):
        data = await value.read()
    else:
        data = str(value).encode("utf-8")
    if len(data) > limit:
        raise TooLarge(f"{field} is {len(data)} bytes; the limit is {limit}", param=field, code="upload_too_large")
    return data
