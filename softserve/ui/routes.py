"""Routes of the web console: the page, its static files, and three small JSON helpers.

    GET  /ui                                  -> redirect to /ui/
    GET  /ui/                                 the single page (index.html)
    GET  /ui/assets/{file}                    its CSS/JS (served from the installed package)
    GET  /ui/api/auth                         whether the server wants a key (no key needed: the page asks
                                              before its first keyed call, so a signed-out page logs no 401)
    GET  /ui/api/session                      who the key is (tenant, role) and what the server runs
    GET  /ui/api/stats?since=T                recent rates for the charts (see softserve/ui/stats.py)
    POST /ui/api/prompts/{name}/rollback      {"version": "..."}: make an older version the latest
    GET  /ui/api/prompts/{name}/releases      aliases, and every version with its aliases and numbers

The page, its assets and /ui/api/auth need no key (they hold no data); every other /ui/api call needs
the same API key as the rest of the API and is scoped the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from softserve.api.deps import PrincipalDep, StoreDep
from softserve.api.prompts import PromptInfo, prompt_info
from softserve.api.releases import alias_info
from softserve.service import prompts as prompt_service
from softserve.service import releases as release_service
from softserve.service.runtime import Runtime
from softserve.ui.stats import StatsHistory

__all__ = ["Console", "install_console", "STATIC_DIR", "SECURITY_HEADERS"]

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Scripts and styles only from our own files: nothing inline, nothing from elsewhere (offline by
# construction). Blob URLs are how downloads are handed to the browser.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                                "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _ConsoleStatic(StaticFiles):
    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=6, max_length=64, description="version id (or a unique prefix of >= 6 chars)")


class Console:
    """The console's state that outlives a request: the stats sampler (started by the app's lifespan)."""

    def __init__(self, stats: StatsHistory) -> None:
        self.stats = stats

    def start(self) -> None:
        self.stats.start()

    def close(self) -> None:
        self.stats.close()


def install_console(app: FastAPI, state: Runtime, *, stats_interval_s: float = 2.0) -> Console:
    console = Console(StatsHistory(state.metrics.registry, interval_s=stats_interval_s))
    router = APIRouter(include_in_schema=False)

    @router.get("/ui")
    def ui_redirect() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=308)

    @router.get("/ui/")
    def ui_index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)

    @router.get("/ui/api/auth")
    def auth() -> dict[str, bool]:
        return {"auth": state.registry.enabled}

    @router.get("/ui/api/session")
    def session(principal: PrincipalDep) -> dict[str, Any]:
        store = state.store
        return {
            "tenant": principal.tenant,
            "role": principal.role,
            "auth": state.registry.enabled,
            "ready": state.is_ready,
            "model": state.served_model_name or None,
            "hidden_size": store.model.hidden_size if store is not None else None,
            "max_virtual_tokens": state.settings.max_virtual_tokens,
            "max_tokens_limit": state.settings.max_tokens_limit,
            "max_model_len": state.max_model_len or state.settings.max_model_len,
        }

    @router.get("/ui/api/stats")
    def stats(principal: PrincipalDep, since: float | None = Query(None, ge=0)) -> dict[str, Any]:
        # Admins see every tenant's traffic; a user key only its own tenant's (like the rest of the API).
        return console.stats.view(None if principal.is_admin else principal.tenant, since=since)

    @router.post("/ui/api/prompts/{name:path}/rollback", response_model=PromptInfo)
    async def rollback(name: str, body: RollbackRequest, store: StoreDep, principal: PrincipalDep) -> dict[str, Any]:
        meta = await run_in_threadpool(prompt_service.rollback, store, principal, name, body.version)
        return prompt_info(meta, principal)

    @router.get("/ui/api/prompts/{name:path}/releases")
    def releases(name: str, store: StoreDep, principal: PrincipalDep) -> dict[str, Any]:
        # This replica's numbers, for the requests the key's own tenant made (like /ui/api/stats for users).
        views, versions = release_service.release_overview(store, state.metrics, principal, name)
        return {"aliases": [alias_info(v) for v in views],
                "versions": [{**prompt_info(v.meta, principal), "latest": v.latest, "aliases": v.aliases,
                              "numbers": v.numbers} for v in versions]}

    app.include_router(router)
    app.mount("/ui/assets", _ConsoleStatic(directory=STATIC_DIR), name="console-assets")
    return console
