"""Prometheus metrics (one registry per app, so tests can build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics:
    """Counters keep a `tenant` label internally (the web console's per-tenant stats read them), but
    what is scraped (`render`, --metrics-port) drops it unless `tenant_labels` (--metrics-tenant-labels):
    tenant names are customer data, and whoever scrapes the metrics would see every one."""

    def __init__(self, tenant_labels: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.tenant_labels = tenant_labels
        r = self.registry
        self.requests = Counter("softserve_requests", "Finished API requests", ["tenant", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("softserve_prompt_tokens", "Prompt tokens processed", ["tenant"], registry=r)
        self.virtual_tokens = Counter("softserve_virtual_tokens", "Soft-prompt tokens in requests", ["tenant"], registry=r)
        self.generation_tokens = Counter("softserve_generation_tokens", "Tokens generated", ["tenant"], registry=r)
        self.ttft = Histogram("softserve_time_to_first_token_seconds", "Time to first token", registry=r, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("softserve_inter_token_latency_seconds", "Time between tokens", registry=r, buckets=_TOKEN_BUCKETS)
        self.latency = Histogram("softserve_request_latency_seconds", "End-to-end request latency", registry=r, buckets=_LATENCY_BUCKETS)
        self.step_time = Histogram("softserve_engine_step_seconds", "Engine step duration", registry=r, buckets=_TOKEN_BUCKETS)
        self.batch_size = Histogram("softserve_engine_batch_size", "Rows per engine step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.rejected = Counter("softserve_rejected_requests", "Requests refused at admission", ["reason"], registry=r)
        self.store_gc_objects = Counter("softserve_store_gc_objects", "Store objects deleted by garbage collection", registry=r)
        self.store_gc_bytes = Counter("softserve_store_gc_bytes", "Store bytes freed by garbage collection", registry=r)
        self.scraped = r
        if not tenant_labels:
            self.scraped = CollectorRegistry(auto_describe=False)
            self.scraped.register(_WithoutTenant(r))

    def count_request(self, tenant: str, endpoint: str, status: int) -> None:
        self.requests.labels(tenant, endpoint, str(status)).inc()

    def count_tokens(self, tenant: str, *, prompt: int, generated: int, virtual: int) -> None:
        self.prompt_tokens.labels(tenant).inc(prompt)
        self.generation_tokens.labels(tenant).inc(generated)
        if virtual:
            self.virtual_tokens.labels(tenant).inc(virtual)

    def count_store_gc(self, report) -> None:
        self.store_gc_objects.inc(report.objects_deleted)
        self.store_gc_bytes.inc(report.bytes_freed)

    def bind(self, state) -> None:
        """Gauges that read live state at scrape time (queue, batch, caches, tuning)."""
        self.registry.register(_StateCollector(state))

    def render(self) -> bytes:
        return generate_latest(self.scraped)


class _WithoutTenant:
    """The registry with the `tenant` label summed away."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            if not any("tenant" in sample.labels for sample in family.samples):
                yield family
                continue
            merged: dict[tuple, float] = {}
            for sample in family.samples:
                key = (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "tenant")))
                if sample.name.endswith("_created"):
                    merged[key] = min(merged.get(key, sample.value), sample.value)
                else:
                    merged[key] = merged.get(key, 0.0) + sample.value
            out = Metric(family.name, family.documentation, family.type)
            for (name, labels), value in merged.items():
                out.add_sample(name, dict(labels), value)
            yield out


class _StateCollector:
    def __init__(self, state) -> None:
        self.state = state

    def collect(self):
        state = self.state
        engine = state.engine
        yield _metric(GaugeMetricFamily, "softserve_ready", "1 when the server accepts requests", 1.0 if state.is_ready else 0.0)
        if engine is None:
            return
        stats = engine.stats()
        yield _metric(GaugeMetricFamily, "softserve_queue_depth", "Requests waiting for a batch row", stats.num_waiting)
        yield _metric(GaugeMetricFamily, "softserve_running_requests", "Requests in the running batch", stats.num_running)
        yield _metric(CounterMetricFamily, "softserve_engine_steps", "Engine steps that ran the model", stats.steps_run)
        yield _metric(CounterMetricFamily, "softserve_forward_passes", "Model forward passes (one per engine step)",
                      stats.forward_passes)
        yield _metric(GaugeMetricFamily, "softserve_kv_pool_tokens", "Token slots in the KV pool", stats.kv_pool_tokens)
        yield _metric(GaugeMetricFamily, "softserve_kv_pool_used_tokens", "KV pool slots reserved by running requests",
                      stats.kv_pool_used_tokens)
        yield _metric(CounterMetricFamily, "softserve_kv_prefix_cache_hits", "Soft-prompt KV prefix cache hits",
                      stats.prefix_cache_hits)
        yield _metric(CounterMetricFamily, "softserve_kv_prefix_cache_misses", "Soft-prompt KV prefix cache misses",
                      stats.prefix_cache_misses)
        yield _metric(CounterMetricFamily, "softserve_kv_prefix_cache_evictions", "Soft-prompt KV prefix cache evictions",
                      stats.prefix_cache_evictions)
        yield _metric(GaugeMetricFamily, "softserve_kv_prefix_cache_bytes", "Bytes of cached soft-prompt KV",
                      stats.prefix_cache_bytes)
        if state.cache is not None:
            stats = state.cache.stats()
            yield _metric(CounterMetricFamily, "softserve_prompt_cache_hits", "Prompt tensor cache hits", stats.hits)
            yield _metric(CounterMetricFamily, "softserve_prompt_cache_misses",
                          "Prompt tensor cache misses (loads from the store)", stats.misses)
            yield _metric(CounterMetricFamily, "softserve_prompt_cache_evictions", "Prompt tensor cache evictions", stats.evictions)
            yield _metric(GaugeMetricFamily, "softserve_prompt_cache_bytes", "Bytes of prompt tensors on the device", stats.bytes)
            yield _metric(GaugeMetricFamily, "softserve_prompt_cache_entries", "Prompt tensors on the device", stats.entries)
        counts = state.tuning.job_counts() if state.tuning is not None else None
        if counts is not None:
            g = GaugeMetricFamily("softserve_tuning_jobs", "Unfinished tuning jobs on this replica by status",
                                  labels=["status"])
            for status, count in counts.items():
                g.add_metric([status], count)
            yield g


def _metric(family, name: str, doc: str, value: float):
    """One unlabelled sample read at scrape time."""
    metric = family(name, doc)
    metric.add_metric([], value)
    return metric
