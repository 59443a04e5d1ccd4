"""Reading the files lorakit is given (adapter folders, checkpoints): every failure is one line naming the file.

Missing, a folder where a file should be, unreadable, not UTF-8, not JSON, a truncated or corrupt safetensors
file, a pickle that `torch.load(weights_only=True)` refuses: each raises `error` (AdapterFileError unless the
caller says otherwise, e.g. CheckpointError) with the path first. Nothing here unpickles code. `ModelTensors` reads
a model folder's safetensors one tensor at a time (`lorakit extract`).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lorakit.errors import AdapterFileError, ModelLoadError

ErrorType = type[Exception]


def _check_file(file: Path, error: ErrorType) -> None:
    if not file.exists():
        raise error(f"{file}: missing")
    if not file.is_file():
        raise error(f"{file}: not a file ({'a folder' if file.is_dir() else 'a special file'})")


def _os_reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def read_json(file: str | os.PathLike, error: ErrorType = AdapterFileError) -> Any:
    """The parsed JSON content of `file`."""
    file = Path(file)
    _check_file(file, error)
    try:
        text = file.read_bytes().decode("utf-8")
    except OSError as e:
        raise error(f"{file}: cannot be read ({_os_reason(e)})") from None
    except UnicodeDecodeError as e:
        raise error(f"{file}: not valid JSON (not UTF-8 text: byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{file}: not valid JSON ({e})") from None


def read_safetensors(file: str | os.PathLike, error: ErrorType = AdapterFileError) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU."""
    file = Path(file)
    _check_file(file, error)
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise error(f"{file}: corrupt or truncated safetensors file ({_one_line(e)})") from None


def safetensors_metadata(file: str | os.PathLike, error: ErrorType = AdapterFileError) -> dict[str, str]:
    """The string metadata of a safetensors file's header ({} if it has none)."""
    file = Path(file)
    _check_file(file, error)
    try:
        with safe_open(str(file), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise error(f"{file}: corrupt or truncated safetensors file ({_one_line(e)})") from None


def load_weights_only(file: str | os.PathLike, error: ErrorType = AdapterFileError) -> Any:
    """`torch.load(file, weights_only=True)`: tensors, numbers and containers only, never code."""
    file = Path(file)
    _check_file(file, error)
    try:
        return torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the file wants globals the safe unpickler does not allow
        raise error(
            f"{file}: refused by torch.load(weights_only=True), it holds more than tensors ({_refusal(e)}); "
            "convert it to safetensors from a trusted copy"
        ) from None
    except Exception as e:  # noqa: BLE001 - any other failure to unpickle (truncated zip, not a torch file)
        raise error(f"{file}: cannot be loaded with weights_only=True ({_one_line(e)})") from None


def _refusal(e: Exception) -> str:
    """The line of torch's multi-line weights_only message that says what was refused."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Trying to load", "Unsupported", "Weights only load failed because")):
            return line.rstrip(".")
    keep = [x for x in lines if not x.startswith(("Weights only load failed", "Check the documentation"))]
    return (keep[0] if keep else "UnpicklingError").rstrip(".")


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ModelTensors:
    """A Hugging Face model folder's safetensors (one file or shards), read one tensor at a time. Each read opens
    and closes its file, so that no mapping of the files stays resident (reading two 3.4 GB checkpoints through
    open mappings kept about 9 GB in the process's RSS). Every failure is one line naming the file (`error`)."""

    def __init__(self, folder: Path, error: ErrorType = ModelLoadError) -> None:
        self.folder = folder
        self._error = error
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise error(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
            paths = sorted({folder / v for v in weight_map.values()})
        elif (folder / "model.safetensors").is_file():
            paths = [folder / "model.safetensors"]
        else:
            raise error(
                f"{folder}: no model.safetensors (only safetensors are read; save the model with "
                "save_pretrained(safe_serialization=True))"
            )
        self._files: dict[str, Path] = {}
        for p in paths:  # each file's header, checked once; the index must name what the files hold
            try:
                with safe_open(str(p), "pt") as f:
                    self._files.update(dict.fromkeys(f.keys(), p))
            except (OSError, SafetensorError) as e:
                raise error(f"{p}: cannot read it as safetensors ({e})") from e

    def key(self, name: str, prefix: str) -> str | None:
        """The checkpoint's key for parameter `name` (some checkpoints leave out the base model's prefix)."""
        if name in self._files:
            return name
        bare = name.removeprefix(prefix + ".")
        return bare if bare in self._files else None

    def keys(self) -> list[str]:
        return list(self._files)

    def get(self, key: str) -> torch.Tensor:
        path = self._files[key]
        try:
            with safe_open(str(path), "pt") as f:
                return f.get_tensor(key)
        except (OSError, SafetensorError) as e:
            raise self._error(f"{path}: cannot read {key} ({e})") from e
