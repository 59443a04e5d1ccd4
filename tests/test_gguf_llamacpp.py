"""llama.cpp runs what lorakit exports, and computes what lorakit computes.

Both sides in f32 (the base exported as an f32 GGUF from the same weights, llama.cpp's KV cache in f32): the
tolerance is on logits, and each test also checks that the adapter moves llama.cpp's logits by far more than
that tolerance, or the comparison would prove nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import lorakit
from lorakit import LoraConfig
from lorakit.ondevice.adapter import save_adapter_gguf
from lorakit.ondevice.model import save_model_gguf
from lorakit.ondevice.names import ExportError

from llamacpp import greedy, llama, logits
from tiny import SEVEN, every_kind_of_lora, randomize, tiny_llama, tiny_qwen2

pytestmark = pytest.mark.llama_cpp

TOKENS = [1, 5, 9, 33, 77, 100, 3, 64, 12, 90]


def _ours(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_llama_cpp_runs_our_adapter_with_our_logits(tmp_path, make):
    model = make(hidden=64)
    save_model_gguf(model, tmp_path / "base.gguf")  # no tokenizer: llama.cpp runs on token ids
    lorakit.inject(model, every_kind_of_lora())
    randomize(model, std=0.3)
    save_adapter_gguf(model, tmp_path / "a.gguf")
    want = _ours(model, TOKENS)
    with lorakit.disabled(model):
        base = _ours(model, TOKENS)
    got_base = logits(tmp_path / "base.gguf", TOKENS)
    got = logits(tmp_path / "base.gguf", TOKENS, lora=tmp_path / "a.gguf")
    # logits of order 1 here, all in f32: the two differ in summation order only (measured: ~3e-4)
    tol = 2e-3
    assert np.abs(got_base - base).max() < tol
    assert np.abs(got - want).max() < tol
    assert np.abs(got - got_base).max() > 100 * tol  # the adapter matters in llama.cpp


def test_llama_cpp_runs_our_merged_model_with_our_logits(tmp_path):
    model = tiny_llama(hidden=64)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=SEVEN))
    randomize(model, std=0.3)
    want = _ours(model, TOKENS)
    merged = lorakit.unload(model, merge=True)
    save_model_gguf(merged, tmp_path / "m.gguf")
    got = logits(tmp_path / "m.gguf", TOKENS)
    assert np.abs(got - want).max() < 2e-3  # as above


BDLORA = {
    "target_modules_bd_a": ["o_proj", "down_proj"],
    "target_modules_bd_b": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
    "nblocks": 2,
}


@pytest.mark.parametrize("variant", [dict(use_bdlora=BDLORA), dict(use_kasa=True)], ids=["bdlora", "kasa"])
def test_llama_cpp_runs_a_variant_as_the_plain_lora_it_stands_for(tmp_path, variant):
    """BD-LoRA's block-diagonal factor goes to llama.cpp as the dense factor it stands for; KaSA as the rank-2r
    pair of its update and W0's dropped part (llama.cpp's base is the original W0)."""
    model = tiny_llama(hidden=64)
    save_model_gguf(model, tmp_path / "base.gguf")
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=SEVEN, **variant))
    randomize(model, std=0.3)
    save_adapter_gguf(model, tmp_path / "a.gguf")
    want = _ours(model, TOKENS)
    got_base = logits(tmp_path / "base.gguf", TOKENS)
    got = logits(tmp_path / "base.gguf", TOKENS, lora=tmp_path / "a.gguf")
    assert np.abs(got - want).max() < 2e-3  # as above
    assert np.abs(got - got_base).max() > 100 * 2e-3


def test_a_tied_adapter_merges_into_a_tied_gguf_that_llama_cpp_runs(tmp_path):
    """ensure_weight_tying: the merged model keeps one tensor for the embedding and the head, so its GGUF has no
    `output.weight` (llama.cpp reuses token_embd, as for the base), and llama.cpp computes our logits."""
    import gguf

    model = tiny_llama(hidden=64, tied=True)
    lorakit.inject(
        model, LoraConfig(r=4, alpha=8, targets=["q_proj", "embed_tokens"], ensure_weight_tying=True)
    )
    randomize(model, std=0.3)
    want = _ours(model, TOKENS)
    with lorakit.disabled(model):
        base = _ours(model, TOKENS)
    with pytest.raises(ExportError, match="export --merged"):  # llama.cpp's one tensor takes no LoRA pair
        save_adapter_gguf(model, tmp_path / "a.gguf")
    merged = lorakit.unload(model, merge=True)
    save_model_gguf(merged, tmp_path / "m.gguf")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    got = logits(tmp_path / "m.gguf", TOKENS)
    assert np.abs(got - want).max() < 2e-3  # as above
    assert np.abs(want - base).max() > 100 * 2e-3


# --------------------------------------------------------------------------------------------------------------
# The real default model
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(default_model_dir, tmp_path_factory):
    """SmolLM2 as an f32 GGUF written from the weights lorakit loads, its entries copied from the bundled GGUF."""
    from lorakit.models import default_gguf_path

    out = tmp_path_factory.mktemp("smol")
    model, tok = lorakit.load_model(default_model_dir)
    save_model_gguf(model, out / "base.gguf", base_gguf=default_gguf_path())
    return out, tok


def _prompt_ids(tok, text):
    chat = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tok(chat, add_special_tokens=False)["input_ids"]


@pytest.mark.real_model
def test_smollm2_with_an_adapter_on_seven_projections(smol, default_model_dir):
    out, tok = smol
    model, _ = lorakit.load_model(default_model_dir)
    lorakit.inject(model, LoraConfig(r=8, alpha=16, targets=SEVEN))
    randomize(model, std=0.02)
    save_adapter_gguf(model, out / "a.gguf")
    ids = _prompt_ids(tok, "What is the capital of France?")
    want = _ours(model, ids)
    got_base = logits(out / "base.gguf", ids)
    got = logits(out / "base.gguf", ids, lora=out / "a.gguf")
    # SmolLM2's logits reach ~40; all in f32, measured difference ~1e-4
    assert np.abs(got - want).max() < 1e-3
    assert np.abs(got - got_base).max() > 1.0


@pytest.mark.real_model
def test_smollm2_merged_generates_what_lorakit_generates(smol, default_model_dir, tmp_path):
    from lorakit.models import default_gguf_path

    _, tok = smol
    model, _ = lorakit.load_model(default_model_dir)
    lorakit.inject(model, LoraConfig(r=8, alpha=16, targets=SEVEN))
    randomize(model, std=0.02)
    lorakit.save_adapter(model, tmp_path / "adapter")
    done = lorakit.export_gguf(tmp_path / "m.gguf", tmp_path / "adapter", merged=True)
    assert done.modelfile is not None and "FROM ./m.gguf" in done.modelfile.read_text()
    ids = _prompt_ids(tok, "Write a short poem about the sea.")
    want = _ours(model, ids)
    llm = llama(tmp_path / "m.gguf")  # one load of the 0.5 GB f32 file for every check below
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[: len(ids)], dtype=np.float32) - want).max() < 1e-3  # as above
    merged = lorakit.unload(model, merge=True)
    with torch.no_grad():
        ours = merged.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, top_p=None, top_k=None
        )
    ours = ours[0, len(ids) :].tolist()
    theirs = greedy(llm, ids, 32, tok.eos_token_id)
    assert theirs == [t for t in ours if t != tok.eos_token_id][: len(theirs)] and len(theirs) >= min(
        len(ours), 8
    )
    # the standalone file carries the tokenizer and chat template: llama.cpp tokenizes as transformers does
    text = "The 5th of March, 2021: rewrite it as 2021-03-05!"
    assert (
        llm.tokenize(text.encode(), add_bos=False, special=False)
        == tok(text, add_special_tokens=False)["input_ids"]
    )
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert default_gguf_path().exists()


@pytest.mark.real_model
def test_a_model_folder_base_exports_with_its_own_tokenizer(smol, default_model_dir, tmp_path):
    # --model a Hugging Face folder: the entries are built from config.json and tokenizer.json, not copied
    _, tok = smol
    done = lorakit.export_gguf(tmp_path / "b.gguf", model=default_model_dir, merged=True, outtype="f16")
    llm = llama(tmp_path / "b.gguf")
    text = "Rewrite this date in ISO format: May 4, 1937"
    assert (
        llm.tokenize(text.encode(), add_bos=False, special=False)
        == tok(text, add_special_tokens=False)["input_ids"]
    )
    model, _ = lorakit.load_model(default_model_dir)
    ids = _prompt_ids(tok, text)
    # f16 weights: logits within 0.1 of f32 transformers' (measured ~0.03 of ~40)
    assert np.abs(logits(done.path, ids) - _ours(model, ids)).max() < 0.15
    assert f"FROM ./{done.path.name}" in done.modelfile.read_text()


# --------------------------------------------------------------------------------------------------------------
# The real workflow, once: lorakit train -> lorakit export gguf -> llama.cpp on the bundled Q4_1 base
# --------------------------------------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True)


@pytest.mark.real_model
@pytest.mark.slow
def test_a_trained_adapter_answers_as_well_in_llama_cpp(trained_run, tmp_path):
    from conftest import TRAINED_EVAL

    from lorakit.data.tasks import make_task
    from lorakit.models import default_gguf_path

    n_eval = TRAINED_EVAL
    run, _ = trained_run  # lorakit train on the default model (conftest), evaluated on n_eval examples
    proc = _cli("export", "gguf", "--adapter", str(run / "adapter"), "--out", str(tmp_path / "dates.gguf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads((run / "summary.json").read_text())["after"]["accuracy"]
    seed = yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"]
    _, examples = make_task("dates", n_train=2000, n_eval=n_eval, seed=seed)
    from transformers import AutoTokenizer

    from lorakit.models import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(None))
    llm = llama(default_gguf_path(), lora=tmp_path / "dates.gguf")  # the bundled Q4_1 file, as shipped
    hits = 0
    for ex in examples:
        out = greedy(llm, _prompt_ids(tok, ex["prompt"]), 16, tok.eos_token_id)
        hits += tok.decode(out, skip_special_tokens=True).strip() == ex["completion"].strip()
    theirs = hits / n_eval
    print(f"exact match: lorakit {ours:.1%}, llama.cpp on the Q4_1 base {theirs:.1%}")
    assert ours > 0.3, "the run must have learned the task, or the comparison proves nothing"
    # lorakit evaluates on the fp32 dequantisation of the same Q4_1 weights; llama.cpp multiplies in Q4_1 x Q8
    assert abs(theirs - ours) <= 0.1


@pytest.mark.parametrize("outtype, tol", [("f16", 5e-3), ("bf16", 5e-3), ("q8_0", 1e-2)])
def test_llama_cpp_reads_every_tensor_type_as_we_do(tmp_path, outtype, tol):
    # lorakit loads the file back (its values rounded to the type). The same values written as f32 must give
    # llama.cpp's logits exactly as ours (2e-3, as above: the format adds nothing). The file in its own type
    # adds llama.cpp's rounding: it multiplies f16, bf16 and q8_0 weights with activations rounded to that type
    # too (measured: 2.4e-3 for q8_0, 1.3e-3 for bf16, logits of order 1, adapter effect 0.45).
    model = tiny_llama(hidden=64)
    save_model_gguf(model, tmp_path / "base.gguf")
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=SEVEN))
    randomize(model, std=0.05)
    save_adapter_gguf(model, tmp_path / "a.gguf", outtype=outtype)
    fresh = tiny_llama(hidden=64)
    lorakit.load_adapter(fresh, tmp_path / "a.gguf")
    save_adapter_gguf(fresh, tmp_path / "a32.gguf")
    want = _ours(fresh, TOKENS)
    assert np.abs(logits(tmp_path / "base.gguf", TOKENS, lora=tmp_path / "a32.gguf") - want).max() < 2e-3
    got = logits(tmp_path / "base.gguf", TOKENS, lora=tmp_path / "a.gguf")
    assert np.abs(got - want).max() < tol
    assert np.abs(got - logits(tmp_path / "base.gguf", TOKENS)).max() > 20 * tol


@pytest.mark.parametrize("outtype, tol", [("f16", 3e-3), ("bf16", 2e-2), ("q8_0", 4e-2)])
def test_llama_cpp_runs_merged_models_in_every_tensor_type(tmp_path, outtype, tol):
    # the weights rounded to the type, and llama.cpp's activations with them (measured on this tiny model:
    # f16 3e-4, bf16 2.5e-3, q8_0 8e-3 on logits of order 1); the adapter moves the logits by 0.45
    model = tiny_llama(hidden=64)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=SEVEN))
    randomize(model, std=0.05)
    want = _ours(model, TOKENS)
    with lorakit.disabled(model):
        base = _ours(model, TOKENS)
    save_model_gguf(lorakit.unload(model, merge=True), tmp_path / "m.gguf", outtype)
    got = logits(tmp_path / "m.gguf", TOKENS)
    assert np.abs(got - want).max() < tol < np.abs(want - base).max() / 5
