"""The command line's process settings: glibc's malloc arenas capped before any thread starts."""

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
