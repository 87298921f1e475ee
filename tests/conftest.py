"""Shared fixtures."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture
def run_cli():
    """Run `sw-onnx ARGS...` in a subprocess, as a user would; returns the CompletedProcess."""

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sw_onnx.cli", *args], capture_output=True, text=True, timeout=timeout
        )

    return run
