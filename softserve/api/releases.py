"""Prompt release endpoints: aliases (`PUT/GET/DELETE /v1/prompts/{name}/aliases/{alias}`, `GET
/v1/prompts/{name}/aliases`) and `POST /v1/feedback`. Routes only: softserve/service/releases.py decides.

Included before the prompts router: its `/v1/prompts/{name:path}` would otherwise swallow "/aliases".
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from softserve.service import releases as service
from softserve.service.errors import InvalidRequest

from .deps import PrincipalDep, RuntimeDep, StoreDep
from .schemas import AliasBody, AliasDeleted, AliasInfo, AliasList, FeedbackBody, FeedbackResponse

__all__ = ["router", "alias_info"]


def _arms(arms) -> list[dict[str, Any]]:
    return [{"version": a.version, "weight": a.weight} for a in arms]


def alias_info(view: service.AliasView, with_history: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = dict(id=view.id, name=view.name, alias=view.alias, split=_arms(view.arms),
                               updated_at=view.updated_at, updated_by=view.updated_by)
    if with_history:
        out["history"] = [{"seq": c.seq, "at": c.at, "by": c.by, "from": None if c.before is None else _arms(c.before),
                           "to": None if c.after is None else _arms(c.after)} for c in view.history]
    return out


router = APIRouter(tags=["releases"])


@router.get("/v1/prompts/{name:path}/aliases", response_model=AliasList)
def list_aliases(name: str, store: StoreDep, principal: PrincipalDep) -> dict[str, Any]:
    return {"data": [alias_info(v) for v in service.list_aliases(store, principal, name)]}


@router.get("/v1/prompts/{name:path}/aliases/{alias}", response_model=AliasInfo)
def get_alias(name: str, alias: str, store: StoreDep, principal: PrincipalDep) -> dict[str, Any]:
    return alias_info(service.get_alias(store, principal, name, alias), with_history=True)


@router.put("/v1/prompts/{name:path}/aliases/{alias}", response_model=AliasInfo)
def put_alias(name: str, alias: str, body: AliasBody, store: StoreDep, principal: PrincipalDep) -> dict[str, Any]:
    if (body.version is None) == (body.split is None):
        raise InvalidRequest("give exactly one of `version` or `split`", param="version")
    split = ([service.SplitArm(body.version, 1.0)] if body.version is not None
             else [service.SplitArm(a.version, a.weight) for a in body.split or []])
    return alias_info(service.set_alias(store, principal, name, alias, split))


@router.delete("/v1/prompts/{name:path}/aliases/{alias}", response_model=AliasDeleted)
def delete_alias(name: str, alias: str, store: StoreDep, principal: PrincipalDep) -> dict[str, Any]:
    return {"id": service.delete_alias(store, principal, name, alias).id}


@router.post("/v1/feedback", response_model=FeedbackResponse)
async def feedback(body: FeedbackBody, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    served = await run_in_threadpool(service.give_feedback, runtime, principal, body.id, body.score)
    return {"id": body.id, "score": body.score, "served": [service.served_ref(m, principal) for m, _ in served.versions]}
