"""Clients that never read against the real server (`mlmon serve`) with a large exposition:
a response nobody reads is dropped with its connection at ``write_timeout`` and pins no copy
of the exposition meanwhile, connections beyond ``max_connections`` get 503, and real
scrapes are answered at once throughout. Loopback only; bounded in sockets and seconds."""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from exporter.training.schema import TrainingRun
from exporter.training.storage import StateDatabase, save_run
from tests.conftest import free_port, start_process, wait_until_answers

WRITE_TIMEOUT = 3.0
HEADER_TIMEOUT = 2.0
NON_READERS = 40


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024


def _connections_from(pid: int, port: int, peer_ports: set[int]) -> int:
    """Connections the process holds on its ``port`` whose peer is one of ``peer_ports``:
    the process's socket inodes matched against the kernel's TCP table, so sockets of other
    clients (a probe's keep-alive closing meanwhile) do not move the count."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            count += (
                int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) in peer_ports and inode in inodes
            )
    return count


def _store_runs(url: str, models: int, features: int, categories: int) -> None:
    """One training run per model, each feature with ``categories`` categories: about
    ``models * features * categories`` series."""
    state = StateDatabase(url)
    now = datetime.now(UTC)
    shares = {f"c{c}": 1 / categories for c in range(categories)}
    engine = state.ready()
    for m in range(models):
        run = TrainingRun(
            model=f"model_{m:04d}",
            version="v1",
            trained_at=now - timedelta(hours=1),
            training_rows=1000,
            validation_rows=100,
            validation_logloss=0.3,
            validation_roc_auc=0.7,
            features=[
                {
                    "name": f"feature_{f:03d}",
                    "kind": "categorical",
                    "count": 1000,
                    "missing_ratio": 0.0,
                    "categories": shares,
                }
                for f in range(features)
            ],
        )
        save_run(engine, run, now)
    state.engine.dispose()


def _serve(tmp_path: Path, max_connections: int = 200) -> tuple:
    (tmp_path / "mlmon.yml").write_text(
        f"header_timeout: {HEADER_TIMEOUT:g}s\nwrite_timeout: {WRITE_TIMEOUT:g}s\nmax_connections: {max_connections}\n"
        f"training: {{max_models: 100000}}\n"
        f'stores: {{}}\nmodels: []\nstate: {{url: "sqlite:///{tmp_path}/state.sqlite"}}\n'
    )
    port, log = free_port(), tmp_path / "server.log"
    server = start_process(
        [sys.executable, "-m", "exporter", "serve", "--config", str(tmp_path / "mlmon.yml"), "--port", str(port)], log
    )
    return server, port, log


@pytest.fixture
def large_exposition_server(tmp_path):
    _store_runs(f"sqlite:///{tmp_path}/state.sqlite", models=150, features=60, categories=12)
    server, port, log = _serve(tmp_path)
    try:
        wait_until_answers(
            f"http://127.0.0.1:{port}/metrics",
            server,
            log,
            timeout=60,
            ready=lambda response: "model_0149" in response.text,
        )
        yield server, port
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.long
def test_clients_that_never_read_hold_neither_memory_nor_connections(large_exposition_server):
    server, port = large_exposition_server
    size = len(httpx.get(f"http://127.0.0.1:{port}/metrics").content)
    assert size > 10_000_000, size  # more than Linux's socket buffers take: most of it waits in mlmon
    rss_before = _rss_mb(server.pid)

    non_readers = []
    for _ in range(NON_READERS):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the body waits in mlmon
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: mlmon\r\n\r\n")  # no gzip: the whole body
        non_readers.append(sock)
    peer_ports = {sock.getsockname()[1] for sock in non_readers}
    sent = time.monotonic()
    held = 0
    while held < NON_READERS and time.monotonic() - sent < WRITE_TIMEOUT - 1:  # all accepted, answers under way
        held = _connections_from(server.pid, port, peer_ports)
        time.sleep(0.1)
    latencies, peak_rss = [], _rss_mb(server.pid)
    with httpx.Client(timeout=30) as scraper:
        while time.monotonic() - sent < WRITE_TIMEOUT + 3:
            before = time.monotonic()
            response = scraper.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "gzip"})
            latencies.append(time.monotonic() - before)
            assert response.status_code == 200
            peak_rss = max(peak_rss, _rss_mb(server.pid))
            time.sleep(0.1)
    held_after = _connections_from(server.pid, port, peer_ports)
    for sock in non_readers:
        sock.close()

    # One copy per connection was 40 x 10+ MB; slices of the one shared body are 64 KiB each.
    assert peak_rss - rss_before < 100, (rss_before, peak_rss)
    assert statistics.median(latencies) < 0.5, latencies
    assert held == NON_READERS, held  # they were connected and answered until the deadline ...
    assert held_after == 0, held_after  # ... and dropped at it


@pytest.mark.long
def test_connections_beyond_max_connections_get_503_until_some_close(tmp_path):
    server, port, log = _serve(tmp_path, max_connections=5)
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/healthz", server, log)
        time.sleep(HEADER_TIMEOUT + 0.5)  # the probes' kept-alive connections are closed
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        time.sleep(0.3)
        refused = httpx.get(f"http://127.0.0.1:{port}/healthz")
        time.sleep(HEADER_TIMEOUT + 0.5)  # the idle ones are closed at the header deadline
        served = httpx.get(f"http://127.0.0.1:{port}/healthz")
        for sock in idle:
            sock.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert refused.status_code == 503
    assert served.status_code == 200
