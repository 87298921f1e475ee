"""What every benchmark here shares: running a command as its own process and reading its cost, and writing
the markdown table and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path


def run_measured(cmd: list[str], *, cwd: str | os.PathLike | None = None, env: dict | None = None) -> dict:
    """Run `cmd` to completion: ``{"seconds": wall time, fork to exit, "peak_rss_mb": the process's own peak
    resident memory (ru_maxrss from wait4: the whole process, imports and interpreter included), "stdout"}``.

    Raises:
        RuntimeError: the command failed (its stderr is in the message).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it ourselves: its own rusage, not all children's
        seconds = time.perf_counter() - started
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {code}: {stderr[-2000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": stdout}


def write_outputs(text: str, data: dict, markdown: str | None, json_path: str | None) -> None:
    """Print the markdown `text`, and write it and `data` where asked."""
    print(text)
    if markdown:
        Path(markdown).write_text(text + "\n")
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=2) + "\n")
