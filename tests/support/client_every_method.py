"""Runs every public method of `softserve.client.Client` and `AsyncClient` against a mocked server
(httpx.MockTransport), then prints which methods ran and which heavy modules got imported, as JSON.
tests/cli/test_client.py runs it in a fresh interpreter: the client must never pull in torch or fastapi
(its response models live in softserve/api/schemas.py, pure pydantic). Imports no test helper on purpose."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import tempfile
import zipfile
from pathlib import Path

import httpx

from softserve import client as C

PROMPT = {"id": "p", "name": "p", "public": False, "version": "v1", "ref": "p@v1", "sha256": "0" * 64,
          "num_virtual_tokens": 2, "token_dim": 8, "dtype": "float32", "peft_type": "PROMPT_TUNING",
          "kind": "prompt_tuning", "created_at": 1}
JOB = {"id": "ftjob-1", "status": "succeeded"}
ALIAS = {"id": "p@prod", "name": "p", "alias": "prod", "split": [{"version": "v1", "weight": 1.0}], "updated_at": 1,
         "updated_by": "t:admin"}
USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


def _adapter_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("adapter_config.json", "{}")
        zf.writestr("adapter_model.safetensors", b"x")
    return buf.getvalue()


def answer(request: httpx.Request) -> httpx.Response:
    path, method = request.url.path, request.method
    if path == "/ready":
        return httpx.Response(200, json={"status": "ready"})
    if path in ("/v1/completions", "/v1/chat/completions"):
        chat = path.endswith("chat/completions")
        if json.loads(request.content).get("stream"):
            chunk = {"choices": [{"index": 0, "delta": {"content": "ok"}}]} if chat else {"choices": [{"index": 0, "text": "ok"}]}
            return httpx.Response(200, text=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n",
                                  headers={"Content-Type": "text/event-stream"})
        choice = ({"index": 0, "message": {"role": "assistant", "content": "ok"}} if chat
                  else {"index": 0, "text": "ok"})
        return httpx.Response(200, json={"id": "x", "created": 1, "model": "p", "choices": [choice], "usage": USAGE})
    if path == "/v1/models":
        return httpx.Response(200, json={"object": "list", "data": [{"id": "p"}]})
    if path == "/v1/prompts":
        return httpx.Response(200, json={"data": [PROMPT], "has_more": False})
    if path == "/v1/prompts/p/versions":
        return httpx.Response(200, json={"id": "p", "data": [PROMPT]})
    if path == "/v1/prompts/p/download":
        return httpx.Response(200, content=_adapter_zip())
    if path == "/v1/prompts/p/aliases":
        return httpx.Response(200, json={"object": "list", "data": [ALIAS]})
    if path == "/v1/prompts/p/aliases/prod":
        return httpx.Response(200, json={"id": "p@prod", "deleted": True} if method == "DELETE" else ALIAS)
    if path == "/v1/feedback":
        return httpx.Response(200, json={"id": "x", "score": 1.0, "served": ["p@v1"]})
    if path == "/v1/prompts/p":
        return httpx.Response(200, json={"id": "p", "deleted": True} if method == "DELETE" else PROMPT)
    if path in ("/v1/tuning/jobs", "/v1/tuning/jobs/ftjob-1/events", "/v1/tuning/jobs/ftjob-1/checkpoints") and method == "GET":
        return httpx.Response(200, json={"object": "list", "data": [JOB], "has_more": False})
    if path.startswith("/v1/tuning/jobs"):
        return httpx.Response(200, json=JOB)
    return httpx.Response(404, json={"error": {"message": f"no {method} {path}", "type": "not_found_error"}})


def calls(client, adapter: Path, out: Path) -> dict[str, object]:
    """name -> the (possibly awaitable / async-iterable) result of each public method."""
    msgs = [{"role": "user", "content": "hi"}]
    return {
        "complete": client.complete("p", "hi"), "chat": client.chat("p", msgs),
        "stream_complete": client.stream_complete("p", "hi"), "stream_chat": client.stream_chat("p", msgs),
        "models": client.models(), "ready": client.ready(), "wait_ready": client.wait_ready(timeout=5),
        "prompts.push": client.prompts.push(adapter, "p"), "prompts.list": client.prompts.list(),
        "prompts.list_page": client.prompts.list_page(), "prompts.get": client.prompts.get("p"),
        "prompts.versions": client.prompts.versions("p"), "prompts.delete": client.prompts.delete("p"),
        "prompts.pull": client.prompts.pull("p", out),
        "prompts.set_alias": client.prompts.set_alias("p", "prod", split={"v1": 1.0}),
        "prompts.aliases": client.prompts.aliases("p"), "prompts.get_alias": client.prompts.get_alias("p", "prod"),
        "prompts.delete_alias": client.prompts.delete_alias("p", "prod"), "feedback": client.feedback("x", 1.0),
        "tuning.create": client.tuning.create(name="t"), "tuning.get": client.tuning.get("ftjob-1"),
        "tuning.list": client.tuning.list(), "tuning.cancel": client.tuning.cancel("ftjob-1"),
        "tuning.events": client.tuning.events("ftjob-1"), "tuning.checkpoints": client.tuning.checkpoints("ftjob-1"),
        "tuning.wait": client.tuning.wait("ftjob-1", poll_interval=0.01),
    }


async def resolve(results: dict[str, object]) -> dict[str, object]:
    out = {}
    for name, value in results.items():
        if hasattr(value, "__aiter__"):
            value = [d async for d in value]
        elif asyncio.iscoroutine(value):
            value = await value
        out[name] = value
    return out


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    with C.Client("http://mock", http_client=httpx.Client(transport=httpx.MockTransport(answer))) as client:
        sync = calls(client, adapter, tmp / "sync")
        sync = {k: list(v) if k.startswith("stream") else v for k, v in sync.items()}

    async def run_async():
        http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        async with C.AsyncClient("http://mock", http_client=http) as client:
            return await resolve(calls(client, adapter, tmp / "async"))

    async_ = asyncio.run(run_async())
    same = {k for k in sync if repr(sync[k]).replace(str(tmp / "sync"), "") == repr(async_[k]).replace(str(tmp / "async"), "")}
    print(json.dumps({"methods": sorted(sync), "same_sync_async": sorted(same),
                      "heavy": sorted(m for m in ("torch", "fastapi", "starlette", "softserve.api.prompts") if m in sys.modules)}))


if __name__ == "__main__":
    main()
