"""Settings of the sw-onnx process itself, made once by the command line before any work starts."""

from __future__ import annotations

import ctypes
import platform

MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def cap_malloc_arenas(limit: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas at `limit` (the ``MALLOC_ARENA_MAX`` setting); True where it took effect.

    glibc gives each new thread its own arena, up to 8 per CPU, and a thread's arena keeps pages its freed
    arrays used. The quantizer's save threads, onnxruntime's and the hashing thread each left one: on
    bench/large_model.py's 2.67 GB decoder the bare quantize held 187-226 MB of heap before verification
    instead of 100-104, and peaked at 1,066-1,142 MB instead of 1,009-1,036; SmolLM2 at 645-655 MB instead of
    528-533 (3-4 alternating runs each); wall time the same within the runs' spread. It must run before threads start (glibc
    fixes the limit when the ninth arena is asked for), so the command line calls it first; the Python API
    leaves its host process as it is (``MALLOC_ARENA_MAX=2`` in the environment does the same there).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - a libc without mallopt
        return False
    return bool(mallopt(_M_ARENA_MAX, int(limit)))
