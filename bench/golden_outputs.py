"""Byte-identity check for refactors: hash what the CLI writes, before and after a change.

For every sample-model variant (and SmolLM2-135M with ``--real``) this runs, each as its own process,
``detect --json``, ``quantize`` (default, ``--format nbits``, ``--bits 8 --block-size 0``,
``--bits 8 --activations int8``) and ``ablate``, and records the SHA-256 of each output file (the .onnx and
its external data; the detect JSON without timings). ``--record FILE`` writes the hashes, ``--check FILE``
compares with a recording and exits 1 on any difference.

Run it on the old tree with ``--repo OLD_CHECKOUT`` (its package is imported from there) to make the
recording, then on the new one with ``--check``::

    git worktree add /tmp/base HEAD~N
    python bench/golden_outputs.py --repo /tmp/base --real --record /tmp/golden.json
    python bench/golden_outputs.py --real --check /tmp/golden.json

Paths and inputs are the same in both runs (a fixed work folder), so the detect JSON compares as bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("optimum", "gemm", "fp16", "external", "kvcache", "clean")
QUANTIZE_CASES = {
    "quantize-default": [],
    "quantize-nbits": ["--format", "nbits"],
    "quantize-int8-pc": ["--bits", "8", "--block-size", "0"],
    "quantize-w8a8": ["--bits", "8", "--activations", "int8"],
}


def _sha(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cli(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    return subprocess.run([sys.executable, "-m", "sw_onnx.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=str(repo))


def _model_cases(repo: Path, name: str, model: Path, work: Path) -> dict[str, dict]:
    """Hashes of every command's output on one model (``None`` entries: the command failed, with its code)."""
    out: dict[str, dict] = {}
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    report = folder / "detect.json"
    r = _cli(repo, "detect", model, "--json", report)
    out["detect"] = {"rc": r.returncode, "json": _sha(report)}
    for case, args in QUANTIZE_CASES.items():
        target = folder / f"{case}.onnx"
        r = _cli(repo, "quantize", model, "-o", target, "--force", *args)
        out[case] = {"rc": r.returncode, "onnx": _sha(target), "data": _sha(target.with_name(target.name + ".data"))}
    target = folder / "ablate.onnx"
    r = _cli(repo, "ablate", model, "-o", target, "--force")
    out["ablate"] = {"rc": r.returncode, "onnx": _sha(target), "data": _sha(target.with_name(target.name + ".data"))}
    return out


def collect(repo: Path, work: Path, real: bool) -> dict[str, dict]:
    sys.path.insert(0, str(ROOT))
    from sample_models.build import build_sample_model

    models = {}
    for variant in VARIANTS:
        models[variant] = build_sample_model(variant, work / "models").path
    if real:
        from sample_models.export_smollm2 import export_smollm2

        models["smollm2"] = export_smollm2(quiet=True) / "model.onnx"
    results = {}
    for name, model in models.items():
        print(f"{name}: {model}", flush=True)
        results[name] = _model_cases(repo, name, model, work / "out")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout whose sw_onnx is run (default: this one)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sw-onnx-golden"), help="fixed work folder")
    ap.add_argument("--real", action="store_true", help="also SmolLM2-135M (exported once and cached)")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", type=Path, help="write the hashes here")
    group.add_argument("--check", type=Path, help="compare with this recording")
    args = ap.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    results = collect(args.repo.resolve(), args.work, args.real)
    if args.record:
        args.record.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(f"recorded {sum(len(v) for v in results.values())} outputs to {args.record}")
        return 0
    expected = json.loads(args.check.read_text())
    differ = [f"{model}/{case}" for model, cases in expected.items() for case, hashes in cases.items()
              if results.get(model, {}).get(case) != hashes]
    same = sum(len(v) for v in expected.values()) - len(differ)
    print(f"{same} outputs identical, {len(differ)} differ" + (f": {', '.join(differ)}" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
