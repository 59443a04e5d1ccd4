"""GGUF export and import without llama.cpp: names, layouts, round trips, refusals, the CLI, Modelfiles.

llama.cpp itself checks the files in test_gguf_llamacpp.py; here our reader must give back what our writer got,
independent facts (the bundled GGUF's own tokenizer) must match what we build, and bad input must fail in one
line and leave nothing behind.
"""

from __future__ import annotations

import gguf
import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterError, AdapterFileError, ConfigError, OutputError
from lorakit.ondevice.adapter import describe_gguf, read_adapter_gguf, save_adapter_gguf
from lorakit.ondevice.model import save_model_gguf, tokenizer_entries
from lorakit.ondevice.modelfile import modelfile_text
from lorakit.ondevice.names import ExportError, NameMap, permute_rows, unpermute_rows

from tiny import SEVEN, cli_here, every_kind_of_lora, ids, randomize, tiny_gpt2, tiny_llama, tiny_qwen2

FULL = every_kind_of_lora()


def _adapted(make=tiny_llama, config=FULL, **kw):
    model = make(**kw)
    lorakit.inject(model, config)
    randomize(model, std=0.3)
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize(
    "hf, want",
    [
        pytest.param("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight", id="q"),
        pytest.param("model.layers.0.self_attn.o_proj.weight", "blk.0.attn_output.weight", id="o"),
        pytest.param("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight", id="down"),
        pytest.param("model.embed_tokens.weight", "token_embd.weight", id="embedding"),
        pytest.param("lm_head.weight", "output.weight", id="head"),
        pytest.param("model.norm.weight", "output_norm.weight", id="norm"),
        pytest.param("score.weight", None, id="not-a-llama-tensor"),
    ],
)
def test_hugging_face_names_map_to_llama_cpp_names(hf, want):
    assert NameMap(tiny_llama().config).tensor(hf) == want


def test_the_rope_row_permutation_is_llama_cpps_and_inverts():
    heads, head_dim = 3, 4
    w = torch.arange(heads * head_dim, dtype=torch.float32)[:, None].repeat(1, 2)
    p = permute_rows(w, heads)
    # llama.cpp's converter: within each head, the first half and the second half of the rows interleave
    assert p[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11]
    assert torch.equal(unpermute_rows(p, heads), w)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_an_adapter_round_trips_through_gguf(tmp_path, make):
    model = _adapted(make, hidden=64)
    x = ids(vocab=128)
    want = _logits(model, x)
    save_adapter_gguf(model, tmp_path / "a.gguf")
    fresh = make(hidden=64)
    base = _logits(fresh, x)
    assert lorakit.load_adapter(fresh, tmp_path / "a.gguf") == "default"
    got = _logits(fresh, x)
    # f32 throughout; the scale folded into B and taken out again rounds in the last bits only
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (want - base).abs().max() > 0.1, "the adapter must change the logits, or the test proves nothing"


@pytest.mark.parametrize("outtype, tol", [("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 1e-2)])
def test_smaller_tensor_types_round_trip_within_their_precision(tmp_path, outtype, tol):
    model = _adapted(hidden=64)
    save_adapter_gguf(model, tmp_path / "a.gguf", outtype=outtype)
    types = set(read_adapter_gguf(tmp_path / "a.gguf").types.values())
    # q8_0 blocks hold 32 values: B of rank 4 (rows of 4) falls back to f16, as llama.cpp's converter does
    assert types == ({"Q8_0", "F16"} if outtype == "q8_0" else {outtype.upper()})
    fresh = tiny_llama(hidden=64)
    lorakit.load_adapter(fresh, tmp_path / "a.gguf")
    for name, layer in lorakit.lora_layers(model):
        want = lorakit.delta_weight(layer, layer.adapters["default"])
        other = fresh.get_submodule(name)
        got = lorakit.delta_weight(other, other.adapters["default"])
        # relative error of ΔW: f16 keeps 11 significant bits, bf16 8, q8_0 8-bit codes per block of 32
        assert (got - want).norm() / want.norm() < tol, name


def test_one_alpha_is_written_and_each_layer_keeps_its_exact_scale(tmp_path):
    model = _adapted(hidden=64)
    save_adapter_gguf(model, tmp_path / "a.gguf")
    info = describe_gguf(tmp_path / "a.gguf")
    assert info["alpha"] == 8.0
    rows = info["modules"]
    assert rows["blk.0.attn_v.weight"]["r"] == 2 and rows["blk.1.ffn_up.weight"]["r"] == 6
    ga = read_adapter_gguf(tmp_path / "a.gguf")
    for module, gname in [("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight")]:
        layer = model.get_submodule(module)
        ad = layer.adapters["default"]
        a, b = ga.pairs[gname]
        # llama.cpp computes alpha / r · B_file · A_file; it must equal s · B · A with rsLoRA's s = 3 / √4
        assert torch.allclose(8.0 / a.shape[0] * b @ a, 3.0 / 2.0 * ad.lora_B @ ad.lora_A, atol=1e-6)
    assert tuple(ga.pairs["token_embd.weight"][0].shape) == (128, 4)  # the embedding's A, transposed


def test_a_dylora_adapter_exports_at_the_rank_it_runs_at(tmp_path):
    model = tiny_llama(hidden=64)
    lorakit.inject(model, LoraConfig(r=6, alpha=6, targets=SEVEN), variant="dylora")
    randomize(model, std=0.3)
    lorakit.set_rank(model, 3)
    x = ids(vocab=128)
    save_adapter_gguf(model, tmp_path / "a.gguf")
    fresh = tiny_llama(hidden=64)
    lorakit.load_adapter(fresh, tmp_path / "a.gguf")
    assert describe_gguf(tmp_path / "a.gguf")["modules"]["blk.0.attn_q.weight"]["r"] == 3
    assert torch.allclose(_logits(fresh, x), _logits(model, x), atol=1e-5)


def _untouched(path):
    return not path.exists() and not list(path.parent.glob(f".{path.name}.tmp-*"))


@pytest.mark.parametrize(
    "make, config, match",
    [
        pytest.param(
            tiny_llama,
            LoraConfig(r=4, targets=["q_proj"], use_dora=True),
            r"q_proj: a DoRA adapter has no plain",
            id="dora",
        ),
        pytest.param(
            tiny_llama,
            LoraConfig(r=4, targets=["q_proj"], lora_bias=True),
            r"q_proj: a lora_bias adapter has no plain .*\(its bias on B .*--merged",
            id="lora-bias",
        ),
        pytest.param(
            tiny_llama,
            LoraConfig(r=4, targets=["q_proj"], bias="all"),
            r"trains biases \(bias='all'\)",
            id="bias",
        ),
        pytest.param(
            tiny_gpt2,
            LoraConfig(r=4, targets=["c_attn"]),
            r"model type 'gpt2' has no GGUF export",
            id="unknown-arch",
        ),
    ],
)
def test_what_llama_cpp_cannot_run_is_refused_in_one_line(tmp_path, make, config, match):
    model = make()
    lorakit.inject(model, config)
    out = tmp_path / "a.gguf"
    with pytest.raises(ExportError, match=match) as e:
        save_adapter_gguf(model, out)
    assert "\n" not in str(e.value) and _untouched(out)


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_an_adapter_on_a_tied_embedding_is_refused(tmp_path, target):
    # llama.cpp shares one tensor between the tied embedding and the head, and applies a token_embd LoRA to
    # both: it aborts (GGML_ASSERT in ggml_mul_mat) on the head. So lorakit refuses and names the way out.
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    lorakit.inject(model, LoraConfig(r=4, targets=[target]))
    with pytest.raises(ExportError, match=rf"{target}: an adapter on the .* ties the embedding .* --merged"):
        save_adapter_gguf(model, tmp_path / "a.gguf")


def test_bad_output_paths_are_refused_before_any_work(tmp_path):
    model = _adapted()
    with pytest.raises(OutputError, match="does not exist"):
        save_adapter_gguf(model, tmp_path / "no" / "a.gguf")
    with pytest.raises(OutputError, match="is a folder"):
        save_adapter_gguf(model, tmp_path)
    with pytest.raises(OutputError, match="'q4' is not one lorakit writes"):
        save_adapter_gguf(model, tmp_path / "a.gguf", outtype="q4")
    with pytest.raises(OutputError, match="does not exist"):
        lorakit.export_gguf(tmp_path / "no" / "a.gguf", tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_earlier_file(tmp_path, monkeypatch):
    model = _adapted(hidden=64)
    out = tmp_path / "a.gguf"
    save_adapter_gguf(model, out)
    before = out.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", boom)  # after the header, mid-file
    with pytest.raises(OSError, match="no space left on device"):
        save_adapter_gguf(_adapted(seed=1, hidden=64), out)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]


def test_bad_gguf_adapter_files_fail_in_one_line_and_leave_the_model_alone(tmp_path):
    model = _adapted(hidden=64)
    save_adapter_gguf(model, tmp_path / "a.gguf")
    save_model_gguf(tiny_llama(hidden=64), tmp_path / "m.gguf")
    data = (tmp_path / "a.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    narrow = tiny_llama(hidden=32)
    x = ids(vocab=128)
    before = _logits(narrow, x)
    cases = [
        ("m.gguf", AdapterFileError, "not a GGUF LoRA adapter .* pass it as --model"),
        ("cut.gguf", AdapterFileError, "not a readable GGUF file"),
        ("junk.gguf", AdapterFileError, "not a readable GGUF file"),
        ("a.gguf", AdapterError, "has shape"),  # an adapter for hidden=64 on a model of hidden=32
    ]
    for name, err, match in cases:
        with pytest.raises(err, match=match) as e:
            lorakit.load_adapter(narrow, tmp_path / name)
        assert "\n" not in str(e.value)
        assert lorakit.adapter_names(narrow) == [] and torch.equal(_logits(narrow, x), before)
    with pytest.raises(AdapterError, match="written for llama.cpp's 'llama' models, the model is 'qwen2'"):
        lorakit.load_adapter(tiny_qwen2(hidden=64), tmp_path / "a.gguf")


def test_a_gguf_file_with_half_a_pair_is_refused(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "half.gguf", "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", torch.zeros(4, 64).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(AdapterFileError, match=r"blk.0.attn_q.weight has no .lora_b tensor"):
        read_adapter_gguf(tmp_path / "half.gguf")


@pytest.mark.real_model
def test_the_tokenizer_we_build_from_hugging_face_is_the_bundled_ggufs(default_model_dir):
    # an independent fact: the bundled GGUF was written by llama.cpp's converter from the same tokenizer
    from transformers import AutoTokenizer

    from lorakit.models import default_gguf_path

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ours = {e.key: e.value for e in tokenizer_entries(tok)}
    theirs = gguf.GGUFReader(default_gguf_path()).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert ours[key] == theirs[key].contents(), key
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
        assert ours[f"tokenizer.ggml.{key}"] == theirs[f"tokenizer.ggml.{key}"].contents(), key
    assert ours["tokenizer.chat_template"] == theirs["tokenizer.chat_template"].contents()


@pytest.mark.real_model
def test_the_modelfile_carries_smollm2s_chat_template_and_system_prompt(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = modelfile_text("/models/base.gguf", "./a.gguf", tok)
    lines = text.splitlines()
    assert "FROM /models/base.gguf" in lines and "ADAPTER ./a.gguf" in lines
    assert 'TEMPLATE """' in text and "<|im_start|>{{ .Role }}" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert 'TEMPLATE """' not in modelfile_text("m.gguf", None, None)  # no template known: none guessed


@pytest.mark.real_model
def test_cli_export_inspect_and_its_errors(tmp_path, default_model_dir, capsys):
    model, _ = lorakit.load_model(default_model_dir)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomize(model, std=0.02)
    lorakit.save_adapter(model, tmp_path / "adapter")
    proc = cli_here(
        capsys, "export", "gguf", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "a.gguf")
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "a GGUF LoRA adapter, 120 tensors (f32)" in proc.stdout and "ollama create" in proc.stdout
    mf = (tmp_path / "a.Modelfile").read_text()
    assert (
        "ADAPTER ./a.gguf" in mf and "FROM /" in mf and mf.split("FROM ")[1].split("\n")[0].endswith(".gguf")
    )
    proc = cli_here(capsys, "inspect", str(tmp_path / "a.gguf"), "--rows", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "architecture llama, alpha 8" in proc.stdout and "60 weights, 230,400 parameters" in proc.stdout
    # the GGUF adapter loads back onto the model, and inspect reports what it adds
    proc = cli_here(capsys, "inspect", str(tmp_path / "a.gguf"), "--model", str(default_model_dir))
    assert proc.returncode == 0 and "230,400" in proc.stdout, proc.stderr[-2000:]
    proc = cli_here(
        capsys,
        "generate",
        "--model",
        str(default_model_dir),
        "--adapter",
        str(tmp_path / "a.gguf"),
        "--max-new-tokens",
        "4",
        "Hi",
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
    for args, match in [
        (["export", "gguf", "--out", str(tmp_path / "x.gguf")], "an adapter is needed"),
        (
            ["export", "gguf", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "no/x.gguf")],
            "does not exist",
        ),
        (
            ["export", "gguf", "--adapter", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.gguf")],
            "not an adapter folder",
        ),
    ]:
        proc = cli_here(capsys, *args)
        err = proc.stderr
        assert proc.returncode == 2 and match in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.gguf").exists()


def test_the_gguf_format_is_registered_for_files_only():
    from lorakit.formats import FORMATS

    fmt = FORMATS["GGUF"]
    assert fmt.suffix == ".gguf" and not fmt.owns(None, "default")
    with pytest.raises(ConfigError, match="export_gguf"):
        fmt.save(None, None, "default")


def test_the_modelfile_knows_llama_3s_template():
    from fsdp_worker import char_tokenizer

    tok = char_tokenizer()
    tok.chat_template = (  # Llama 3's layout, with no default system prompt
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    lines = modelfile_text("./m.gguf", None, tok).splitlines()
    assert "FROM ./m.gguf" in lines and not any(line.startswith("ADAPTER") for line in lines)
    assert "{{ .Content }}<|eot_id|>" in "\n".join(lines)
    assert 'PARAMETER stop "<|eot_id|>"' in lines and not any(line.startswith("SYSTEM") for line in lines)
