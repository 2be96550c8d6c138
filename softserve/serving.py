"""uvicorn with a graceful drain: what `softserve serve` runs."""

from __future__ import annotations

import threading
import time

import uvicorn

from softserve.config import Settings
from softserve.http_timeouts import with_header_timeout


class DrainingServer(uvicorn.Server):
    """SIGTERM/SIGINT: /ready turns 503 at once and new requests get 503, in-flight requests
    finish (up to --shutdown-timeout), then the process exits 0. A second signal exits now.

    uvicorn's own handler stops listening at once and re-raises the signal after shutdown (exit code
    143); an orchestrator's readiness probe should see 503 instead, and a clean drain should exit 0.
    """

    def __init__(self, config: uvicorn.Config, state, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:
            self.should_exit = True
            self.force_exit = True
            return
        self._draining = True
        self.state.shutting_down = True
        print("softserve: shutting down, draining in-flight requests", flush=True)
        threading.Thread(target=self._drain, name="softserve-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        engine = self.state.engine
        while engine is not None and time.monotonic() < deadline:
            if engine.num_running == 0 and engine.num_waiting == 0:
                break
            time.sleep(0.05)
        self.should_exit = True  # uvicorn then lets open responses finish and runs lifespan shutdown


def run_server(app, settings: Settings) -> None:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # h11, or httptools where installed

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout)), access_log=False,
        limit_concurrency=settings.max_connections,
        # Idle and slow connections are closed, so --max-connections of them cannot lock everyone out
        # (issue #26 F4): silent after a response (keep-alive), or a request head not complete in time.
        timeout_keep_alive=settings.keep_alive_timeout,
        http=with_header_timeout(AutoHTTPProtocol, settings.header_timeout),
    )
    DrainingServer(config, app.state.service, settings.shutdown_timeout).run()
