"""The malloc arena cap of `mlmon serve` (exporter/server/malloc.py); its effect on resident
memory is what the slow soak test measures."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from exporter.server.malloc import ARENAS, limit_malloc_arenas


def test_an_operators_malloc_arena_max_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


#: Run in a fresh interpreter: cap the arenas or not (argv[1]), let 8 threads allocate
#: blocks of 64 KiB (below glibc's mmap threshold, so they come from the thread's arena)
#: at once, then write glibc's malloc_info report, one ``<heap nr=...>`` per arena, to argv[2].
_COUNT_ARENAS = """
import ctypes, ctypes.util, sys, threading
if sys.argv[1] == "cap":
    from exporter.server.malloc import ARENAS, limit_malloc_arenas
    assert limit_malloc_arenas()
start = threading.Barrier(8)
def allocate():
    start.wait()
    for _ in range(200):
        blocks = [bytearray(64 * 1024) for _ in range(4)]
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]
report = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, report)
libc.fclose(report)
"""


def _arenas(tmp_path, mode: str) -> int:
    """The malloc arenas of a fresh interpreter after 8 threads allocated at once, as
    glibc's ``malloc_info`` reports them."""
    report = tmp_path / f"{mode}.xml"
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_ARENA_MAX, as `mlmon serve` may start
    subprocess.run([sys.executable, "-c", _COUNT_ARENAS, mode, str(report)], env=env, check=True)
    return report.read_text().count("<heap nr=")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="only glibc has malloc arenas to cap")
def test_the_cap_bounds_the_arenas_of_many_threads(tmp_path):
    """8 threads allocating at once: each gets an arena of its own (9 with the main one)
    without the cap, and share ``ARENAS`` with it."""
    assert _arenas(tmp_path, "uncapped") > ARENAS  # the control: the threads do make arenas
    assert _arenas(tmp_path, "cap") == ARENAS
