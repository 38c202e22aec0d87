"""The HTTP server: uvicorn's h11 protocol plus a deadline for request headers.

uvicorn has no header timeout: its keep-alive timer is disarmed by any byte received, and a
new connection has no timer at all, so a client trickling its request line and headers
(slowloris) holds a connection and a file descriptor for ever. Here every request's line
and headers must be complete within ``header_timeout`` of the connection opening or of the
previous response ending (as Apache's ``RequestReadTimeout header=`` and nginx's
``client_header_timeout`` do). At the deadline:

- part of a request line or headers arrived: ``408 Request Timeout``, connection closed;
- nothing arrived (an idle or kept-alive connection): closed silently, as uvicorn's own
  keep-alive timeout does, so that a client never reads a 408 it did not ask for;
- the response is sent but the client is still sending a body nobody reads (a route that
  answers without reading it, or an early 401/413): closed.

An API request's body has its own limit (``api.body_timeout``, exporter/training/api.py).
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from exporter.config import Settings

_TIMEOUT_BODY = b"request headers did not arrive in time\n"
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n"
    b"\r\n%s"
) % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)


class HeaderDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline of ``header_timeout`` seconds per request's headers."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._on_header_deadline)

    def _on_header_deadline(self) -> None:
        if self.transport.is_closing():
            return
        waiting_for_headers = self.conn.their_state is h11.IDLE
        unread_body = self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY
        if waiting_for_headers and self.conn.trailing_data[0]:  # a request began and stalled
            self.transport.write(_TIMEOUT_RESPONSE)  # h11 cannot answer a request it has not parsed
        if waiting_for_headers or unread_body:
            self.transport.close()
        # Otherwise a request is being read or answered: not this deadline's business.


def server_config(app, settings: Settings, host: str, port: int, **options) -> uvicorn.Config:
    """The uvicorn configuration mlmon serves ``app`` with on ``host:port``: always the h11
    protocol (never httptools) with ``settings.header_timeout`` (seconds) as its deadline.

    ``options`` are more ``uvicorn.Config`` keyword arguments (TLS files, log level).
    """
    protocol = type(
        "HeaderDeadlineH11Protocol",
        (HeaderDeadlineH11Protocol,),
        {"header_timeout": settings.header_timeout.total_seconds()},
    )
    return uvicorn.Config(app, host=host, port=port, http=protocol, **options)
