"""Settings of the sw-onnx process itself, only where sw-onnx owns the process (the command line calls
`configure_command_line_process` first and ends through `exit_without_teardown`): glibc's malloc tuned, the
interpreter's teardown skipped. The Python API leaves its host process as it is."""

from __future__ import annotations

import ctypes
import platform
import sys
from typing import NoReturn

MALLOC_ARENAS = 2
RETURNED_FROM_BYTES = 128 << 10  # glibc's own starting threshold
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8

_owns_process = False


def configure_command_line_process() -> None:
    """Called by the command line before anything else: sw-onnx owns this process (`release_freed_memory`
    may act) and its malloc arenas are capped (`cap_malloc_arenas`)."""
    global _owns_process
    _owns_process = True
    cap_malloc_arenas()


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
    except (OSError, AttributeError):  # pragma: no cover - a libc without them
        return None
    return libc


def cap_malloc_arenas(limit: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas at `limit` (the ``MALLOC_ARENA_MAX`` setting); True where it took effect.

    glibc gives each new thread its own arena, up to 8 per CPU, and a thread's arena keeps pages its freed
    arrays used. The quantizer's save threads, onnxruntime's and the hashing thread each left one: on
    bench/large_model.py's 2.67 GB decoder the bare quantize held 187-226 MB of heap before verification
    instead of 100-104, and peaked at 1,066-1,142 MB instead of 1,009-1,036; SmolLM2 at 645-655 MB instead of
    528-533 (3-4 alternating runs each); wall time the same within the runs' spread. It must run before threads
    start (glibc fixes the limit when the ninth arena is asked for), hence `configure_command_line_process`;
    ``MALLOC_ARENA_MAX=2`` in the environment does the same for any process.
    """
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_ARENA_MAX, int(limit)))


def release_freed_memory() -> bool:
    """From now on, buffers of 128 KiB or more go back to the system when freed; the heap's free pages go
    now. Only in sw-onnx's own process (`configure_command_line_process`); True where it took effect.

    glibc raises its mmap threshold to the largest block freed so far (32 MiB at most): after the quantizer's
    arrays, onnxruntime's allocations while verification opens the quantized model (the fused copies of its
    weights) came from the heap, whose freed pages stayed resident. The 2.67 GB decoder's bare quantize then
    peaked at 1,009-1,040 MB, and at 832-839 MB with the threshold back at its start (2 alternating runs, 3 more
    runs alike with other settings); SmolLM2 541-547 and 538-543 MB. Freed blocks now go back at once, and
    glibc keeps the threshold where it is set (a mallopt turns its adjustment off), so this waits until the
    quantizer's work is done.
    """
    libc = _glibc() if _owns_process else None
    if libc is None:
        return False
    libc.malloc_trim(0)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, RETURNED_FROM_BYTES)
                and libc.mallopt(_M_TRIM_THRESHOLD, RETURNED_FROM_BYTES))


def skip_numba_blas_probe() -> bool:
    """In sw-onnx's own process, load numba's numpy support with scipy's BLAS reported absent; True where it
    took effect.

    When numba first compiles or loads code, `numba.np.arraymath` imports `scipy.linalg` to see whether its
    numpy functions can call BLAS: 0.2-0.3 s, a third of numba's start in sw-onnx's command (where scipy is
    installed). `sw_onnx.kernels_jit` calls no BLAS. The import is answered "absent" for that moment only (numba
    then keeps its own loops for the few functions that would use BLAS) and works again after. Elsewhere (the
    Python API in a host process, which may use numba itself) nothing changes.
    """
    blas = "scipy.linalg.cython_blas"
    if not _owns_process or "numba.np.arraymath" in sys.modules or blas in sys.modules:
        return False
    sys.modules[blas] = None  # importing it now raises ImportError at once
    try:
        import numba.np.arraymath  # noqa: F401 - the probe runs at its import
    finally:
        del sys.modules[blas]
    return True


def exit_without_teardown(code: int | str | None) -> NoReturn:
    """End the command-line process as `sys.exit(code)` would, less the interpreter's teardown.

    What a finished process needs still happens, in `Py_FinalizeEx`'s order: threads that are not daemons are
    joined (idle thread pools shut down), the exit handlers run, the standard streams are flushed. What is
    skipped is freeing every object and running the libraries' static destructors (onnxruntime's, LLVM's under
    numba): 0.3 s after SmolLM2's bare quantize (0.17 s when numba is not loaded) for memory the system takes
    back at once (clang skips freeing its trees at exit for the same reason). Only for the `sw-onnx` command itself
    (`sw_onnx.cli.entry_point`): `cli.main` called as a function returns through `SystemExit` as before.
    """
    import atexit
    import os
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is None:  # pragma: no cover - an interpreter without it: the ordinary exit
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        status = 1
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed, or a pipe whose reader left
            pass
    os._exit(status & 0xFF)
