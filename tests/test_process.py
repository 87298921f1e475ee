"""The command line's process settings: glibc's malloc arenas capped before any thread starts, freed memory
returned before verification; the Python API leaves its host process alone."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="malloc arenas are glibc's")

# Six threads allocate at once, then glibc's malloc_stats lists one "Arena N:" block per arena on stderr.
_COUNT_ARENAS = """
import ctypes, sys, threading
{setup}
barrier = threading.Barrier(6)
def work():
    barrier.wait()
    blocks = [ctypes.create_string_buffer(1 << 16) for _ in range(4)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
ctypes.CDLL(None).malloc_stats()
"""


def _arenas(setup: str) -> int:
    done = subprocess.run([sys.executable, "-c", _COUNT_ARENAS.format(setup=setup)], capture_output=True, text=True,
                          timeout=120, check=True)
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


def test_threads_share_at_most_two_arenas_once_capped():
    from sw_onnx._process import MALLOC_ARENAS

    assert _arenas("") > MALLOC_ARENAS  # glibc's default: a new arena per thread (the probe can fail)
    assert _arenas("from sw_onnx._process import cap_malloc_arenas; assert cap_malloc_arenas()") == MALLOC_ARENAS


def test_the_command_line_caps_arenas_before_its_work():
    setup = "from sw_onnx import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass"
    from sw_onnx._process import MALLOC_ARENAS

    assert _arenas(setup) == MALLOC_ARENAS


# 100 blocks of 2 MiB, each followed by a small one that stays, are written and freed: the RSS they leave.
_FREED_BLOCKS_LEFT_RESIDENT = """
import ctypes, sys
from sw_onnx import _process
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mb():
    return int([l for l in open("/proc/self/status") if l.startswith("RssAnon")][0].split()[1]) // 1024
libc.free(libc.malloc(16 << 20))  # glibc now serves blocks under 16 MiB from its heap
{setup}
before = rss_mb()
blocks, pins = [], []
for _ in range(100):
    blocks.append(libc.malloc(2 << 20))
    pins.append(libc.malloc(100 << 10))
    ctypes.memset(blocks[-1], 1, 2 << 20)
for b in blocks:
    libc.free(b)
print(rss_mb() - before)
"""


def _resident_after_free(setup: str) -> int:
    done = subprocess.run([sys.executable, "-c", _FREED_BLOCKS_LEFT_RESIDENT.format(setup=setup)], capture_output=True,
                          text=True, timeout=120, check=True)
    return int(done.stdout)


def test_freed_memory_goes_back_only_in_sw_onnxs_own_process():
    """In a host process (the Python API) `release_freed_memory` does nothing and the freed blocks stay resident
    in glibc's heap (the probe can fail); once the command line owns the process they go back at once."""
    assert _resident_after_free("assert not _process.release_freed_memory()") >= 150
    owned = "_process.configure_command_line_process()\nassert _process.release_freed_memory()"
    assert _resident_after_free(owned) < 20
