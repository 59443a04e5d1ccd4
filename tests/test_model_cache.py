"""`lorakit cache` (lorakit.model_cache): every entry of the cache with the reason it is stale, and a clean that
removes only those. The GGUF "conversion" is a tiny Llama (the real default model's conversion is tested in
test_models.py), but the files, folders, hashes and the CLI are real."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from lorakit import models
from lorakit.cli import main
from lorakit.model_cache import TEMP_GRACE_S, clean, entries
from lorakit.models import DIGESTS, SOURCE_FILE, TMP_PREFIX, gguf_cache_dir, resolve_model_dir
from lorakit.quant.native import kernel_path

from tiny import tiny_llama, word_tokenizer

DAY = 86400.0


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The GGUF files converted so far (each "conversion" produces a tiny Llama)."""
    converted: list[Path] = []

    def convert(gguf: Path):
        converted.append(gguf)
        return tiny_llama(), word_tokenizer()

    monkeypatch.setattr(models, "_load_gguf", convert)
    return converted


@pytest.fixture
def cache(tmp_path: Path, conversions: list[Path]) -> Path:
    return tmp_path / "cache"


def _gguf(path: Path, content: bytes = b"GGUF one") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _by_name(root: Path) -> dict[str, object]:
    return {str(e.path.relative_to(root)): e for e in entries(root)}


def _age(path: Path, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(path, (t, t))


def test_a_reinstalled_file_reuses_its_conversion(cache: Path, tmp_path: Path, conversions: list) -> None:
    """A fresh venv puts the same GGUF at a new path with a new mtime: no second conversion, no second folder."""
    first = resolve_model_dir(_gguf(tmp_path / "venv1" / "m.gguf"), cache)
    again = resolve_model_dir(_gguf(tmp_path / "venv2" / "m.gguf"), cache)
    assert again == first and len(conversions) == 1
    other = resolve_model_dir(_gguf(tmp_path / "venv3" / "m.gguf", b"GGUF two"), cache)
    assert other != first and len(conversions) == 2
    source = json.loads((first / SOURCE_FILE).read_text())
    assert source["gguf"] == str(tmp_path / "venv1" / "m.gguf") and len(source["sha256"]) == 64
    memos = sorted((cache / "models" / DIGESTS).glob("*.json"))
    assert len(memos) == 3  # one remembered hash per file version


def test_entries_say_what_is_in_use_and_why_the_rest_is_stale(cache: Path, tmp_path: Path) -> None:
    kept = _gguf(tmp_path / "a" / "kept.gguf")
    gone = _gguf(tmp_path / "a" / "gone.gguf", b"GGUF gone")
    kept_dir, gone_dir = resolve_model_dir(kept, cache), resolve_model_dir(gone, cache)
    gone.unlink()
    models_dir = cache / "models"
    legacy = models_dir / "SmolLM2-135M-Instruct.Q4_1-0123456789ab"  # lorakit <= session 16: no source record
    tiny_llama().save_pretrained(legacy)
    incomplete = models_dir / "half-000000000000"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    young_tmp = models_dir / f"{TMP_PREFIX}x-1"
    old_tmp = models_dir / f"{TMP_PREFIX}y-2"
    young_tmp.mkdir()
    old_tmp.mkdir()
    _age(old_tmp, 2 * TEMP_GRACE_S / DAY)
    (cache / "kernels").mkdir()
    (cache / "kernels" / "nf4-0000000000000000.so").write_bytes(b"\0" * 10)
    current = kernel_path(cache)
    if current is not None:
        current.write_bytes(b"\0" * 10)
    (cache / "cpu_bf16.json").write_text("{}")
    generated = models_dir / "random-llama2-7b"  # benchmarks/random_checkpoint.py: minutes to write again
    tiny_llama().save_pretrained(generated)
    (generated / SOURCE_FILE).write_text(json.dumps({"generated": "random-llama2-7b"}))
    mine = models_dir / "my-model"  # a folder someone put there: not ours to judge
    mine.mkdir()

    got = _by_name(cache)
    assert got[f"models/{kept_dir.name}"].stale is None
    assert got[f"models/{kept_dir.name}"].sources == (str(kept),)
    assert got[f"models/{gone_dir.name}"].stale == "its GGUF file is gone or changed"
    assert "older lorakit" in got[f"models/{legacy.name}"].stale
    assert got[f"models/{incomplete.name}"].stale == "incomplete conversion"
    assert got[f"models/{young_tmp.name}"].stale is None  # may be a conversion running now
    assert got[f"models/{old_tmp.name}"].stale == "left by a killed conversion"
    assert "another CPU" in got["kernels/nf4-0000000000000000.so"].stale
    if current is not None:
        assert got[f"kernels/{current.name}"].stale is None
    assert got["cpu_bf16.json"].stale is None
    assert (got["models/random-llama2-7b"].kind, got["models/random-llama2-7b"].stale) == ("checkpoint", None)
    assert (got["models/my-model"].kind, got["models/my-model"].stale) == ("folder", None)
    stale_memos = [e for e in got.values() if e.kind == "digest"]
    assert len(stale_memos) == 1 and stale_memos[0].stale == "its GGUF file is gone or changed"
    # a modified file: its old version's folder is stale, as is the old version's remembered hash
    kept.write_bytes(b"GGUF kept, edited")
    assert _by_name(cache)[f"models/{kept_dir.name}"].stale == "its GGUF file is gone or changed"


def test_clean_removes_only_the_stale_and_a_dry_run_nothing(cache: Path, tmp_path: Path) -> None:
    kept = _gguf(tmp_path / "kept.gguf")
    gone = _gguf(tmp_path / "gone.gguf", b"GGUF gone")
    kept_dir, gone_dir = resolve_model_dir(kept, cache), resolve_model_dir(gone, cache)
    gone.unlink()
    young_tmp = cache / "models" / f"{TMP_PREFIX}z-1"
    young_tmp.mkdir()
    before = sorted(p.name for p in (cache / "models").iterdir())
    would = clean(cache, dry_run=True)
    assert sorted(p.name for p in (cache / "models").iterdir()) == before
    assert {e.path for e in would} >= {gone_dir}
    done = clean(cache)
    assert [e.path for e in done] == [e.path for e in would]
    assert kept_dir.is_dir() and young_tmp.is_dir() and not gone_dir.exists()
    assert [e.stale for e in entries(cache) if e.stale] == []
    # unused for N days: the memo's time is the last use; loading the model marks it used again
    for memo in (cache / "models" / DIGESTS).glob("*.json"):
        _age(memo, 40)
    _age(kept_dir, 40)
    assert clean(cache, unused_days=60, dry_run=True) == []
    assert [e.path for e in clean(cache, unused_days=30, dry_run=True)] == [kept_dir]
    resolve_model_dir(kept, cache)  # a use
    assert clean(cache, unused_days=30) == []
    # everything, except a temporary that a running conversion may be writing; then it is rebuilt on demand
    clean(cache, everything=True)
    assert sorted(p.name for p in (cache / "models").iterdir()) == [DIGESTS, young_tmp.name]
    assert resolve_model_dir(kept, cache) == kept_dir and (kept_dir / "config.json").is_file()


def test_the_cli_lists_and_cleans(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gone = _gguf(tmp_path / "gone.gguf", b"GGUF gone")
    gone_dir = resolve_model_dir(gone, cache)
    kept_dir = resolve_model_dir(_gguf(tmp_path / "kept.gguf"), cache)
    gone.unlink()
    assert main(["cache", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert f"models/{gone_dir.name}" in out and "stale: its GGUF file is gone" in out
    assert f"in use by {tmp_path / 'kept.gguf'}" in out and "`lorakit cache clean` removes them" in out
    assert main(["cache", "--cache-dir", str(cache), "--json"]) == 0
    rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert rows[gone_dir.name]["stale"] and rows[kept_dir.name]["stale"] is None
    assert main(["cache", "clean", "--dry-run", "--cache-dir", str(cache)]) == 0
    assert "would remove 2 entries" in capsys.readouterr().out and gone_dir.is_dir()
    assert main(["cache", "clean", "--cache-dir", str(cache)]) == 0
    assert "removed 2 entries" in capsys.readouterr().out and not gone_dir.exists() and kept_dir.is_dir()
    # options of clean given to list, and a negative age: one line each, nothing removed
    assert main(["cache", "--all", "--cache-dir", str(cache)]) == 2
    assert capsys.readouterr().err.strip() == (
        "lorakit cache: error: --unused-days, --all and --dry-run go with `lorakit cache clean`"
    )
    with pytest.raises(SystemExit):
        main(["cache", "clean", "--unused-days", "-1", "--cache-dir", str(cache)])
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and kept_dir.is_dir()


def test_an_empty_or_missing_cache_lists_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert entries(tmp_path / "none") == []
    assert main(["cache", "clean", "--cache-dir", str(tmp_path / "none")]) == 0
    assert "removed 0 entries" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()


def test_gguf_cache_dir_hashes_a_file_once_per_version(cache: Path, tmp_path: Path) -> None:
    """The memo is what the key is read from: a forged memo for this (path, size, mtime) is believed, which
    shows the file is not read again; a new mtime (a new version) is hashed afresh."""
    gguf = _gguf(tmp_path / "m.gguf")
    real = gguf_cache_dir(gguf, cache)
    memo = next((cache / "models" / DIGESTS).glob("*.json"))
    record = json.loads(memo.read_text())
    memo.write_text(json.dumps({**record, "sha256": "0" * 64}))
    assert gguf_cache_dir(gguf, cache) != real
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert gguf_cache_dir(gguf, cache) == real
