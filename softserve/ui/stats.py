"""A short in-memory history of the server's own metrics, for the console's charts.

A sampler thread reads the Prometheus registry (the same numbers `/metrics` serves) every few
seconds and keeps the last few minutes. A reader gets rates between samples, cut down to what its
key may see: a user key gets its own tenant's request and token rates; an admin key gets every
tenant's. Server-wide load (queue depth, batch size, cache hit rates, time to first token) carries
no tenant names and is shown to every key.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Sample", "StatsHistory", "read_sample"]

# Prometheus sample names (counters' samples end in _total; we drop it) -> our field names.
_GLOBAL = {
    "softserve_queue_depth": "queue_depth",
    "softserve_running_requests": "running",
    "softserve_engine_batch_size_sum": "batch_rows",
    "softserve_engine_batch_size_count": "steps",
    "softserve_time_to_first_token_seconds_sum": "ttft_sum",
    "softserve_time_to_first_token_seconds_count": "ttft_count",
    "softserve_prompt_cache_hits": "prompt_cache_hits",
    "softserve_prompt_cache_misses": "prompt_cache_misses",
    "softserve_kv_prefix_cache_hits": "kv_cache_hits",
    "softserve_kv_prefix_cache_misses": "kv_cache_misses",
    "softserve_kv_pool_tokens": "kv_pool_tokens",
    "softserve_kv_pool_used_tokens": "kv_pool_used_tokens",
}
UNATTRIBUTED = "*"  # not a valid tenant name (NAME_RE)
GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
_PER_TENANT = {
    "softserve_generation_tokens": "generated_tokens",
    "softserve_prompt_tokens": "prompt_tokens",
    "softserve_virtual_tokens": "virtual_tokens",
}


@dataclass
class Sample:
    t: float  # wall-clock seconds
    server: dict[str, float] = field(default_factory=dict)
    tenants: dict[str, dict[str, float]] = field(default_factory=dict)  # tenant -> counter -> value


def read_sample(registry, now: float | None = None) -> Sample:
    """One snapshot of the registry. Only generation requests count as requests, so the console's
    own polling (prompt lists, job status) does not show up as load."""
    sample = Sample(t=time.time() if now is None else now)
    for family in registry.collect():
        for s in family.samples:
            name = s.name[:-len("_total")] if s.name.endswith("_total") else s.name
            if name in _GLOBAL:
                sample.server[_GLOBAL[name]] = float(s.value)
                continue
            # Counters without a tenant label (should /metrics ever drop it) still add to the
            # admins' totals under a name no tenant can have; no user key ever reads them.
            tenant = s.labels.get("tenant") or UNATTRIBUTED
            counters = sample.tenants.setdefault(tenant, {})
            if name in _PER_TENANT:
                counters[_PER_TENANT[name]] = counters.get(_PER_TENANT[name], 0.0) + float(s.value)
            elif name == "softserve_requests" and s.labels.get("endpoint") in GENERATION_ENDPOINTS:
                counters["requests"] = counters.get("requests", 0.0) + float(s.value)
                if s.labels.get("status", "").startswith(("4", "5")):
                    counters["errors"] = counters.get("errors", 0.0) + float(s.value)
    return sample


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


class StatsHistory:
    """Samples `registry` every `interval_s` seconds, keeping `window_s` seconds of history."""

    TENANT_FIELDS = ("requests", "errors", "generated_tokens", "prompt_tokens", "virtual_tokens")

    def __init__(self, registry, *, interval_s: float = 2.0, window_s: float = 600.0) -> None:
        self.registry = registry
        self.interval_s = interval_s
        self.window_s = window_s
        self._samples: deque[Sample] = deque(maxlen=max(2, int(window_s / interval_s) + 1))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self.sample()
            self._thread = threading.Thread(target=self._run, name="softserve-console-stats", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a scrape failing once must not end the history
                continue

    def sample(self, now: float | None = None) -> Sample:
        s = read_sample(self.registry, now)
        with self._lock:
            self._samples.append(s)
        return s

    def view(self, tenant: str | None, *, since: float | None = None) -> dict[str, Any]:
        """Rates between consecutive samples (plus one fresh sample for 'now').

        `tenant=None` sums every tenant (admins); otherwise only that tenant's counters are read."""
        with self._lock:
            samples = list(self._samples)
        current = read_sample(self.registry)
        if not samples or current.t - samples[-1].t >= 0.5:
            samples.append(current)
        points = []
        for prev, cur in zip(samples, samples[1:]):
            if since is not None and cur.t <= since:
                continue
            dt = cur.t - prev.t
            if dt <= 0:
                continue
            a, b = self._tenant_totals(prev, tenant), self._tenant_totals(cur, tenant)
            d = {k: max(0.0, b[k] - a[k]) for k in self.TENANT_FIELDS}
            ps, cs = prev.server, cur.server

            def delta(key: str) -> float:  # called only in this iteration
                return max(0.0, cs.get(key, 0.0) - ps.get(key, 0.0))  # noqa: B023

            points.append({
                "t": round(cur.t, 3),
                "requests_per_s": d["requests"] / dt,
                "errors_per_s": d["errors"] / dt,
                "tokens_per_s": d["generated_tokens"] / dt,
                "prompt_tokens_per_s": d["prompt_tokens"] / dt,
                "queue_depth": cs.get("queue_depth"),
                "running": cs.get("running"),
                "batch_size": _ratio(delta("batch_rows"), delta("steps")),
                "ttft_s": _ratio(delta("ttft_sum"), delta("ttft_count")),
                "prompt_cache_hit_rate": _ratio(delta("prompt_cache_hits"),
                                                delta("prompt_cache_hits") + delta("prompt_cache_misses")),
                "kv_cache_hit_rate": _ratio(delta("kv_cache_hits"), delta("kv_cache_hits") + delta("kv_cache_misses")),
                "kv_pool_used": _ratio(cs.get("kv_pool_used_tokens", 0.0), cs.get("kv_pool_tokens", 0.0)),
            })
        totals = self._tenant_totals(current, tenant)
        return {
            "object": "console.stats",
            "scope": "all tenants" if tenant is None else f"tenant {tenant}",
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "now": round(current.t, 3),
            "totals": {k: int(v) for k, v in totals.items()},
            "points": points,
        }

    @classmethod
    def _tenant_totals(cls, sample: Sample, tenant: str | None) -> dict[str, float]:
        rows = sample.tenants.values() if tenant is None else [sample.tenants.get(tenant, {})]
        return {k: sum(r.get(k, 0.0) for r in rows) for k in cls.TENANT_FIELDS}
