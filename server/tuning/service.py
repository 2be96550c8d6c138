"""Glue between the running service (ServiceState) and the tuning job manager.

The manager is created on first use, once the model is loaded, from the same objects the engine
serves with: the model, the tokenizer, the prompt store and the engine's `step_lock`.
"""

from __future__ import annotations

import threading

from server.api.errors import APIError
from server.tuning.jobs import TuningManager

__all__ = ["TuningService"]


class TuningService:
    def __init__(self, state, *, max_concurrent: int = 1, max_queued: int = 16, max_active_per_tenant: int = 2,
                 train_share_when_busy: float = 0.5) -> None:
        self.state = state
        self.kwargs = dict(max_concurrent=max_concurrent, max_queued=max_queued, max_active_per_tenant=max_active_per_tenant,
                           train_share_when_busy=train_share_when_busy)
        self._manager: TuningManager | None = None
        self._lock = threading.Lock()

    def get_manager(self) -> TuningManager:
        if self._manager is not None:
            return self._manager
        state = self.state
        if not state.is_ready or state.store is None:
            raise APIError(503, "model is loading, not ready yet", code="not_ready", headers={"Retry-After": "5"})
        with self._lock:
            if self._manager is None:
                async_engine = state.engine
                engine = async_engine.engine
                self._manager = TuningManager(
                    engine.runner.model, state.tokenizer, state.store,
                    model_name=state.served_model_name,
                    step_lock=getattr(async_engine, "step_lock", None),
                    is_busy=lambda: engine.num_running + engine.num_waiting > 0,
                    **self.kwargs,
                )
        return self._manager

    def close(self) -> None:
        with self._lock:
            manager, self._manager = self._manager, None
        if manager is not None:
            manager.close()
