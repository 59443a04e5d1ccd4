"""Training data from the folders Hugging Face `datasets` writes (`Dataset.save_to_disk`) and from Arrow files,
read with pyarrow alone. The oracle is `datasets` itself: the records lorakit reads are `load_from_disk`'s, in
its order; and the bad folders each give one line naming the culprit."""

from __future__ import annotations

import json
import sys

import pytest

from lorakit.data.files import DataError, read_records
from lorakit.data.jsonl import read_examples
from lorakit.data.preference import read_pairs

from tiny import write_jsonl

datasets = pytest.importorskip("datasets")  # a test extra (TRL's dependency): CI has it
pa = pytest.importorskip("pyarrow")

ROWS = [  # every third first answer weighted 0: Arrow gives the other messages' weight as None (a struct field)
    {
        "messages": [
            {"role": "user", "content": f"{i}+1="},
            {"role": "assistant", "content": str(i + 1), **({"weight": 0} if i % 3 == 0 else {})},
            {"role": "user", "content": "and +2?"},
            {"role": "assistant", "content": str(i + 2)},
        ]
    }
    for i in range(12)
]


def _save(rows, path, **kw):
    datasets.Dataset.from_list(rows).save_to_disk(str(path), **kw)
    return path


def test_a_saved_dataset_reads_as_load_from_disk_does(tmp_path):
    """Shuffled, selected and saved in 3 shards: the same records in the same order as `load_from_disk`, each
    named by its row; as examples, a null is an absent value, as in Parquet."""
    ds = datasets.Dataset.from_list(ROWS).shuffle(seed=1).select(range(9))
    ds.save_to_disk(str(tmp_path / "d"), num_shards=3)
    assert len(list((tmp_path / "d").glob("*.arrow"))) == 3
    records = read_records(tmp_path / "d")
    want = datasets.load_from_disk(str(tmp_path / "d")).to_list()
    assert [r for _, r in records] == want
    assert [w for w, _ in records] == [f"{tmp_path / 'd'}: row {i}" for i in range(1, 10)]
    order = [int(m["messages"][0]["content"].split("+")[0]) for m in want]
    assert read_examples(tmp_path / "d") == [ROWS[i] for i in order]  # the absent weights are absent again


def test_one_split_of_a_dataset_dict_and_pairs(tmp_path):
    """A DatasetDict's split folder is a dataset folder; the DatasetDict folder itself is refused, naming its
    splits and the fix. Preference pairs read from a folder too."""
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": f"{i}+1"} for i in range(6)]
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(pairs[:4]), "test": datasets.Dataset.from_list(pairs[4:])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    write_jsonl(tmp_path / "test.jsonl", pairs[4:])
    assert read_pairs(tmp_path / "dd" / "test") == read_pairs(tmp_path / "test.jsonl")
    with pytest.raises(DataError) as e:
        read_records(tmp_path / "dd")
    assert str(e.value) == (
        f"{tmp_path / 'dd'}: a DatasetDict folder with the splits ['train', 'test']; give one split's folder, "
        f"e.g. {tmp_path / 'dd' / 'train'}"
    )


def test_arrow_files_in_both_formats(tmp_path):
    """A `.arrow` file alone: the IPC stream format (what `datasets` writes) and the file format (Feather v2)."""
    table = pa.Table.from_pylist([{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(5)])
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    for name in ("s.arrow", "f.arrow"):
        assert read_examples(tmp_path / name) == table.to_pylist(), name


@pytest.mark.parametrize(
    "case, words",
    [
        (
            "plain folder",
            "a folder, neither a data file nor a `datasets` folder (Dataset.save_to_disk's, with",
        ),
        ("bad state", "state.json: not valid JSON ("),
        ("state list", "state.json: expected a JSON object, got list"),
        ("no files", "state.json: '_data_files' must be a list of {\"filename\": ...}"),
        ("escape", "state.json: lists '../outside.arrow', which is not a file of"),
        ("missing", "state.json: lists 'data-00000-of-00001.arrow', which is not a file of"),
        ("corrupt", "data-00000-of-00001.arrow: not a readable Arrow file ("),
        ("indices", "state.json: an indices mapping (an old `datasets` save); load and save it again"),
        ("bad dict", "dataset_dict.json: 'splits' must be a list of split names"),
    ],
)
def test_a_bad_folder_is_one_line_naming_it(tmp_path, case, words):
    """Each broken folder gives a DataError of one line naming the folder or its file, and the folder is left
    as it was."""
    folder = tmp_path / "d"
    if case == "plain folder":
        folder.mkdir()
        (folder / "notes.txt").write_text("x")
    else:
        _save(ROWS[:3], folder)
    state = folder / "state.json"
    arrow = folder / "data-00000-of-00001.arrow"
    if case == "bad state":
        state.write_text("{not json")
    elif case == "state list":
        state.write_text("[]")
    elif case == "no files":
        state.write_text(json.dumps({"_data_files": "data.arrow"}))
    elif case == "escape":
        (tmp_path / "outside.arrow").write_bytes(arrow.read_bytes())
        state.write_text(json.dumps({"_data_files": [{"filename": "../outside.arrow"}]}))
    elif case == "missing":
        arrow.unlink()
    elif case == "corrupt":
        arrow.write_bytes(b"not arrow at all")
    elif case == "indices":
        state.write_text(
            json.dumps({**json.loads(state.read_text()), "_indices_data_files": [{"filename": "i"}]})
        )
    elif case == "bad dict":
        (folder / "dataset_dict.json").write_text(json.dumps({"splits": "train"}))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(DataError) as e:
        read_records(folder)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert str(folder) in str(e.value)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_dataset_folder_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    _save(ROWS[:2], tmp_path / "d")
    for mod in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what `import pyarrow` sees where it is not installed
    with pytest.raises(
        DataError, match=r"data-00000-of-00001\.arrow: reading Arrow files needs pyarrow \(pip"
    ):
        read_records(tmp_path / "d")


def test_training_from_dataset_folders_equals_training_from_jsonl(tmp_path):
    """`lorakit train --data.train_file FOLDER --data.eval_file FOLDER`: the run of the same examples from JSON
    Lines, bitwise (tiny Llama: the same ops on the same batches)."""
    from runs import addition_run

    (tmp_path / "a").mkdir()
    reference, _ = addition_run(tmp_path / "a", "--train.steps", "3")
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(40)]
    root = tmp_path / "b"
    _save(rows[:32], root / "train", num_shards=2)
    _save(rows[32:], root / "eval")
    summary, _ = addition_run(
        root,
        *("--train.steps", "3", "--data.train_file", str(root / "train")),
        *("--data.eval_file", str(root / "eval")),
    )

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    assert len(losses(root / "run")) == 3 and losses(root / "run") == losses(tmp_path / "a" / "run")
    assert summary["before"] == reference["before"] and summary["after"] == reference["after"]
