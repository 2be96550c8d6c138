"""Prompt release endpoints: aliases (`PUT/GET/DELETE /v1/prompts/{name}/aliases/{alias}`, `GET
/v1/prompts/{name}/aliases`) and `POST /v1/feedback`. Routes only: softserve/service/releases.py decides.

Included before the prompts router: its `/v1/prompts/{name:path}` would otherwise swallow "/aliases".
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from fastapi import APIRouter

from softserve.service import releases as service
from softserve.service.errors import InvalidRequest

from .deps import PrincipalDep, RuntimeDep, StoreDep

__all__ = ["router", "AliasInfo", "AliasList", "AliasBody", "FeedbackBody", "FeedbackResponse"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitArmBody(_Body):
    version: str = Field(..., min_length=1, max_length=64)
    weight: float = Field(..., ge=0)


class AliasBody(_Body):
    """Either `version` (the alias points at it) or `split` (weighted versions, 1 to 8)."""

    version: str | None = Field(None, min_length=1, max_length=64)
    split: list[SplitArmBody] | None = None


class SplitArmInfo(BaseModel):
    version: str
    weight: float


class AliasChangeInfo(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    seq: int
    at: float
    by: str | None
    from_: list[SplitArmInfo] | None = Field(None, alias="from")  # None: created
    to: list[SplitArmInfo] | None = None  # None: deleted


class AliasInfo(BaseModel):
    object: Literal["prompt.alias"] = "prompt.alias"
    id: str  # what to pass as `model`: "name@prod"
    name: str
    alias: str
    split: list[SplitArmInfo]  # one arm with weight 1 for a plain pointer
    updated_at: int
    updated_by: str | None
    history: list[AliasChangeInfo] | None = None  # GET of one alias: every change, oldest first


class AliasList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AliasInfo]


class AliasDeleted(BaseModel):
    object: Literal["prompt.alias.deleted"] = "prompt.alias.deleted"
    id: str
    deleted: bool = True


class FeedbackBody(_Body):
    id: str = Field(..., min_length=1, max_length=200)  # a completion id (cmpl-..., chatcmpl-...)
    score: float


class FeedbackResponse(BaseModel):
    object: Literal["feedback"] = "feedback"
    id: str
    score: float
    served: list[str]  # pinned refs ("name@version") the score was attributed to


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
