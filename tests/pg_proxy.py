"""A loopback TCP proxy to PostgreSQL that a test opens, cuts and reopens, to simulate a
database outage or restart without touching the real server."""

from __future__ import annotations

import socket
import threading


class Proxy:
    """A TCP proxy from a loopback port to PostgreSQL; while stopped, the port refuses."""

    def __init__(self, target=("127.0.0.1", 5432)):
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        # Guards _listener and _open, which the accept and pipe threads change while
        # stop() runs in the test's thread.
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and cut the open ones, as a server restart does. The
        sockets of a cut connection are closed by its pipe threads, once both have ended."""
        with self._lock:
            listener, self._listener = self._listener, None
            if listener is not None:
                try:
                    listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread: close alone does not
                except OSError:
                    pass
                listener.close()
            for s in self._open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by stop()
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the real server refused: so does the proxy, and goes on accepting
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # stop() ran meanwhile: this connection is cut too
                    client.close()
                    upstream.close()
                    return
                self._open.update((client, upstream))
            pipes = [2]  # pipe threads of this connection still running
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b, pipes), daemon=True).start()

    def _pipe(self, source, sink, pipes: list[int]) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                for s in (source, sink):  # ends the other direction's thread too
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                pipes[0] -= 1
                if pipes[0] == 0:  # the last of the two: no thread uses the sockets any more
                    for s in (source, sink):
                        self._open.discard(s)
                        s.close()
