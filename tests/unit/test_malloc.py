"""The malloc arena cap of `mlmon serve` (exporter/server/malloc.py); its effect on resident
memory is what the slow soak test measures."""

from __future__ import annotations

import ctypes.util
import platform
import subprocess
import sys

import pytest

from exporter.server.malloc import limit_malloc_arenas


def test_an_operators_malloc_arena_max_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="only glibc has malloc arenas to cap")
def test_the_cap_is_applied_on_glibc():
    assert ctypes.util.find_library("c") is not None
    # In a fresh interpreter without MALLOC_ARENA_MAX, as `mlmon serve` starts.
    code = "from exporter.server.malloc import limit_malloc_arenas; print(limit_malloc_arenas())"
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "True"
