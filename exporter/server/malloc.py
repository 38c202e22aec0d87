"""glibc malloc tuning for the long-running server.

glibc gives threads their own malloc arenas, up to 8 per core, and returns an arena's
free memory to the system only from the top of its heap. The refresh threads (one per
running refresh) allocate in many arenas, and memory freed there stays resident: in the
load test (50 models every 15 s, tests/integration/server/test_soak.py) resident memory
rose by about 3 MB a minute, outside the Python heap, with a thread per refresh and with
one long-lived thread per model alike; with at most 2 arenas (``MALLOC_ARENA_MAX=2``,
or this module) it was flat for 10 minutes, then grew by about 1.3 MB a minute, from
store connections opened and closed at every refresh (fixed by pools sized to the models:
``server.app.store_pools``, docs/reliability.md). Python's own small objects come from
pymalloc, which needs no such tuning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

#: ``mallopt``'s parameter number of ``M_ARENA_MAX`` (glibc's malloc.h).
_M_ARENA_MAX = -8
#: The arenas mlmon allows: the main one and one shared by every other thread.
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``arenas``, as ``MALLOC_ARENA_MAX`` would; call it before
    the process starts threads (glibc fixes the limit when a second thread first allocates).

    A no-op, returning False, when ``MALLOC_ARENA_MAX`` is set (the operator's choice wins)
    or the C library is not glibc (musl has no arenas to cap). True when applied.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or no mallopt in it
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(_M_ARENA_MAX, arenas))
    log.debug("malloc arenas capped at %d: %s", arenas, applied)
    return applied
