"""Shared fixtures."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def run_cli():
    """Run `sw-onnx ARGS...` in a subprocess, as a user would; returns the CompletedProcess.

    Session-scoped (it is a plain function), so module-scoped fixtures can use it too; `cwd` runs it elsewhere.
    """

    def run(*args: str, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sw_onnx.cli", *map(str, args)], capture_output=True, text=True,
            timeout=timeout, cwd=cwd,
        )

    return run
