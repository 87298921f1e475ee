"""onnxruntime-genai model folders: reading (and checking) ``genai_config.json``, and writing a quantized copy.

A folder written by onnxruntime-genai's model builder (or Olive) holds the decoder (``model.decoder.filename``,
usually model.onnx with external data), ``genai_config.json`` and the tokenizer files. The config is untrusted
input like the model: a file name outside the folder, missing keys or wrong types end in one clear line.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sw_onnx.errors import ModelLoadError

__all__ = ["CONFIG_NAME", "GenaiConfig", "copy_folder_files", "find_config", "read_config", "write_config"]

CONFIG_NAME = "genai_config.json"


@dataclass
class GenaiConfig:
    """What sw-onnx takes from ``genai_config.json`` (``model.decoder``, and the special token ids).

    Attributes:
        path: the config file.
        filename: the decoder's .onnx, inside the folder.
        head_size, num_key_value_heads, num_hidden_layers: the KV cache's shape.
        inputs, outputs: ``model.decoder.inputs`` / ``outputs`` (names and ``%d`` patterns).
        bos_token_id, eos_token_ids, pad_token_id: from ``model``.
        data: the whole parsed document (written back with the file name updated).
    """

    path: Path
    filename: Path
    head_size: int
    num_key_value_heads: int
    num_hidden_layers: int
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    data: dict = field(default_factory=dict)

    @property
    def past_patterns(self) -> tuple[str, str]:
        """``(key pattern, value pattern)`` of the past KV inputs, e.g. ``past_key_values.%d.key``."""
        return self.inputs.get("past_key_names", "past_key_values.%d.key"), self.inputs.get("past_value_names", "past_key_values.%d.value")


def find_config(model_path: Path) -> Path | None:
    """The genai_config.json of the folder holding `model_path` (or of the folder itself), if any."""
    folder = model_path if model_path.is_dir() else model_path.parent
    candidate = folder / CONFIG_NAME
    return candidate if candidate.is_file() else None


def read_config(path: Path) -> GenaiConfig:
    """Parse and check a ``genai_config.json``.

    Raises:
        ModelLoadError: unreadable JSON, a missing key or a wrong type, or a decoder file name that leaves
            the folder (absolute, ``..``, or a symlink pointing outside).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{path}: not readable JSON ({e})", hint="check the onnxruntime-genai config") from None
    model = _get(data, path, "model", dict)
    decoder = _get(model, path, "model.decoder", dict, key="decoder")
    filename = _get(decoder, path, "model.decoder.filename", str, key="filename")
    config = GenaiConfig(
        path=path, filename=_inside(path.parent, filename, path),
        head_size=_get(decoder, path, "model.decoder.head_size", int, key="head_size"),
        num_key_value_heads=_get(decoder, path, "model.decoder.num_key_value_heads", int, key="num_key_value_heads"),
        num_hidden_layers=_get(decoder, path, "model.decoder.num_hidden_layers", int, key="num_hidden_layers"),
        inputs=_names(decoder, path, "inputs"), outputs=_names(decoder, path, "outputs"),
        bos_token_id=_optional_id(model.get("bos_token_id"), path, "model.bos_token_id"),
        pad_token_id=_optional_id(model.get("pad_token_id"), path, "model.pad_token_id"),
        data=data,
    )
    eos = model.get("eos_token_id")
    eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
    config.eos_token_ids = [_optional_id(e, path, "model.eos_token_id") for e in eos_list]
    for name in ("head_size", "num_key_value_heads", "num_hidden_layers"):
        if getattr(config, name) <= 0:
            raise ModelLoadError(f"{path}: model.decoder.{name} is {getattr(config, name)}, expected a positive integer")
    return config


def _get(mapping: dict, path: Path, what: str, kind: type, key: str | None = None):
    key = key or what
    value = mapping.get(key) if isinstance(mapping, dict) else None
    if value is None:
        raise ModelLoadError(f"{path}: missing {what}", hint="the folder's genai_config.json is incomplete")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ModelLoadError(f"{path}: {what} is {type(value).__name__}, expected {kind.__name__}",
                             hint="the folder's genai_config.json is malformed")
    return value


def _names(decoder: dict, path: Path, key: str) -> dict[str, str]:
    names = decoder.get(key, {})
    if not isinstance(names, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise ModelLoadError(f"{path}: model.decoder.{key} must map names to strings",
                             hint="the folder's genai_config.json is malformed")
    return dict(names)


def _optional_id(value, path: Path, what: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ModelLoadError(f"{path}: {what} is {value!r}, expected a token id")
    return value


def _inside(folder: Path, name: str, path: Path) -> Path:
    """`folder / name`, refused when it is absolute, climbs out with ``..`` or resolves outside the folder."""
    candidate = Path(name)
    if not name or candidate.is_absolute() or ".." in candidate.parts:
        raise ModelLoadError(f"{path}: model.decoder.filename {name!r} is outside the model's folder",
                             hint="onnxruntime-genai reads the model from the folder itself")
    target = folder / candidate
    if not os.path.realpath(target).startswith(os.path.realpath(folder) + os.sep):
        raise ModelLoadError(f"{path}: model.decoder.filename {name!r} resolves outside the model's folder",
                             hint="replace the symlink by the file")
    if not target.is_file():
        raise ModelLoadError(f"{path}: model.decoder.filename {name!r}: no such file in {folder}")
    return target


def write_config(config: GenaiConfig, folder: Path, filename: str) -> Path:
    """Write `config`'s document to ``folder/genai_config.json`` with the decoder file name replaced."""
    data = json.loads(json.dumps(config.data))
    data["model"]["decoder"]["filename"] = filename
    target = folder / CONFIG_NAME
    target.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")
    return target


def copy_folder_files(src_folder: Path, dst_folder: Path, skip: set[str]) -> list[str]:
    """Copy the folder's other regular files (tokenizer, chat template, ...) that are not in `skip`.

    Symlinks and sub-folders are not followed: only what the folder itself holds is copied."""
    copied = []
    for entry in sorted(src_folder.iterdir()):
        if entry.name in skip or entry.name.startswith(".") or entry.is_symlink() or not entry.is_file():
            continue
        shutil.copy2(entry, dst_folder / entry.name)
        copied.append(entry.name)
    return copied


def generate_check(folder: Path, prompt_ids: list[int], new_tokens: int = 8) -> dict:
    """One short greedy generation with onnxruntime-genai (`og.Model` + `og.Generator`) on `folder`.

    Returns ``{"ran": bool, "new_tokens": [...], "error": str | None}``; ``ran`` is False with the reason when
    onnxruntime-genai is not installed (the optional ``genai`` extra) or fails on the folder.
    """
    try:
        import onnxruntime_genai as og
    except ImportError:
        return {"ran": False, "new_tokens": [], "error": "onnxruntime-genai is not installed (extra: genai)"}
    try:
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt_ids) + new_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens([int(t) for t in prompt_ids])
        produced = []
        while not generator.is_done() and len(produced) < new_tokens:
            generator.generate_next_token()
            produced.append(int(generator.get_next_tokens()[0]))
        return {"ran": True, "new_tokens": produced, "error": None}
    except Exception as e:  # onnxruntime-genai raises its own types
        return {"ran": False, "new_tokens": [], "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}
