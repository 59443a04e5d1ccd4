"""The playground's workspace: the one folder every path the page names must stay inside.

    ws = Workspace(Path("playground"))
    ws.path("data/chat.jsonl")            # the real path, or a 403 APIError naming what was refused
    ws.save_upload("chat.jsonl", data)    # checked data (JSONL, JSON, CSV, Parquet), written atomically to data/

A path from the page is relative to the workspace. Absolute paths, `..`, NUL bytes and anything that resolves
(symlinks followed) outside the workspace are refused with a one-line 403; a path that does not exist is a 404.
Adapter files themselves are opened through `lorakit.serve.confine`, which checks each file as it is opened.

Layout: data/ (uploads), runs/<name>/ (training runs), adapters/ (combined adapters), mixes/ (the chat's
weighted mixes), exports/ (merged models, GGUF files), jobs/<id>/ (evaluation and export jobs' output).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.atomic import atomic_file, atomic_write, tree_size
from lorakit.data.files import SUFFIXES
from lorakit.data.jsonl import DataError
from lorakit.data.preference import parse_any
from lorakit.formats import CONFIG_NAME
from lorakit.serve import protocol as P

FOLDERS = ("data", "runs", "adapters", "mixes", "exports", "jobs")
DELETABLE = ("data", "adapters", "mixes", "exports")
"""The folders whose entries the page may delete (a run is deleted as a run: `Runs.delete`)."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""A run's, an upload's or an output's name: a single path component, no dot-files."""
SCAN_DEPTH = 4
"""How deep `listing` looks for adapter folders (runs/<name>/adapter is 3 deep)."""


def check_name(name: Any, what: str) -> str:
    """`name` if it is a plain file or folder name (letters, digits, . _ -); else a 400 naming `what`."""
    if not isinstance(name, str) or not NAME.match(name) or name in (".", ".."):
        raise P.bad(
            f"{what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            what,
        )
    return name


class Workspace:
    def __init__(self, root: str | os.PathLike) -> None:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = Path(os.path.realpath(root))
        for sub in FOLDERS:
            (self.root / sub).mkdir(exist_ok=True)

    # -- paths -------------------------------------------------------------------------------------------------

    def path(self, rel: Any, *, what: str = "path", must_exist: bool = True) -> Path:
        """The real path of workspace-relative `rel`: 403 if it leaves the workspace, 404 if missing."""
        if not isinstance(rel, str) or not rel.strip():
            raise P.bad(f"{what} must be a non-empty path inside the workspace", what)
        if "\x00" in rel:
            raise P.APIError(403, f"{what} {rel!r} refused: it contains a NUL byte", "path_refused", what)
        if Path(rel).is_absolute() or rel.startswith("~"):
            raise P.APIError(
                403, f"{what} {rel!r} refused: give a path relative to the workspace", "path_refused", what
            )
        if ".." in Path(rel).parts:
            raise P.APIError(403, f"{what} {rel!r} refused: it may not contain '..'", "path_refused", what)
        real = Path(os.path.realpath(self.root / rel))
        if not self.inside(real):
            raise P.APIError(
                403, f"{what} {rel!r} refused: it leads outside the workspace", "path_refused", what
            )
        if must_exist and not real.exists():
            raise P.APIError(
                404, f"{what} {rel!r}: no such file or folder in the workspace", "not_found", what
            )
        return real

    def inside(self, real: Path) -> bool:
        try:
            return os.path.commonpath([str(real), str(self.root)]) == str(self.root)
        except ValueError:
            return False

    def rel(self, real: Path) -> str:
        """The workspace-relative form of a path inside it (as the page names it)."""
        return Path(os.path.realpath(real)).relative_to(self.root).as_posix()

    # -- listing -----------------------------------------------------------------------------------------------

    def listing(self) -> dict[str, Any]:
        """What the page can pick from: data files, adapter folders, runs and exports."""
        data = [
            {"path": self.rel(f), "size": f.stat().st_size}
            for f in sorted((self.root / "data").iterdir())
            if f.suffix.lower() in SUFFIXES and f.is_file() and self.inside(Path(os.path.realpath(f)))
        ]
        exports = [
            {"path": self.rel(f), "size": tree_size(f)}
            for f in sorted((self.root / "exports").iterdir())
            if not f.name.startswith(".") and self.inside(Path(os.path.realpath(f)))
        ]
        runs = sorted(d.name for d in (self.root / "runs").iterdir() if d.is_dir() and NAME.match(d.name))
        return {"data": data, "adapters": self.adapter_folders(), "runs": runs, "exports": exports}

    def adapter_folders(self) -> list[dict[str, str]]:
        found: list[dict[str, str]] = []

        def walk(folder: Path, depth: int) -> None:
            if (folder / CONFIG_NAME).is_file():
                found.append({"path": self.rel(folder)})
                return
            if depth == 0:
                return
            for sub in sorted(folder.iterdir()):
                if (
                    sub.is_dir()
                    and not sub.is_symlink()
                    and not sub.name.startswith(".")
                    and sub.name != "jobs"
                ):
                    walk(sub, depth - 1)

        walk(self.root, SCAN_DEPTH)
        return [f for f in found if "/checkpoints/" not in f["path"]]

    # -- deleting ----------------------------------------------------------------------------------------------

    def remove(self, rel: Any, in_use: Callable[[Path], str | None]) -> str:
        """Delete a file or folder of data/, adapters/, mixes/ or exports/; a symlink there goes, not what it
        points at. 403 elsewhere (or for those folders themselves), 409 where `in_use(real path)` gives a reason
        (an adapter loaded from it). Returns the workspace-relative path that went."""
        real = self.path(rel, what="path")
        link = self.root / rel
        parts = Path(rel).parts
        if len(parts) != 2 or parts[0] not in DELETABLE:
            raise P.APIError(
                403,
                f"path {rel!r} refused: only the entries of {', '.join(f'{d}/' for d in DELETABLE)} can be "
                "deleted here (a run is deleted from the runs list)",
                "path_refused",
                "path",
            )
        reason = None if link.is_symlink() else in_use(real)
        if reason:
            raise P.APIError(409, f"{rel}: {reason}", "in_use", "path")
        discard(link)
        return str(rel)

    # -- uploads and downloads ---------------------------------------------------------------------------------

    def save_upload(
        self, name: Any, data: bytes, fields: dict[str, str] | None = None
    ) -> tuple[str, int, bool]:
        """Check `data` as a training file (JSONL, JSON, CSV, TSV or Parquet, by its name's suffix) of
        examples, of preference pairs (DPO, SimPO, ORPO, CPO), of tagged texts (token classification) or of text
        pairs (an embedding model's), and write
        it to data/<name> atomically:
        (path, examples or pairs, whether pairs). A bad file is a 400 whose message names the line
        ("chat.jsonl:3: not valid JSON ..."); nothing is written. `fields`: data.fields, the file's column
        names."""
        name = check_name(name, "name")
        if Path(name).suffix.lower() not in SUFFIXES:
            raise P.bad(f"upload {name!r}: the file name must end in one of {', '.join(SUFFIXES)}", "name")
        try:
            examples, pairs = parse_any(data, name, fields)
        except DataError as e:
            examples, pairs = _other_shape(data, name, fields), False
            if examples is None:
                raise P.bad(str(e), "file") from None
        out = self.root / "data" / name
        if out.exists():
            raise P.APIError(409, f"data/{name} exists already: pick another name", "exists", "name")
        atomic_file(out, data)
        return self.rel(out), len(examples), pairs

    def download(self, rel: Any) -> tuple[Path, str]:
        """(a file to send, its download name) for `rel`; a folder is zipped (atomically, into jobs/.zips)."""
        real = self.path(rel, what="path")
        if real.is_file():
            return real, real.name
        if not real.is_dir():
            raise P.bad(f"path {rel!r} is neither a file nor a folder", "path")
        zips = self.root / "jobs" / ".zips"
        zips.mkdir(parents=True, exist_ok=True)
        out = zips / (self.rel(real).replace("/", "_") + ".zip")

        def write(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
                for f in sorted(real.rglob("*")):
                    if f.is_file() and self.inside(Path(os.path.realpath(f))):
                        z.write(f, f.relative_to(real).as_posix())

        atomic_write(out, write)
        return out, real.name + ".zip"


def discard(path: Path) -> None:
    """Remove a file, a symlink or a folder: first renamed to a dot-name beside it (one atomic step, so no listing
    ever shows it half-deleted), then deleted."""
    tmp = path.with_name(f".deleting-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(path, tmp)
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


__all__ = ["Workspace", "check_name"]


def _other_shape(data: bytes, name: str, fields: dict[str, str] | None) -> list[dict[str, Any]] | None:
    """A file that is neither examples nor pairs, read as the first of the other shapes its first record has the
    keys of: tagged texts (`lorakit.data.tagging`: words and tags, or texts and entities) or an embedding model's
    text pairs (`lorakit.data.textpairs`: `anchor` and `positive`, by those names or data.fields'; not their other
    names, which an upload cannot tell from a question-and-answer file for fine-tuning). None where it has none of
    them (then the file's error is the examples' or pairs'); a 400 naming the record where it is shaped so but
    wrong."""
    from lorakit.data.files import parse_records
    from lorakit.data.tagging import tagged_of
    from lorakit.data.textpairs import text_pairs_of

    try:
        records = parse_records(data, name)
    except DataError:
        return None
    first = records[0][1] if records else None
    keys = set(first) | set(fields or {}) if isinstance(first, dict) else set()
    shapes = [
        (bool(keys & {"tokens", "tags", "ner_tags", "entities"}), tagged_of),
        ({"anchor", "positive"} <= keys, text_pairs_of),
    ]
    read = next((read for shaped, read in shapes if shaped), None)
    if read is None:
        return None
    try:
        return read(records, name, fields or {})
    except DataError as e:
        raise P.bad(str(e), "file") from None
