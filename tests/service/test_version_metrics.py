"""Per-version metrics stay bounded: 10,000 versions served through aliases give at most the cap of
series plus one "other" per tenant; unaliased traffic never gets a series of its own."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from softserve.metrics import OTHER, Metrics
from softserve.service.generation import ResolvedModel, version_series
from softserve.service.releases import CompletionLedger, give_feedback
from softserve.service.auth import Principal
from softserve.service.errors import NotFound
from softserve.store.types import PromptMeta


def _meta(tenant: str, name: str, i: int) -> PromptMeta:
    return PromptMeta(tenant=tenant, name=name, version=f"{i:012x}", sha256=f"{i:064x}", num_virtual_tokens=4,
                      token_dim=64, dtype="float32", peft_type="PROMPT_TUNING", created_at=0, description=None)


def _series(text: str, family: str) -> set[str]:
    return {m.group(1) for m in re.finditer(rf"^{family}\{{([^}}]*)\}}", text, re.M)}


def test_ten_thousand_versions_keep_cardinality_bounded():
    metrics = Metrics(tenant_labels=True, version_series=32)
    runtime = SimpleNamespace(metrics=metrics)
    for i in range(10_000):
        meta = _meta("acme" if i % 2 else "beta", f"p{i % 50}", i)
        for labels in {labels for _, labels in version_series(runtime, meta.tenant, ResolvedModel("x", meta, (), "x", ((meta, "prod"),)))}:
            metrics.versions.observe(labels, status="ok" if i % 7 else "error", tokens=3, ttft=0.01, latency=0.02)
    text = metrics.render().decode()
    for family in ("softserve_version_requests_total", "softserve_version_errors_total",
                   "softserve_version_generation_tokens_total", "softserve_version_request_latency_seconds_count"):
        series = _series(text, family)
        assert len(series) <= 32 + 2, (family, len(series))  # the cap, plus "other" for each of the 2 tenants
        assert sum(f'prompt="{OTHER}"' in s for s in series) == 2
    total = sum(float(v) for v in re.findall(r"^softserve_version_requests_total\{[^}]*\} (\S+)", text, re.M))
    assert total == 10_000  # nothing is dropped: beyond the cap it counts as "other"
    # Scraped without tenant labels (the default), the "other" series of all tenants merge into one.
    assert len(_series(Metrics(version_series=4).render().decode(), "softserve_version_requests_total")) == 0


def test_unaliased_requests_count_as_other_and_zero_turns_it_off():
    metrics = Metrics(version_series=8)
    runtime = SimpleNamespace(metrics=metrics)
    meta = _meta("acme", "task", 1)
    ((_, labels),) = version_series(runtime, "acme", ResolvedModel("task", meta, (), "task@x"))
    assert labels == ("acme", OTHER, OTHER)
    off = Metrics(version_series=0)
    ((_, labels),) = version_series(SimpleNamespace(metrics=off), "acme", ResolvedModel("task", meta, (), "x", ((meta, "prod"),)))
    off.versions.observe(labels, status="ok", tokens=1, ttft=None, latency=0.1)
    assert "softserve_version_" not in off.render().decode()


def test_feedback_is_tenant_scoped_and_the_ledger_is_bounded():
    metrics = Metrics(version_series=8)
    ledger = CompletionLedger(capacity=3)
    runtime = SimpleNamespace(metrics=metrics, completions=ledger)
    meta = _meta("acme", "task", 1)
    served = version_series(runtime, "acme", ResolvedModel("x", meta, (), "x", ((meta, "prod"),)))
    for i in range(5):
        ledger.record("acme", f"cmpl-{i}", served)
    assert ledger.lookup("acme", "cmpl-0") is None and ledger.lookup("acme", "cmpl-4") is not None
    assert give_feedback(runtime, Principal("acme", "user"), "cmpl-4", 1.0).versions[0][0] == meta
    with pytest.raises(NotFound):  # another tenant's completion id: the same as a missing one
        give_feedback(runtime, Principal("beta", "user"), "cmpl-4", 1.0)
    assert metrics.versions.snapshot("acme", "task")["000000000001"]["feedback_count"] == 1.0
