"""A header-read deadline for uvicorn's HTTP/1.1 protocol (issue #26 F4).

uvicorn closes a keep-alive connection that stays silent `timeout_keep_alive` seconds after a
response, but nothing else: a connection that never sends a byte, or sends its request head one
byte every few seconds (each byte restarts uvicorn's keep-alive timer), stays open for ever. With
`--max-connections N`, N such sockets answer every new connection 503, `/health` included.

`with_header_timeout(base, seconds, max_bytes)` subclasses uvicorn's protocol (h11 or httptools) so
that each request head must be complete `seconds` after the connection opened, or after the previous
response finished. Otherwise the connection is closed without a response (as nginx's
client_header_timeout does). A head still incomplete after `max_bytes` is answered 431 and the
connection closed: httptools itself buffers a head of any size. A request being answered is never
cut: the deadline only covers the time before a head has arrived. The request body is not covered
(the app reads it; --request-timeout bounds a request as a whole).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("softserve.http")

__all__ = ["with_header_timeout"]


class _HeaderDeadline:
    """Mixin over uvicorn's H11Protocol / HttpToolsProtocol. Both set `self.cycle` to a new
    RequestResponseCycle when a request head is complete, and call `on_response_complete` when the
    response has been sent: those two are the only internals relied on."""

    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024
    closed_for_header_timeout: int = 0  # class-wide count (tests and logs)
    refused_for_header_size: int = 0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # The next request head (keep-alive) gets its own deadline. A pipelined request already parsed
        # by the call above has a new, unfinished cycle: the callback leaves that connection alone.
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if getattr(self, "cycle", None) is not self._waiting_after:
            self._disarm_header_deadline()  # a head arrived: the request is the app's now
        elif self._header_timer is not None:
            # Still no complete head. httptools buffers a head of any size (h11 stops at its own limit, set
            # to the same number in serving.py): a client could send megabytes of one header line within
            # the deadline. Bytes of a chunk that completed a head (its body's first bytes) never count.
            self._head_bytes += len(data)  # set to 0 whenever the deadline is armed
            if self._head_bytes > self.max_header_bytes:
                self._refuse_oversized_head()

    # ---- the deadline -------------------------------------------------------------------------
    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._head_bytes = 0
        self._waiting_after = getattr(self, "cycle", None)  # the cycle a new head will replace
        loop: asyncio.AbstractEventLoop = getattr(self, "loop", None) or asyncio.get_event_loop()
        self._header_timer: asyncio.TimerHandle | None = loop.call_later(self.header_timeout, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        self._header_timer = None

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        cycle = getattr(self, "cycle", None)
        if cycle is not self._waiting_after or (cycle is not None and not cycle.response_complete):
            return  # a request head did arrive (or one is still being answered)
        transport = getattr(self, "transport", None)
        if transport is not None and not transport.is_closing():
            type(self).closed_for_header_timeout += 1
            log.info("closed a connection: no complete request head within %.1f s (--header-timeout)",
                     self.header_timeout)
            transport.close()


    def _refuse_oversized_head(self) -> None:
        self._disarm_header_deadline()
        transport = getattr(self, "transport", None)
        if transport is not None and not transport.is_closing():
            type(self).refused_for_header_size += 1
            log.info("refused a request head over %d bytes (--max-header-bytes)", self.max_header_bytes)
            transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
                            b"connection: close\r\n\r\n")
            transport.close()


def with_header_timeout(base: type[asyncio.Protocol], seconds: float, max_bytes: int) -> type[asyncio.Protocol]:
    """`base` (uvicorn's HTTP protocol class) with a header-read deadline of `seconds` and a request head of at
    most `max_bytes` (431 and the connection closed beyond)."""
    return type(f"HeaderTimeout{base.__name__}", (_HeaderDeadline, base),
                {"header_timeout": float(seconds), "max_header_bytes": int(max_bytes)})
