"""Data files as records: JSON Lines, JSON arrays, CSV/TSV, Parquet and Arrow, and `datasets` folders, each
record with where it came from.

    read_records("train.jsonl")    # [("train.jsonl:1", {...}), ("train.jsonl:2", {...}), ...]
    read_records("alpaca.json")    # a JSON array (LLaMA-Factory's and Stanford Alpaca's files): "alpaca.json: record 1"
    read_records("qa.csv")         # a header row, then one record per row: "qa.csv:2"
    read_records("hub.parquet")    # what the Hugging Face Hub serves datasets as (needs pyarrow): "hub.parquet: row 1"
    read_records("ds/train")       # a folder Dataset.save_to_disk wrote (needs pyarrow): "ds/train: row 1"

The file's suffix picks the reader; any other suffix is read as JSON Lines. A folder is read as `datasets`
writes one (its state.json lists its Arrow files, in order), without importing `datasets`. In CSV files, the
cells of the columns that hold lists (`LIST_COLUMNS`: messages, conversations, history) are JSON text. What a
record must hold is `lorakit.data.jsonl`'s business; this module only reads. Errors name the file and the
line, record or row.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

LIST_COLUMNS = ("messages", "conversations", "history")
"""Columns whose CSV cells are JSON lists."""
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".arrow")
"""The suffixes with a reader of their own (others are read as JSON Lines)."""

Record = tuple[str, Any]
"""(where it came from, e.g. "train.jsonl:3", the parsed record)."""


class DataError(LorakitError, ValueError):
    """A data file is missing, empty or malformed."""


def read_records(path: str | os.PathLike) -> list[Record]:
    """The records of a data file, by its suffix, or of a `datasets` folder. Raises DataError naming the
    file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.is_dir():
        return _datasets_folder(path)
    if not path.is_file():
        raise DataError(f"{path}: not a file (a special file)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    return parse_records(data, str(path))


def parse_records(data: bytes, source: str) -> list[Record]:
    """The records of a data file's bytes, read as `source`'s suffix says."""
    suffix = Path(source).suffix.lower()
    if suffix == ".parquet":
        return _parquet(data, source)
    if suffix == ".arrow":
        return [(f"{source}: row {i}", r) for i, r in enumerate(_arrow_rows(data, source), 1)]
    text = _text(data, source)
    if suffix in (".csv", ".tsv"):
        return _csv(text, source, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json" and text.lstrip().startswith("["):
        return _json_array(text, source)
    return _json_lines(text, source, whole_json=suffix == ".json")


def _text(data: bytes, source: str) -> str:
    data = data.removeprefix(b"\xef\xbb\xbf")  # a BOM (Notepad, Excel's "CSV UTF-8") is fine
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{source}:{line}: not valid UTF-8 text (byte {column} of the line)") from None


def _json_lines(text: str, source: str, *, whole_json: bool) -> list[Record]:
    out: list[Record] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{source}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            if whole_json and not out and _is_one_object(text):
                raise DataError(
                    f"{source}: one JSON object; expected a JSON array of records, or one record per line"
                ) from None
            raise DataError(f"{source}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return out


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _json_array(text: str, source: str) -> list[Record]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return [(f"{source}: record {i}", r) for i, r in enumerate(records, 1)]


_CSV_LIMIT = threading.Lock()  # csv's field size limit is the process's: one reader at a time changes it


def _csv(text: str, source: str, delimiter: str) -> list[Record]:
    with _CSV_LIMIT:  # a document longer than csv's 128 KiB guard is fine
        limit = csv.field_size_limit(max(len(text), 131072))
        try:
            return _csv_rows(text, source, delimiter)
        finally:
            csv.field_size_limit(limit)


def _csv_rows(text: str, source: str, delimiter: str) -> list[Record]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return []
        names = [h.strip() for h in header]
        if len(set(names)) != len(names) or not all(names):
            raise DataError(f"{source}:1: the header row needs distinct, non-empty column names, got {names}")
        out: list[Record] = []
        for row in reader:
            where = f"{source}:{reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                raise DataError(f"{where}: {len(row)} cells in a file of {len(names)} columns {names}")
            out.append((where, {n: _cell(n, c, where) for n, c in zip(names, row, strict=True)}))
    except csv.Error as e:
        raise DataError(f"{source}:{reader.line_num}: not valid CSV ({e})") from None
    return out


def _cell(name: str, cell: str, where: str) -> Any:
    if name not in LIST_COLUMNS or not cell.strip():
        return cell
    try:
        return json.loads(cell)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where}: column {name!r} must hold a JSON list ({e.msg} at column {e.colno})"
        ) from None


def _parquet(data: bytes, source: str) -> list[Record]:
    pa = _pyarrow(source, "Parquet files")
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{source}: not a readable Parquet file ({_first_line(e)})") from None
    return [(f"{source}: row {i}", r) for i, r in enumerate(rows, 1)]


def _pyarrow(source: str, what: str):
    """The pyarrow module; DataError naming `source` and what needs it where it is not installed."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"{source}: reading {what} needs pyarrow (pip install pyarrow)") from None
    return pa


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _arrow_rows(data: bytes, source: str) -> list[dict]:
    """The rows of an Arrow IPC file's bytes: the stream format (what `datasets` writes) or the file format
    (Feather v2, `pyarrow.ipc.new_file`)."""
    pa = _pyarrow(source, "Arrow files")
    try:
        try:
            table = pa.ipc.open_stream(pa.BufferReader(data)).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{source}: not a readable Arrow file ({_first_line(e)})") from None
    return table.to_pylist()


def _datasets_folder(path: Path) -> list[Record]:
    """The rows of a folder `Dataset.save_to_disk` wrote: its Arrow files, in the order its state.json lists
    them (the dataset's own order: save_to_disk writes a shuffled or selected dataset's rows in order)."""
    if (path / "dataset_dict.json").is_file():
        splits = _json_file(path / "dataset_dict.json").get("splits")
        if isinstance(splits, list) and splits and all(isinstance(x, str) for x in splits):
            raise DataError(
                f"{path}: a DatasetDict folder with the splits {splits}; give one split's folder, "
                f"e.g. {path / splits[0]}"
            )
        raise DataError(f"{path / 'dataset_dict.json'}: 'splits' must be a list of split names")
    state_file = path / "state.json"
    if not state_file.is_file():
        raise DataError(
            f"{path}: a folder, neither a data file nor a `datasets` folder (Dataset.save_to_disk's, with a "
            "state.json)"
        )
    state = _json_file(state_file)
    files = state.get("_data_files")
    if not (
        isinstance(files, list)
        and all(isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files)
    ):
        raise DataError(f"{state_file}: '_data_files' must be a list of {{\"filename\": ...}}")
    if state.get("_indices_data_files"):
        raise DataError(
            f"{state_file}: an indices mapping (an old `datasets` save); load and save it again with "
            "datasets >= 2"
        )
    rows: list[dict] = []
    for entry in files:
        name = entry["filename"]
        file = path / name
        if Path(name).name != name or name in ("", ".", "..") or not file.is_file():
            raise DataError(f"{state_file}: lists {name!r}, which is not a file of {path}")
        try:
            data = file.read_bytes()
        except OSError as e:
            raise DataError(f"{file}: cannot be read ({e.strerror})") from None
        rows += _arrow_rows(data, str(file))
    return [(f"{path}: row {i}", r) for i, r in enumerate(rows, 1)]


def _json_file(path: Path) -> dict:
    """A JSON object file of a `datasets` folder; DataError naming it if it is not one."""
    # imported here: lorakit.readers imports torch, which reading a JSON Lines file does not need
    from lorakit.readers import read_json

    value = read_json(path, DataError)
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def label_names(path: str | os.PathLike) -> dict[str, list[str]]:
    """The class names of a dataset's `ClassLabel` columns, as Hugging Face `datasets` records them beside the
    data (a `datasets` folder's dataset_info.json; a Parquet file's schema metadata, as `Dataset.to_parquet` and
    the Hub write it): column -> names by id, for a column of class ids or of lists of them (CoNLL's `ner_tags`).
    {} where the data says none, or says it in a way this does not read: the ids then stay ids."""
    path = Path(path)
    try:
        if path.is_dir():
            info = json.loads((path / "dataset_info.json").read_text())
            features = info.get("features") if isinstance(info, dict) else None
        elif path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.read_schema(path).metadata or {}
            features = json.loads(meta.get(b"huggingface", b"{}")).get("info", {}).get("features")
        else:
            return {}
    except (OSError, ValueError, ImportError, AttributeError):
        return {}
    out: dict[str, list[str]] = {}
    for column, feature in (features or {}).items() if isinstance(features, dict) else ():
        inner = feature.get("feature", feature) if isinstance(feature, dict) else None
        if (
            isinstance(inner, dict)
            and inner.get("_type") == "ClassLabel"
            and isinstance(inner.get("names"), list)
        ):
            out[column] = [str(n) for n in inner["names"]]
    return out
