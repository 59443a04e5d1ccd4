"""Temporaries of atomic writes: a save killed mid-write leaves its temporary folder behind; the next save to the
same destination removes it, but never the temporary of a process that is still alive and writing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_io import KILLER, TESTS

import lorakit
from lorakit import LoraConfig
from lorakit.atomic import STALE_AFTER_S, atomic_dir, atomic_file, temp_prefix

from tiny import randomize, tiny_llama


def _save(path: Path) -> None:
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize(model)
    lorakit.save_adapter(model, path)


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    path = tmp_path / "adapter"
    _save(path)
    proc = subprocess.run(
        [sys.executable, "-c", KILLER.format(tests=str(TESTS), path=str(path))], capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    left = _temporaries(tmp_path)
    assert len(left) == 1 and left[0].startswith(".adapter.tmp-"), left  # what the kill left behind
    assert not _alive_pid_in(left[0])  # named after the killed writer, which is gone
    _save(path)
    assert _temporaries(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def _alive_pid_in(name: str) -> bool:
    pid = int(name.split(".tmp-")[1].split("@")[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def live_pid():
    """The pid of a process that is alive for the test (a sleeping child)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


def _fake_temporary(parent: Path, name: str, pid: int, age_s: float = 0.0) -> Path:
    tmp = parent / f"{temp_prefix(name, pid)}fake1234"
    tmp.mkdir(parents=True)
    (tmp / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    if age_s:
        then = time.time() - age_s
        os.utime(tmp, (then, then))
    return tmp


def test_a_live_writers_temporary_is_kept_and_a_dead_ones_removed(tmp_path, live_pid):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    live = _fake_temporary(tmp_path, "out", live_pid)
    gone = _fake_temporary(tmp_path, "out", dead_pid)
    other = _fake_temporary(tmp_path, "another", dead_pid)  # another destination's: not ours to judge
    atomic_dir(tmp_path / "out", lambda tmp: (tmp / "f").write_text("x"))
    assert live.is_dir() and not gone.exists() and other.is_dir()
    assert (tmp_path / "out" / "f").read_text() == "x"


def test_temporaries_without_a_pid_are_removed_only_when_old(tmp_path):
    fresh = tmp_path / ".out.tmp-abc123"  # the name an older lorakit gave its temporaries
    old = tmp_path / ".out.tmp-def456"
    for p in (fresh, old):
        p.mkdir()
    then = time.time() - STALE_AFTER_S - 60
    os.utime(old, (then, then))
    atomic_dir(tmp_path / "out", lambda tmp: (tmp / "f").write_text("x"))
    assert fresh.is_dir() and not old.exists()


def test_atomic_file_removes_stale_temporary_files(tmp_path, live_pid):
    gone = tmp_path / f"{temp_prefix('config.yaml', 2**22 + 12345)}zz"  # a pid above pid_max: never alive
    gone.write_bytes(b"half")
    live = tmp_path / f"{temp_prefix('config.yaml', live_pid)}yy"
    live.write_bytes(b"half")
    atomic_file(tmp_path / "config.yaml", b"done")
    assert not gone.exists() and live.exists() and (tmp_path / "config.yaml").read_bytes() == b"done"


def test_a_killed_checkpoint_save_is_cleaned_by_the_next_checkpoint(tmp_path):
    """Checkpoints change name every save (step-000002, step-000004): the next one cleans every stale step-*
    temporary in the folder."""
    from lorakit.train.config import RunConfig, TrainSection
    from lorakit.train.loop import train_loop

    from tiny import token_rows

    ckpts = tmp_path / "checkpoints"
    stale = _fake_temporary(ckpts, "step-000002", 2**22 + 1)
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"]))
    cfg = RunConfig(train=TrainSection(out_dir=str(tmp_path), steps=4, batch_size=2, save_every=2))
    train_loop(model, token_rows(8), cfg, pad_id=0, out_dir=tmp_path)
    assert not stale.exists() and sorted(p.name for p in ckpts.iterdir()) == ["step-000002"]


def _write_model_like(tmp: Path) -> None:
    (tmp / "config.json").write_text("{}")
    (tmp / "model.safetensors").write_bytes(b"new")


def test_replacing_a_folder_of_other_things_is_refused(tmp_path):
    """`lorakit merge --out ~/models` must not wipe a folder of unrelated files: refused, and nothing in it
    changes; an empty folder, or an earlier output of the same kind, is replaced (its stale files go)."""
    mine = tmp_path / "models"
    (mine / "llama").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(
        lorakit.LorakitError, match=r"models: exists and holds other files \(llama, notes.txt\)"
    ):
        atomic_dir(mine, _write_model_like)
    assert sorted(p.name for p in mine.iterdir()) == ["llama", "notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"
    assert _temporaries(tmp_path) == []  # the refused write's temporary is gone too
    empty = tmp_path / "empty"
    empty.mkdir()
    atomic_dir(empty, _write_model_like)
    earlier = tmp_path / "merged"
    earlier.mkdir()
    (earlier / "config.json").write_text("{old}")
    (earlier / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    atomic_dir(earlier, _write_model_like)
    assert sorted(p.name for p in earlier.iterdir()) == ["config.json", "model.safetensors"]


def test_tree_size_counts_files_once_and_follows_no_link(tmp_path):
    from lorakit.atomic import tree_size

    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "b").write_bytes(b"y" * 7)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"z" * 1000)
    (tmp_path / "to-file").symlink_to(outside / "big")
    (tmp_path / "to-folder").symlink_to(outside)
    assert tree_size(tmp_path) == 17  # the links count nothing: their targets are not ours
    assert tree_size(tmp_path / "a") == 10 and tree_size(tmp_path / "sub") == 7
    assert 0 < tree_size(tmp_path / "to-file") < 1000  # a link alone: its own size
    assert tree_size(tmp_path / "gone") == 0
