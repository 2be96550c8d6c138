"""uvicorn with a graceful drain: what `softserve serve` runs."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import uvicorn

from softserve.config import Settings
from softserve.http_timeouts import with_header_timeout

log = logging.getLogger("softserve")


class DrainingServer(uvicorn.Server):
    """SIGTERM/SIGINT: /ready turns 503 at once and new requests get 503, in-flight requests
    finish (up to --shutdown-timeout), then the process exits 0. A second signal exits now.

    uvicorn's own handler stops listening at once and re-raises the signal after shutdown (exit code
    143); an orchestrator's readiness probe should see 503 instead, and a clean drain should exit 0.
    """

    def __init__(self, config: uvicorn.Config, state, shutdown_timeout: float, http_name: str = "") -> None:
        super().__init__(config)
        self.http_name = http_name  # the HTTP protocol class, for the start-up log line
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self._draining = False

    async def serve(self, sockets=None) -> None:
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # "uvloop" or "asyncio"
        log.info("API server: %s, %s event loop", self.http_name, loop)
        await super().serve(sockets)

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
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout)), access_log=False,
        limit_concurrency=settings.max_connections,
        # Idle and slow connections are closed, so --max-connections of them cannot lock everyone out
        # (issue #26 F4): silent after a response (keep-alive), or a request head not complete in time.
        timeout_keep_alive=settings.keep_alive_timeout,
        http=with_header_timeout(protocol := http_protocol(settings.http_parser), settings.header_timeout,
                                 settings.max_header_bytes),
        h11_max_incomplete_event_size=settings.max_header_bytes,  # h11's own limit (16 KiB by default) matches
        loop=settings.event_loop,
    )
    DrainingServer(config, app.state.service, settings.shutdown_timeout, protocol.__name__).run()


def http_protocol(name: str) -> type:
    """uvicorn's protocol class for --http-parser (imported here: httptools may be absent)."""
    if name == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol
        return H11Protocol
    if name == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # ImportError if absent
        return HttpToolsProtocol
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # httptools where installed, else h11
    return AutoHTTPProtocol
