"""The FastAPI application: the runtime (softserve/service) behind routes, middleware and error mapping."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, start_http_server

from softserve.api import openai_routes, prompts, releases, tuning as tuning_routes
from softserve.api.admission import AdmissionGate
from softserve.api.deps import authenticate
from softserve.api.errors import error_body, install_error_handlers
from softserve.api.middleware import RequestContextMiddleware
from softserve.config import Settings
from softserve.metrics import Metrics
from softserve.service.auth import ApiKeyRegistry
from softserve.service.errors import PermissionDenied
from softserve.service.ratelimit import RateLimiter
from softserve.service.runtime import LoadedModel, Runtime
from softserve.service.tuning import TuningService

log = logging.getLogger("softserve")


def create_app(settings: Settings, *, loaded: LoadedModel | None = None, background_load: bool = True) -> FastAPI:
    """`loaded` injects an already-loaded model (tests); otherwise the model loads in a background
    thread so /health answers at once and /ready turns 200 when the engine runs."""
    if settings.api_keys:
        registry = ApiKeyRegistry.load(settings.api_keys)
    else:
        registry = ApiKeyRegistry.disabled()
        log.warning("no --api-keys file: authentication is OFF, every request acts as tenant 'default' (local development only)")
    state = Runtime(settings=settings, registry=registry)
    tuning = TuningService(state)  # prompt-tuning jobs on the resident model
    state.tuning = tuning
    state.metrics = Metrics(tenant_labels=settings.metrics_tenant_labels, version_series=settings.version_metrics_max_series)
    state.metrics.bind(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        metrics_server = None
        if settings.metrics_port:
            # A separate listener for Prometheus: no key, on an address the operator chooses (loopback by default).
            metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host,
                                                  registry=state.metrics.scraped)
            log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
        if loaded is not None or not background_load:
            state.build(loaded)
        else:
            threading.Thread(target=state.build, name="softserve-load", daemon=True).start()
        if console is not None:
            console.start()
        tuning.start_when_loaded()  # resumes unfinished jobs found in the store
        yield
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        state.shutting_down = True
        if console is not None:
            console.close()
        tuning.close()
        state.close()

    app = FastAPI(title="Softserve", version="0.1.0", lifespan=lifespan,
                  description="Many soft prompts on one frozen LLM, OpenAI-compatible.")
    app.state.service = state
    install_error_handlers(app)
    state.rate_limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_tokens_per_minute,
                                     on_reject=lambda reason: state.metrics.rejected.labels(reason).inc())
    gate = AdmissionGate(lambda: state.registry, max_uploads=settings.max_concurrent_uploads,
                         max_uploads_per_tenant=settings.max_concurrent_uploads_per_tenant, rate_limiter=state.rate_limiter)
    app.state.admission = gate
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes,
                       max_upload_bytes=settings.max_upload_bytes + 2 * 1024 * 1024, metrics=state.metrics, gate=gate)

    app.include_router(openai_routes.router)
    app.include_router(releases.router)  # before prompts: its /v1/prompts/{name:path} would swallow /aliases
    app.include_router(prompts.router)
    app.include_router(tuning_routes.router)

    console = None
    if settings.ui:
        from softserve.ui import install_console

        console = install_console(app, state)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request):
        # With API keys, only admins read the metrics here (they show every tenant's traffic); a
        # Prometheus without a key scrapes --metrics-port instead.
        if state.registry.enabled:
            principal = authenticate(state.registry, request.headers.get("authorization"))
            if not principal.is_admin:
                raise PermissionDenied("/metrics needs an admin key (or scrape --metrics-port)")
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.is_ready:
            return {"status": "ready", "model": state.served_model_name}
        return JSONResponse(error_body(503, state.not_ready_reason(), code="not_ready"), status_code=503)

    return app
