"""The HTTP/1.1 connection: uvicorn's httptools protocol with the limits it lacks.

uvicorn's httptools protocol (the fast one) has no bound on the size of a request's head and no
timeout for receiving it or its body: a client can hold a connection (and, once its headers are
in, a request task) open for ever by sending slowly, or make the loop buffer a header of tens of
megabytes. uvicorn's h11 protocol bounds the head (``h11_max_incomplete_event_size``) but has no
read timeouts either, and costs more per request. So this module keeps httptools and adds, per
connection:

- ``max_header_bytes``: the request line and headers together; more is refused with
  **431** before the parser sees the excess (the bytes are counted as they arrive, so one huge
  line or many small ones cost the same: at most the limit is parsed).
- ``header_timeout_s``: from the connection's start (first request) or the first byte of a
  request (later ones) to the end of its headers. An idle new connection is closed silently; a
  partial head gets **408**.
- ``body_timeout_s``: from the end of the headers to the end of the body, however slowly the
  bytes trickle in: **408**, and the handler sees a disconnect (it was never accepted, so it is
  not in flight).
- On shutdown (after the drain), a request whose body is still arriving is answered **503**
  (``Retry-After``) and closed instead of holding the graceful shutdown open: only complete
  requests are accepted, and every accepted one has been answered by then.

A refused connection is closed the lingering way: the answer is written, the sending side shut
down, and whatever the client still sends is read and dropped for ``LINGER_S`` before the socket
closes (closing with unread bytes would reset the connection and lose the answer).

Idle keep-alive connections are uvicorn's ``timeout_keep_alive`` (``keep_alive_timeout_s``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

# Seconds a refused connection is still read (and what arrives dropped) before it is closed.
LINGER_S = 0.5

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one HTTP connection may take of the server (settings ``max_header_bytes``,
    ``header_timeout_s``, ``body_timeout_s``)."""

    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float


def guarded_protocol(limits: HttpLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol class with ``limits`` (pass it as ``Config(http=...)``)."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """See the module docstring; ``limits`` is set by :func:`guarded_protocol`."""

    limits: HttpLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the next bytes belong to a request line or headers
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._discarding = False

    # ------------------------------------------------------------------ timers

    def _arm(self, seconds: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes == 0:  # nothing sent: an idle connection, closed without a word
            self.transport.close()
            return
        limit = self.limits.header_timeout_s
        self._refuse(408, f"request headers not received within {limit:g} s")

    def _body_expired(self) -> None:
        self._timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        if cycle.response_complete:  # answered already (e.g. 413): stop reading the rest
            self.transport.close()
            return
        self._refuse(408, f"request body not received within {self.limits.body_timeout_s:g} s")

    # ------------------------------------------------------------------ refusing

    def _refuse(self, status: int, message: str, retry_after: bool = False) -> None:
        """Answer ``status`` and close; a handler waiting for the body sees a disconnect."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            body = orjson.dumps({"error": message})
            head = [
                f"HTTP/1.1 {status} {_REASONS[status]}",
                "content-type: application/json",
                f"content-length: {len(body)}",
                "connection: close",
            ]
            if retry_after:
                head.append("retry-after: 1")
            self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body)
        logger.debug("HTTP %d to %s: %s", status, self.client, message)
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        # A lingering close: closing a socket with unread bytes resets the connection, and a
        # client still sending would lose the answer. Half-close instead, drop what still
        # arrives (unparsed), and close for good after LINGER_S.
        self._discarding = True
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm(LINGER_S, self.transport.close)

    # ------------------------------------------------------------------ uvicorn's protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._header_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:  # refused: read and dropped until the lingering close ends
            return
        if not self._in_head:
            super().data_received(data)
            return
        room = self.limits.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # Parse no more than the limit: if the head is not complete within it, refuse.
        self._head_bytes += room
        super().data_received(data[:room])
        if self.transport.is_closing():
            return
        if self._in_head:
            limit = self.limits.max_header_bytes
            self._refuse(431, f"request line and headers exceed {limit} bytes")
            return
        self.data_received(data[room:])  # the body (or a pipelined request)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:  # a later request on a kept-alive connection
            self._arm(self.limits.header_timeout_s, self._header_expired)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        self._arm(self.limits.body_timeout_s, self._body_expired)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def shutdown(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.more_body:
            # Still uploading when the drain is over: never accepted, so refused honestly.
            self._refuse(503, "server is shutting down; retry on another replica", True)
            return
        super().shutdown()
