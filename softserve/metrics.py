"""Prometheus metrics (one registry per app, so tests can build many apps in one process)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, Summary, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class Metrics:
    """Counters keep a `tenant` label internally (the web console's per-tenant stats read them), but
    what is scraped (`render`, --metrics-port) drops it unless `tenant_labels` (--metrics-tenant-labels):
    tenant names are customer data, and whoever scrapes the metrics would see every one."""

    def __init__(self, tenant_labels: bool = False, version_series: int = 64) -> None:
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
        self.versions = VersionMetrics(r, max_series=version_series)
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


OTHER = "other"  # the prompt and version labels of every series beyond the cap


class VersionMetrics:
    """Per (prompt, version) numbers for release decisions: requests, errors, generated tokens, TTFT and
    latency histograms, feedback scores. Label cardinality is bounded: only versions served through an
    alias get their own series, at most `max_series` (tenant, prompt, version) of them for the life of
    the process (--version-metrics-max-series, 0 = off); everything else is counted as prompt="other",
    version="other"."""

    LABELS = ["tenant", "prompt", "version"]

    def __init__(self, registry: CollectorRegistry, max_series: int = 64) -> None:
        r = registry
        self.max_series = max_series
        self._admitted: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()
        if max_series <= 0:
            return
        labels = self.LABELS
        self.requests = Counter("softserve_version_requests", "Finished requests per served prompt version", labels, registry=r)
        self.errors = Counter("softserve_version_errors", "Requests per served prompt version that ended in an error",
                              labels, registry=r)
        self.tokens = Counter("softserve_version_generation_tokens", "Tokens generated per served prompt version", labels,
                              registry=r)
        self.ttft = Histogram("softserve_version_time_to_first_token_seconds", "Time to first token per prompt version",
                              labels, registry=r, buckets=_LATENCY_BUCKETS)
        self.latency = Histogram("softserve_version_request_latency_seconds", "Request latency per prompt version",
                                 labels, registry=r, buckets=_LATENCY_BUCKETS)
        self.feedback = Summary("softserve_version_feedback_score", "Scores from POST /v1/feedback per prompt version",
                                labels, registry=r)

    @property
    def enabled(self) -> bool:
        return self.max_series > 0

    def labels(self, tenant: str, prompt: str, version: str, aliased: bool) -> tuple[str, str, str]:
        """The series a request counts in: its own while there is room (aliased versions only), else other."""
        key = (tenant, prompt, version)
        with self._lock:
            if key in self._admitted:
                return key
            if aliased and len(self._admitted) < self.max_series:
                self._admitted.add(key)
                return key
        return (tenant, OTHER, OTHER)

    def observe(self, labels: tuple[str, str, str], *, status: str, tokens: int, ttft: float | None, latency: float) -> None:
        if not self.enabled:
            return
        self.requests.labels(*labels).inc()
        if status not in ("ok", "cancelled"):
            self.errors.labels(*labels).inc()
        self.tokens.labels(*labels).inc(tokens)
        if ttft is not None:
            self.ttft.labels(*labels).observe(ttft)
        self.latency.labels(*labels).observe(latency)

    def observe_feedback(self, labels: tuple[str, str, str], score: float) -> None:
        if self.enabled:
            self.feedback.labels(*labels).observe(score)

    def snapshot(self, tenant: str, prompt: str) -> dict[str, dict[str, float]]:
        """version -> {requests, errors, generation_tokens, ttft_sum, ttft_count, latency_sum, latency_count,
        feedback_sum, feedback_count} of one tenant's prompt, for the console."""
        out: dict[str, dict[str, float]] = {}
        if not self.enabled:
            return out
        wanted = {"softserve_version_requests_total": "requests", "softserve_version_errors_total": "errors",
                  "softserve_version_generation_tokens_total": "generation_tokens",
                  "softserve_version_time_to_first_token_seconds_sum": "ttft_sum",
                  "softserve_version_time_to_first_token_seconds_count": "ttft_count",
                  "softserve_version_request_latency_seconds_sum": "latency_sum",
                  "softserve_version_request_latency_seconds_count": "latency_count",
                  "softserve_version_feedback_score_sum": "feedback_sum",
                  "softserve_version_feedback_score_count": "feedback_count"}
        for metric in (self.requests, self.errors, self.tokens, self.ttft, self.latency, self.feedback):
            for family in metric.collect():
                for sample in family.samples:
                    field = wanted.get(sample.name)
                    if field is None or sample.labels.get("tenant") != tenant or sample.labels.get("prompt") != prompt:
                        continue
                    row = out.setdefault(sample.labels["version"], dict.fromkeys(wanted.values(), 0.0))
                    row[field] += sample.value
        return out


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
        tier = stats.kv_tier
        if tier is not None:
            yield _metric(CounterMetricFamily, "softserve_kv_tier_hits", "Soft-prompt KV read from the disk tier", tier.hits)
            yield _metric(CounterMetricFamily, "softserve_kv_tier_misses",
                          "Soft-prompt KV in neither the device cache nor the disk tier (computed)", tier.misses)
            yield _metric(CounterMetricFamily, "softserve_kv_tier_writes", "Soft-prompt KV files written to the disk tier", tier.writes)
            yield _metric(CounterMetricFamily, "softserve_kv_tier_evictions", "Soft-prompt KV files evicted from the disk tier",
                          tier.evictions)
            yield _metric(CounterMetricFamily, "softserve_kv_tier_errors",
                          "Disk tier files unreadable or mismatched (removed), or failed writes", tier.errors)
            yield _metric(CounterMetricFamily, "softserve_kv_tier_dropped_writes",
                          "Disk tier writes skipped: the writer's queue was full", tier.dropped)
            yield _metric(GaugeMetricFamily, "softserve_kv_tier_bytes", "Bytes of soft-prompt KV in the disk tier", tier.bytes)
            yield _metric(GaugeMetricFamily, "softserve_kv_tier_prompts", "Prompts whose KV the disk tier holds", tier.files)
        warmer = state.kv_warmer
        if warmer is not None:
            w = warmer.stats()
            yield _metric(GaugeMetricFamily, "softserve_kv_warmups_pending",
                          "Uploaded prompts whose KV is queued or being computed", w.pending + w.in_flight)
            g = CounterMetricFamily("softserve_kv_warmups", "Uploaded prompts' KV warm-ups by outcome", labels=["outcome"])
            for outcome, count in (("done", w.done), ("skipped", w.skipped), ("failed", w.failed), ("dropped", w.dropped)):
                g.add_metric([outcome], count)
            yield g
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
