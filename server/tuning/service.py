"""Glue between the running service (ServiceState) and the tuning job manager.

The manager is created once the model is loaded (at start-up, so unfinished jobs in the store are
resumed without waiting for a request), from the same objects the engine serves with: the model,
the tokenizer, the prompt store and the engine's `step_lock`.
"""

from __future__ import annotations

import logging
import threading

from server.api.errors import APIError
from server.tuning.jobs import TuningManager

log = logging.getLogger("softserve.tuning")

__all__ = ["TuningService"]


class TuningService:
    def __init__(self, state, *, max_concurrent: int = 1, max_queued: int = 16, max_active_per_tenant: int = 2,
                 train_share_when_busy: float = 0.5) -> None:
        self.state = state
        self.kwargs = dict(max_concurrent=max_concurrent, max_queued=max_queued, max_active_per_tenant=max_active_per_tenant,
                           train_share_when_busy=train_share_when_busy)
        self._manager: TuningManager | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start_when_loaded(self) -> None:
        """Start the manager as soon as the model is ready (in a thread: loading may take a while)."""
        def start() -> None:
            self.state.loaded.wait()
            if self.state.is_ready and not self._closed:
                try:
                    self.get_manager()
                except Exception:
                    log.exception("tuning jobs could not start")

        threading.Thread(target=start, name="softserve-tuning-start", daemon=True).start()

    def get_manager(self) -> TuningManager:
        if self._manager is not None:
            return self._manager
        state = self.state
        if not state.is_ready or state.store is None:
            raise APIError(503, "model is loading, not ready yet", code="not_ready", headers={"Retry-After": "5"})
        with self._lock:
            if self._manager is None and not self._closed:
                async_engine = state.engine
                engine = async_engine.engine
                s = state.settings
                self._manager = TuningManager(
                    engine.runner.model, state.tokenizer, state.store,
                    model_name=state.served_model_name,
                    step_lock=getattr(async_engine, "step_lock", None),
                    is_busy=lambda: engine.num_running + engine.num_waiting > 0,
                    lease_seconds=s.tuning_lease_seconds, scan_seconds=s.tuning_scan_seconds,
                    replica_id=s.tuning_replica_id,
                    **self.kwargs,
                )
                state.tuning_job_counts = self._manager.job_counts
        if self._manager is None:
            raise APIError(503, "shutting down", code="not_ready")
        return self._manager

    def close(self) -> None:
        with self._lock:
            self._closed = True
            manager, self._manager = self._manager, None
        if manager is not None:
            manager.close()
