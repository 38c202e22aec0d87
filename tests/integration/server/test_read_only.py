"""The container's way of running, without Docker: ``mlmon serve`` as uid 10001 (the
image's user) in the state directory (the image's WORKDIR and only volume), with every
other mount of the filesystem read-only, against the real PostgreSQL. It refreshes,
serves ``/metrics`` and stores a training run in its default state database, and writes
nothing anywhere else.

The read-only view is a private mount namespace (``unshare``); the process keeps only
CAP_DAC_READ_SEARCH, so that it can read this checkout's Python under ``/root`` as it
would read the image's world-readable files, but write nowhere uid 10001 could not. Its
config and state directory live in a world-readable directory under /var/tmp, as
/etc/mlmon and /var/lib/mlmon are in the image (the CLI checks the config with access(2),
which ignores capabilities).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import sqlalchemy as sa

from tests.conftest import free_port, require, start_process, wait_until_answers

UID = 10001  # USER of the Dockerfile

# Run by root in the new mount namespace: the state directory stays writable, every other
# mount becomes read-only (/proc, /sys and /dev are left as Docker leaves them), then the
# server starts as the image's user.
NAMESPACE_SCRIPT = r"""
set -eu
mount --bind "$STATE" "$STATE"
awk '{print $2}' /proc/self/mounts | sort -u | while read -r target; do
  case "$target" in "$STATE"|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
  mount -o remount,bind,ro "$target"
done
if touch "$PROBE" 2>/dev/null; then echo "the filesystem outside $STATE is still writable" >&2; exit 3; fi
cd "$STATE"
exec setpriv --reuid "$UID" --regid "$UID" --clear-groups \
  --inh-caps +dac_read_search --ambient-caps +dac_read_search -- "$@"
"""


def test_serve_runs_as_non_root_on_a_read_only_filesystem(postgres_schema, postgres_engine):
    require(
        os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("setpriv") is not None,
        "needs root, unshare and setpriv to run mlmon as uid 10001 on a read-only filesystem",
    )
    url, schema = postgres_schema
    metadata = sa.MetaData(schema=schema)
    table = sa.Table(
        "predictions",
        metadata,
        sa.Column("id", sa.Integer),
        sa.Column("ts", sa.DateTime(timezone=True)),
        sa.Column("p", sa.Double),
    )
    metadata.create_all(postgres_engine)
    now = datetime.now(UTC)
    with postgres_engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "ts": now - timedelta(minutes=i + 1), "p": 0.5} for i in range(30)])

    home = Path(tempfile.mkdtemp(prefix="mlmon-read-only-", dir="/var/tmp"))
    try:
        _serve_read_only(home, url, schema)
    finally:
        shutil.rmtree(home)


def _serve_read_only(home: Path, url: str, schema: str) -> None:
    home.chmod(0o755)
    state = home / "state"
    state.mkdir()
    os.chown(state, UID, UID)
    config = home / "mlmon.yml"  # no `state:`: the default sqlite:///mlmon-state.sqlite, in the working directory
    config.write_text(
        f"refresh_interval: 1s\nstores: {{pg: {{url: '{url}'}}}}\n"
        f"models: [{{name: ctr, windows: [1h], predictions: {{store: pg, schema: {schema}, table: predictions,"
        " columns: {id: id, timestamp: ts, score: p}}}]\n"
    )
    config.chmod(0o644)
    port = free_port()
    # Opened here, before the remount: the server writes its output through this
    # descriptor, outside its read-only view and outside the state directory.
    log = home / "server.log"
    server = start_process(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            NAMESPACE_SCRIPT,
            "sh",
            sys.executable,
            "-m",
            "exporter",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
        ],
        log,
        env={**os.environ, "STATE": str(state), "PROBE": str(home / "probe"), "UID": str(UID)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(
            f"{base}/metrics",
            server,
            log,
            timeout=30,
            ready=lambda response: 'mlmon_source_up{model="ctr",source="predictions"} 1.0' in response.text,
        )
        assert 'mlmon_window_predictions{model="ctr",window="1h"} 30.0' in _metrics(base)
        with open(f"/proc/{server.pid}/status") as status:  # unshare and sh exec'd into the server
            uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
        assert uids == [str(UID)] * 4  # real, effective, saved, filesystem

        run = {
            "model": "ctr",
            "version": "v1",
            "trained_at": "2026-11-28T10:00:00Z",
            "training_rows": 1000,
            "validation_rows": 200,
            "validation_logloss": 0.31,
            "validation_roc_auc": 0.74,
            "features": [],
        }
        assert httpx.post(f"{base}/api/v1/training-runs", json=run).status_code == 201
        assert httpx.get(f"{base}/api/v1/models/ctr/versions").json()["versions"][0]["version"] == "v1"
    finally:
        server.terminate()
        server.wait(timeout=10)
    output = log.read_text()
    assert "Read-only file system" not in output and "Traceback" not in output, output
    assert sorted(p.name for p in state.iterdir() if not p.name.startswith("mlmon-state.sqlite")) == []
    assert (state / "mlmon-state.sqlite").stat().st_uid == UID
    assert not (home / "probe").exists()


def _metrics(base: str) -> str:
    try:
        return httpx.get(f"{base}/metrics").text
    except httpx.HTTPError:
        return ""
