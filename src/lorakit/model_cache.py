"""What lorakit keeps in its cache (``$LORAKIT_CACHE``, default ``~/.cache/lorakit``), and which of it is stale.

    lorakit cache                      # every entry: kind, size, last use, whether anything still needs it
    lorakit cache clean --dry-run      # what `clean` would remove, and the space it would free
    lorakit cache clean                # remove the stale entries
    lorakit cache clean --unused-days 30 --all

The cache holds converted models (``models/NAME-KEY``, one per GGUF content, lorakit.models), the native NF4
kernels (``kernels/nf4-KEY.so``, one per source, compiler and CPU, lorakit.quant.native) and the CPU's bf16
probe (``cpu_bf16.json``); benchmarks/random_checkpoint.py also writes its random-weight checkpoints under
``models/``. A converted model is stale when no GGUF file that it came from is still there unchanged, when an
older lorakit made it (another conversion version, or no source record), or when it is an incomplete or
abandoned temporary. Checkpoints and any other folder are never stale (they cost minutes to write again). A kernel is stale when it was built from other source, by another compiler or
for another CPU than this machine's now. ``clean`` removes only stale entries; ``--unused-days N`` adds the
conversions not used for N days, and ``--all`` everything (all of it is rebuilt on demand).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from lorakit.atomic import mtime_of, tree_size
from lorakit.envflags import cache_root
from lorakit.models import CONVERSION, DIGESTS, SOURCE_FILE, TMP_PREFIX, is_complete

_CONVERSION_NAME = re.compile(r"^.+-[0-9a-f]{12}$")
"""How lorakit names a converted model (the GGUF's stem, then its key)."""
TEMP_GRACE_S = 3600.0
"""A temporary younger than this may belong to a conversion that is running now: it is left alone."""


@dataclass(frozen=True)
class Entry:
    path: Path
    kind: str
    """model (a converted GGUF), checkpoint (a generated random-weight one), folder (anything else under models/),
    kernel, probe, temporary, or digest (a GGUF file's remembered hash)"""
    size_bytes: int
    last_used: float
    """Unix time: the latest use lorakit recorded (for a model, the latest use of a file that maps to it)."""
    stale: str | None
    """Why nothing needs it any more, or None while something does."""
    sources: tuple[str, ...] = ()
    """The GGUF files, still there and unchanged, that a converted model serves."""

    def as_json(self) -> dict:
        return {**asdict(self), "path": str(self.path), "sources": list(self.sources)}


def entries(cache_dir: str | os.PathLike | None = None) -> list[Entry]:
    """Every entry of the cache, models first, each with the reason it is stale (or None)."""
    root = cache_root(cache_dir)
    return [*_models(root / "models"), *_kernels(root / "kernels"), *_probes(root)]


def clean(
    cache_dir: str | os.PathLike | None = None,
    *,
    unused_days: float | None = None,
    everything: bool = False,
    dry_run: bool = False,
) -> list[Entry]:
    """Remove the stale entries (with ``unused_days``, also the models unused that long; with ``everything``, all
    but temporaries that a running conversion may be writing). Returns what was (or, dry, would be) removed."""
    if unused_days is not None and unused_days < 0:
        raise ValueError(f"--unused-days must be 0 or more, got {unused_days}")
    cutoff = None if unused_days is None else time.time() - unused_days * 86400
    chosen = [e for e in entries(cache_dir) if _goes(e, cutoff, everything)]
    if not dry_run:
        for e in chosen:
            if e.path.is_dir() and not e.path.is_symlink():
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                e.path.unlink(missing_ok=True)
    return chosen


def _goes(e: Entry, cutoff: float | None, everything: bool) -> bool:
    if e.kind == "temporary":
        return e.stale is not None  # a young one may be a conversion running now, even with --all
    if e.stale is not None or everything:
        return True
    return cutoff is not None and e.kind == "model" and e.last_used < cutoff


# -- converted models ------------------------------------------------------------------------------------------


def _models(models: Path) -> Iterable[Entry]:
    if not models.is_dir():
        return
    memos = _memos(models / DIGESTS)
    for d in sorted(models.iterdir()):
        if d.name == DIGESTS:
            continue
        mtime = mtime_of(d)
        if d.name.startswith(TMP_PREFIX):
            yield _temporary(d, "left by a killed conversion")
            continue
        source = _read_json(d / SOURCE_FILE) or {}
        if "generated" in source:  # a random-weight checkpoint of benchmarks/random_checkpoint.py
            yield Entry(d, "checkpoint", tree_size(d), mtime, None)
            continue
        if "sha256" not in source and not _CONVERSION_NAME.match(d.name):
            yield Entry(d, "folder", tree_size(d), mtime, None)  # not ours to judge: only --all removes it
            continue
        if not is_complete(d):
            yield Entry(d, "model", tree_size(d), mtime, "incomplete conversion")
            continue
        if "sha256" not in source:
            yield Entry(d, "model", tree_size(d), mtime, "made by an older lorakit (no source record)")
            continue
        if source.get("conversion") != CONVERSION:
            yield Entry(
                d,
                "model",
                tree_size(d),
                mtime,
                f"conversion version {source.get('conversion')}, now {CONVERSION}",
            )
            continue
        mine = [m for m in memos if m["sha256"] == source["sha256"]]
        live = tuple(sorted({m["path"] for m in mine if m["live"]}))
        last = max([mtime, *(m["used"] for m in mine)])
        yield Entry(
            d, "model", tree_size(d), last, None if live else "its GGUF file is gone or changed", live
        )
    for m in memos:
        if not m["live"]:
            yield Entry(
                m["file"], "digest", tree_size(m["file"]), m["used"], "its GGUF file is gone or changed"
            )


def _memos(folder: Path) -> list[dict]:
    """Each remembered hash: the file it names, whether that file is still there unchanged, when it was used."""
    out = []
    if not folder.is_dir():
        return out
    for f in sorted(folder.glob("*.json")):
        record = _read_json(f)
        if not record or not isinstance(record.get("sha256"), str) or not isinstance(record.get("path"), str):
            out.append({"file": f, "sha256": None, "path": "?", "live": False, "used": mtime_of(f)})
            continue
        try:
            st = Path(record["path"]).stat()
            live = (st.st_size, st.st_mtime_ns) == (record.get("size"), record.get("mtime_ns"))
        except OSError:
            live = False
        out.append(
            {"file": f, "sha256": record["sha256"], "path": record["path"], "live": live, "used": mtime_of(f)}
        )
    return out


# -- kernels and probes ----------------------------------------------------------------------------------------


def _kernels(folder: Path) -> Iterable[Entry]:
    if not folder.is_dir():
        return
    from lorakit.quant.native import kernel_path

    current = kernel_path(folder.parent)
    for f in sorted(folder.iterdir()):
        if f.is_dir():  # a build's temporary folder
            yield _temporary(f, "left by a killed build")
            continue
        mine = current is not None and f.name == current.name
        stale = None if mine else "built from other source, by another compiler or for another CPU"
        yield Entry(f, "kernel", tree_size(f), mtime_of(f), stale)


def _probes(root: Path) -> Iterable[Entry]:
    for f in sorted(root.glob("*.json")) if root.is_dir() else []:
        yield Entry(f, "probe", tree_size(f), mtime_of(f), None)


# -- helpers ---------------------------------------------------------------------------------------------------


def _temporary(path: Path, why: str) -> Entry:
    """A temporary: stale (`why`) once older than TEMP_GRACE_S, before that perhaps still being written."""
    mtime = mtime_of(path)
    return Entry(
        path, "temporary", tree_size(path), mtime, why if time.time() - mtime >= TEMP_GRACE_S else None
    )


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


__all__ = ["Entry", "clean", "entries"]
