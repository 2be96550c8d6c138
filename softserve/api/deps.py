"""FastAPI dependencies: the runtime, the caller, and the parts of the runtime a route needs.

Routes declare what they need with these `Annotated` types; tests override them
(`app.dependency_overrides[get_store] = ...`) to mount a router on parts of a runtime.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from softserve.store.cache import PromptCache
from softserve.store.store import PromptStore
from softserve.service.auth import ApiKeyRegistry, Principal
from softserve.service.errors import Unauthenticated
from softserve.service.kv_warmer import PromptKVWarmer
from softserve.service.runtime import Runtime
from softserve.tuning.jobs import TuningManager

__all__ = ["KVWarmerDep", "OptionalRuntimeDep", "RuntimeDep", "PrincipalDep", "StoreDep", "CacheDep", "TuningDep", "get_runtime",
           "get_registry", "get_principal", "get_store", "get_cache", "get_tuning", "get_kv_warmer", "get_optional_runtime", "authenticate"]

def get_runtime(request: Request) -> Runtime:
    return request.app.state.service

def get_registry(request: Request) -> ApiKeyRegistry:
    return get_runtime(request).registry

def authenticate(registry: ApiKeyRegistry, authorization: str | None) -> Principal:
    principal = registry.authenticate(authorization)
    if principal is None:
        raise Unauthenticated("invalid or missing API key")
    return principal

def get_principal(request: Request, registry: Annotated[ApiKeyRegistry, Depends(get_registry)]) -> Principal:
    principal = request.scope.get("state", {}).get("principal")  # the admission gate checked the key
    if principal is None:
        principal = authenticate(registry, request.headers.get("authorization"))
    request.scope.setdefault("state", {})["tenant"] = principal.tenant  # for request metrics
    return principal

def get_store(request: Request) -> PromptStore:
    return get_runtime(request).require_store()

def get_cache(request: Request) -> PromptCache | None:
    return get_runtime(request).cache

def get_optional_runtime(request: Request) -> Runtime | None:
    return getattr(request.app.state, "service", None)  # routers mounted alone (tests) have no runtime

def get_kv_warmer(request: Request) -> PromptKVWarmer | None:
    runtime = get_optional_runtime(request)
    return runtime.kv_warmer if runtime is not None else None

def get_tuning(request: Request) -> TuningManager:
    return get_runtime(request).tuning.get_manager()

RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
StoreDep = Annotated[PromptStore, Depends(get_store)]
CacheDep = Annotated[PromptCache | None, Depends(get_cache)]
TuningDep = Annotated[TuningManager, Depends(get_tuning)]
KVWarmerDep = Annotated[PromptKVWarmer | None, Depends(get_kv_warmer)]
OptionalRuntimeDep = Annotated[Runtime | None, Depends(get_optional_runtime)]
