"""The sw-onnx command ends without the interpreter's teardown (`sw_onnx._process.exit_without_teardown`), and
nothing a finished process owes is lost: its exit status, buffered output, exit handlers, working threads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sample_models import build_sample_model

_PROBE = """
import atexit, sys, threading, time
from sw_onnx._process import exit_without_teardown
atexit.register(lambda: print("exit handler ran"))
def work():
    time.sleep(0.3)
    print("worker finished")
threading.Thread(target=work).start()
sys.stdout.write("buffered output\\n")
exit_without_teardown({code!r})
print("not reached")
"""


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (3, 3), ("bad thing", 1)])
def test_exit_keeps_what_a_finished_process_owes(code, status):
    done = subprocess.run([sys.executable, "-c", _PROBE.format(code=code)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == status
    assert done.stdout.splitlines() == ["buffered output", "worker finished", "exit handler ran"]
    assert done.stderr == ("bad thing\n" if isinstance(code, str) else "")


_THROUGH = """
import runpy, sys
import sw_onnx._process as process
real = process.exit_without_teardown
def recorded(code):
    print("exit_without_teardown", code)
    real(code)
process.exit_without_teardown = recorded
sys.argv = ["sw-onnx", *{args!r}]
runpy.run_module("sw_onnx.cli", run_name="__main__")
"""


@pytest.mark.parametrize(("args", "status"), [(["--help"], 0), (["quantize", "missing.onnx"], 1), (["nonsense"], 2)])
def test_the_command_ends_through_it(tmp_path, args, status):
    """`python -m sw_onnx.cli` and the `sw-onnx` script (pyproject.toml) run `entry_point`, whatever the outcome."""
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^sw-onnx = "sw_onnx.cli:entry_point"$', pyproject, re.M)
    done = subprocess.run([sys.executable, "-c", _THROUGH.format(args=args)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == status
    assert done.stdout.splitlines()[-1] == f"exit_without_teardown {status}"
    assert "Traceback" not in done.stderr and (status == 0 or done.stderr.startswith("error: "))


def test_a_report_piped_to_stdout_arrives_whole(run_cli, tmp_path):
    sample = build_sample_model("optimum", tmp_path)
    done = run_cli("detect", sample.path, "--json", "-")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["schema"] == "sw-onnx/detect"
    assert {(s["row"], s["col"]) for s in report["super_weights"]} == {(p.row, p.col) for p in sample.super_weights}
