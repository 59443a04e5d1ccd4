"""On-device runtimes: llama.cpp's GGUF files, for adapters and whole models, and Ollama Modelfiles.

>>> import lorakit
>>> lorakit.export_gguf("a.gguf", "runs/train/adapter")                 # a LoRA adapter for llama.cpp
>>> lorakit.export_gguf("m.gguf", "runs/train/adapter", merged=True)    # the base with it merged, standalone
>>> lorakit.load_adapter(model, "a.gguf")                               # and back

Importing this package registers the ".gguf" adapter file format with `lorakit.formats`, so that
`load_adapter`, `check_adapter` and `describe_adapter` take GGUF LoRA files. The heavy parts load when used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import AdapterFileError, ConfigError
from lorakit.formats import AdapterFormat, folder_refusal, register_format


@dataclass
class Exported:
    """What `export_gguf` wrote."""

    path: Path
    modelfile: Path | None
    tensors: int


def export_gguf(
    out: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    *,
    model: str | os.PathLike | None = None,
    merged: bool = False,
    outtype: str = "f32",
    modelfile: bool = True,
    allow_pickle: bool = False,
    progress: bool = False,
) -> Exported:
    """Write `adapter` (a folder, PEFT layout) as a llama.cpp GGUF LoRA file at `out`; with `merged`, write the
    base `model` with the adapter merged in (or the base alone, without an adapter) as a complete GGUF model.

    `model` is the base: None for the default SmolLM2, a .gguf file or a Hugging Face folder. `outtype` is f32,
    f16, bf16 or q8_0. With `modelfile`, an Ollama Modelfile is written beside `out`. Writes are atomic; every
    refusal is one line naming the layer and what to do instead. `progress`: a progress bar on stderr.
    """
    from lorakit.io import load_adapter
    from lorakit.models import default_gguf_path, load_model
    from lorakit.ondevice.adapter import adapter_gguf
    from lorakit.ondevice.model import model_gguf
    from lorakit.ondevice.modelfile import write_modelfile
    from lorakit.ondevice.writer import check_outtype, check_parent
    from lorakit.variants.ladder_io import is_ladder_folder

    out = Path(out)
    check_outtype(outtype)
    check_parent(out)  # before minutes of loading
    if adapter is None and not merged:
        raise ConfigError("an adapter is needed (or merged=True / --merged to write the base model alone)")
    if adapter is not None:
        if is_ladder_folder(adapter):
            raise ConfigError(f"{adapter}: a ladder side network has no llama.cpp form, merged or not")
        reason = folder_refusal(adapter, "gguf")  # a bad folder fails before the model loads
        if reason:
            raise ConfigError(reason)
    base_gguf = (
        default_gguf_path() if model is None else Path(model) if str(model).endswith(".gguf") else None
    )
    if merged:
        if adapter is None:
            m, tok = load_model(model)
        else:
            from lorakit.export import merged_model

            m, tok = merged_model(model, adapter, allow_pickle=allow_pickle)
        gf = model_gguf(m, outtype, base_gguf=base_gguf, tokenizer=tok, name=out.stem)
    else:
        m, tok = load_model(model)
        load_adapter(m, adapter, allow_pickle=allow_pickle)
        gf = adapter_gguf(m, outtype=outtype)
    written = gf.write(out, progress=progress)
    mf = None
    if modelfile:
        base = base_gguf if base_gguf is not None else Path(model)
        mf = write_modelfile(written, base, adapter=not merged, tokenizer=tok)
    return Exported(written, mf, len(gf.tensors))


def is_gguf_adapter(path: str | os.PathLike) -> bool:
    """Whether `path` is a GGUF file whose general.type says "adapter" (False for models and other files)."""
    path = Path(path)
    if not (path.is_file() and path.suffix.lower() == ".gguf"):
        return False
    from lorakit.ondevice.writer import open_gguf, read_field

    try:
        return read_field(open_gguf(path), "general.type") == "adapter"
    except AdapterFileError:
        return False


def _plan(model: Any, path: Path, raw: dict[str, Any], name: str, allow_pickle: bool) -> Any:
    from lorakit.ondevice.adapter import _plan as plan

    return plan(model, path, raw, name, allow_pickle)


def _apply(model: Any, plan: Any, name: str, trainable: bool) -> str:
    from lorakit.lora_format import apply_lora_plan

    return apply_lora_plan(model, plan, name, trainable)


def _describe(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    from lorakit.ondevice.adapter import describe_gguf

    return describe_gguf(path, raw)


def _refuse_save(model: Any, path: Path, name: str) -> Path:
    raise ConfigError("a GGUF adapter is written with lorakit.export_gguf or lorakit.ondevice.adapter")


register_format(
    AdapterFormat(
        peft_type="GGUF",
        label="GGUF LoRA",
        plan=_plan,
        apply=_apply,
        owns=lambda model, name: False,
        save=_refuse_save,
        describe=_describe,
        suffix=".gguf",
    )
)
