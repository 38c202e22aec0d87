"""The HTTP server: uvicorn's h11 protocol plus deadlines for request headers and for
responses nobody reads, and a cap on connections.

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

With TLS, asyncio's handshake timeout (60 s by default) is set to ``header_timeout`` too,
so that a connection that never completes its handshake, which the protocol below never
sees, is closed as soon as an idle plain one.

A client that sends requests and never reads the answers (Linux's socket buffers take a
few MB, the rest waits in the process) must not pin memory or connections: uvicorn pauses
the response once the transport's buffer passes its high-water mark (64 KiB), the
``/metrics`` body is sent in pieces that wait for it (exporter/server/app.py), and a
response the client stopped reading is dropped, with its connection, ``write_timeout``
after the buffer first filled (as Go's ``http.Server.WriteTimeout`` bounds a response).
``max_connections`` is uvicorn's ``limit_concurrency``: beyond it, new requests get 503.

An API request's body has its own limit (``api.body_timeout``, exporter/training/api.py).
"""

from __future__ import annotations

import asyncio
import asyncio.constants
import logging

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
    """uvicorn's h11 protocol with a deadline of ``header_timeout`` seconds per request's
    headers and one of ``write_timeout`` seconds per response the client falls behind on."""

    header_timeout: float = 10.0
    write_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.flow.write_paused:  # the rest is below the high-water mark: flushed soon
            self._disarm_write_deadline()
        self._arm_header_deadline()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:  # counted from the first stall, not reset by each drain
            self._write_deadline = self.loop.call_later(self.write_timeout, self._on_write_deadline)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.cycle is None or self.cycle.response_complete:
            self._disarm_write_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._disarm_write_deadline()
        super().connection_lost(exc)

    def _disarm_write_deadline(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _on_write_deadline(self) -> None:
        # abort, not close: close would wait for the client to read the buffered bytes first.
        self._write_deadline = None
        self.transport.abort()

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
        if waiting_for_headers and self.transport.get_write_buffer_size() and not self.conn.trailing_data[0]:
            self.transport.abort()  # the end of the last response is still unread: drop it
        elif waiting_for_headers or unread_body:
            self.transport.close()
        # Otherwise a request is being read or answered: not this deadline's business.


def server_config(
    app, settings: Settings, host: str, port: int, log_level: int = logging.INFO, **options
) -> uvicorn.Config:
    """The uvicorn configuration mlmon serves ``app`` with on ``host:port``: always the h11
    protocol (never httptools) with ``settings.header_timeout`` and ``settings.write_timeout``
    (seconds) as its deadlines, and at most ``settings.max_connections`` connections.

    uvicorn's own loggers (``uvicorn.error``, ``uvicorn.access``) write through the root
    logger mlmon configures (``log_config=None``): one format, with a timestamp on every
    line, where uvicorn's default configuration has none. They log at ``log_level`` (a
    ``logging`` level); a line per request only at ``DEBUG`` (at a 15 s scrape interval a
    line per scrape is noise).

    ``options`` are more ``uvicorn.Config`` keyword arguments (TLS files). With
    TLS files it sets asyncio's TLS handshake timeout, process-wide, to ``header_timeout``:
    uvicorn gives no way to pass ``ssl_handshake_timeout`` to ``create_server``, and this
    server is the process's only one.
    """
    header_timeout = settings.header_timeout.total_seconds()
    protocol = type(
        "HeaderDeadlineH11Protocol",
        (HeaderDeadlineH11Protocol,),
        {"header_timeout": header_timeout, "write_timeout": settings.write_timeout.total_seconds()},
    )
    if options.get("ssl_certfile"):
        asyncio.constants.SSL_HANDSHAKE_TIMEOUT = header_timeout  # read by every new TLS connection
    # loop="asyncio": the TLS handshake timeout above is asyncio's; uvloop (which "auto"
    # picks when installed) would ignore it.
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        loop="asyncio",
        limit_concurrency=settings.max_connections,
        log_config=None,
        log_level=log_level,
        access_log=log_level <= logging.DEBUG,
        **options,
    )
