"""EVA, the data-driven init (`lorakit.inject_eva`, `--lora.init eva`): its PCA, its rank redistribution, files
both ways with PEFT, PEFT's own EVA as the oracle on the real model, training, and the refusals.

Tolerances: the incremental PCA is exact float32 linear algebra on well-separated variances, so its components
agree with a full eigendecomposition to ~1e-6 (1e-4 allowed). Logits of the same adapter in PEFT and lorakit agree
to ~1e-7 (1e-5 allowed, as in test_peft_interop.py). PEFT's EVA uses a randomised low-rank SVD, ours an exact
one: on the real model they agree to ~1e-6 in cosine (1e-4 allowed).
"""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit import AdapterError, ConfigError, LoraConfig
from lorakit.data.jsonl import DataError
from lorakit.registry import registry
from lorakit.variants.eva import _IncrementalPCA

from runs import addition_run
from tiny import first_layers, perturb_peft, randomize, snapshot, tiny_llama, tiny_qwen2

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(n: int = 30, batch: int = 4, seq: int = 32, prompt: int = 8, vocab: int = 128, seed: int = 1):
    """Batches as a training loop feeds them: the first `prompt` positions carry no label."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, :prompt] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _config(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "alpha": 8, "targets": TARGETS, "init": "eva", **kw})


# -- the PCA ----------------------------------------------------------------------------------------------------


def test_incremental_pca_equals_the_pca_of_all_the_rows():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([8.0, 5.0, 3.0, 2.0] + [0.3] * 12)  # four well-separated directions, then noise
    basis, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    rows = (torch.randn(1000, 16, generator=g) * scales) @ basis.T + 3.0  # an offset: PCA centres
    pca = _IncrementalPCA(4)
    for chunk in rows.split(200):
        pca.partial_fit(chunk)
    centred = (rows - rows.mean(0)).double()
    values, vectors = torch.linalg.eigh(centred.T @ centred)
    top = vectors[:, -4:].flip(1).T.float()  # (4, 16), largest first
    cos = (pca.components * top).sum(1).abs()
    torch.testing.assert_close(cos, torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(pca.ratio, (values[-4:].flip(0) / values.sum()).float(), atol=1e-4, rtol=0)


# -- inject_eva -------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_inject_eva_leaves_the_output_and_sets_a_to_the_components():
    model, batches = tiny_llama(), _batches()
    x = batches[0]["input_ids"]
    before = model(x).logits
    res = lorakit.inject_eva(model, _config(), batches, progress=False)
    assert res.converged and res.groups == 8  # per layer: q/k/v, o, gate/up, down
    assert sum(res.ranks.values()) == 4 * 14  # the budget: r times the modules
    assert len(set(res.ranks.values())) > 1  # redistributed
    torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)  # B = 0
    cfg = registry(model).adapters["default"].config
    assert cfg.init == "eva"
    for name, r in res.ranks.items():
        if not r:
            assert not isinstance(model.get_submodule(name), lorakit.LoraLayer)
            continue
        adapter = model.get_submodule(name).adapters["default"]
        a = adapter.lora_A
        assert a.shape[0] == r == cfg.rank_for(name)
        torch.testing.assert_close(a @ a.T, torch.eye(r), atol=1e-5, rtol=0)  # principal directions
        assert torch.equal(a, res.components[name])
        assert not adapter.lora_B.any()
        assert adapter.scaling == pytest.approx(8 / 4)  # eva_adjust_scaling keeps alpha/r


@torch.no_grad()
def test_layers_reading_one_input_share_its_components_and_rho_one_keeps_every_rank():
    model = tiny_llama()
    res = lorakit.eva_components(model, _config(eva_rho=1.0), _batches(), progress=False)
    assert set(res.ranks.values()) == {4}
    for layer in (0, 1):
        attn = f"model.layers.{layer}.self_attn"
        assert torch.equal(res.components[f"{attn}.q_proj"], res.components[f"{attn}.v_proj"])
        assert not torch.equal(res.components[f"{attn}.q_proj"], res.components[f"{attn}.o_proj"])
    lorakit.inject_eva(model, _config(eva_rho=1.0), _batches(), progress=False)
    cfg = registry(model).adapters["default"].config
    assert cfg.rank_pattern == {} and cfg.alpha_pattern == {}


@torch.no_grad()
def test_other_adapters_are_off_while_eva_reads_the_inputs():
    bare = lorakit.eva_components(tiny_llama(), _config(), _batches(), progress=False)
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj", "o_proj"]), name="other")
    randomize(model, std=0.5)
    res = lorakit.inject_eva(model, _config(), _batches(), name="eva", progress=False)
    assert res.ranks == bare.ranks
    for name, a in bare.components.items():
        torch.testing.assert_close(res.components[name], a, atol=0, rtol=0)
    assert lorakit.active_adapters(model) == {"eva": 1.0}


@torch.no_grad()
def test_whiten_divides_by_the_root_of_the_singular_values():
    plain = lorakit.eva_components(tiny_llama(), _config(), _batches(), progress=False)
    white = lorakit.eva_components(tiny_llama(), _config(eva_whiten=True), _batches(), progress=False)
    name = "model.layers.0.self_attn.o_proj"
    ratio = white.components[name].norm(dim=1) / plain.components[name].norm(dim=1)
    assert ratio.std() > 0.01  # each row by its own singular value
    torch.testing.assert_close(white.components[name] / white.components[name].norm(dim=1, keepdim=True),
                               plain.components[name], atol=1e-6, rtol=0)


def test_a_cap_on_batches_warns_and_uses_what_it_has():
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"did not converge to eva_tau=1.0 within 2 batches"):
        res = lorakit.inject_eva(model, _config(eva_tau=1.0, eva_batches=2), _batches(), progress=False)
    assert res.batches == 2 and not res.converged
    assert sum(res.ranks.values()) == 4 * 14


@torch.no_grad()
def test_dora_with_eva():
    model, batches = tiny_llama(), _batches()
    x = batches[0]["input_ids"]
    before = model(x).logits
    lorakit.inject_eva(model, _config(use_dora=True), batches, progress=False)
    torch.testing.assert_close(model(x).logits, before, atol=ATOL, rtol=0)
    assert registry(model).adapters["default"].config.use_dora


@torch.no_grad()
def test_eva_on_a_4bit_base():
    model, batches = tiny_llama(hidden=64), _batches()
    lorakit.quantize(model, "nf4")
    x = batches[0]["input_ids"]
    before = model(x).logits
    res = lorakit.inject_eva(model, _config(), batches, progress=False)
    assert sum(res.ranks.values()) == 4 * 14
    torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)


# -- files, both ways with PEFT ---------------------------------------------------------------------------------


@torch.no_grad()
def test_an_eva_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    model, batches = tiny_qwen2(), _batches()
    x = batches[0]["input_ids"]
    lorakit.inject_eva(model, _config(), batches, progress=False)
    randomize(model, std=0.1)
    ours = model(x).logits
    lorakit.save_adapter(model, tmp_path / "eva")
    saved = json.loads((tmp_path / "eva" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva"
    assert saved["eva_config"]["rho"] == 2.0 and saved["rank_pattern"]
    theirs = peft.PeftModel.from_pretrained(tiny_qwen2(), tmp_path / "eva").eval()(x).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    again = tiny_qwen2()
    lorakit.load_adapter(again, tmp_path / "eva")
    torch.testing.assert_close(again(x).logits, ours, atol=ATOL, rtol=0)


@torch.no_grad()
def test_peft_eva_adapters_load_with_the_same_logits(tmp_path):
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    batches = _batches()
    x = batches[0]["input_ids"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                          eva_config=peft.EvaConfig(rho=2.0, tau=0.9))  # a random model converges slowly
    pm = peft.get_peft_model(tiny_llama(), cfg)
    initialize_lora_eva_weights(pm, batches, show_progress_bar=False)
    perturb_peft(pm, std=0.1)
    pm.eval()
    theirs = pm(x).logits
    pm.save_pretrained(tmp_path / "peft")
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(model(x).logits, theirs, atol=ATOL, rtol=0)
    loaded = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for name, r in loaded["rank_pattern"].items():
        assert model.get_submodule(name).adapters["default"].r == r


# -- config -----------------------------------------------------------------------------------------------------


def test_config_maps_to_peft_eva_config_and_back():
    cfg = LoraConfig(r=4, targets=["q_proj"], init="eva", eva_rho=1.5, eva_tau=0.9, eva_whiten=True,
                     eva_label_mask=False, eva_adjust_scaling=False)
    d = cfg.to_peft_dict()
    assert d["init_lora_weights"] == "eva"
    assert d["eva_config"] == {"rho": 1.5, "tau": 0.9, "use_label_mask": False, "label_mask_value": -100,
                               "whiten": True, "adjust_scaling_factors": False}
    assert LoraConfig.from_peft_dict(d) == cfg
    assert "eva_config" not in LoraConfig(r=4, targets=["q_proj"]).to_peft_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eva_rho": 0.5}, "eva_rho must be a number >= 1, got 0.5"),
        ({"eva_tau": 1.5}, r"eva_tau must be a number in \[0, 1\], got 1.5"),
        ({"eva_batches": 0}, "eva_batches must be a positive integer, got 0"),
        ({"eva_whiten": "yes"}, "eva_whiten must be true or false, got 'yes'"),
        ({"target_parameters": ["mlp.w"], "targets": []}, "target_parameters does not work with init='eva'"),
        ({"lora_bias": True}, "lora_bias does not work with init='eva'"),
    ],
)
def test_bad_eva_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**{"r": 4, "targets": ["q_proj"], "init": "eva", **kwargs})


def test_bad_eva_config_in_a_file_names_its_key():
    d = LoraConfig(r=4, targets=["q_proj"], init="eva").to_peft_dict()
    with pytest.raises(ConfigError, match=r"a.json: eva_config.rho must be a number >= 1"):
        LoraConfig.from_peft_dict({**d, "eva_config": {"rho": 0.1}}, source="a.json")
    with pytest.raises(ConfigError, match="a.json: eva_config must be a mapping"):
        LoraConfig.from_peft_dict({**d, "eva_config": [1]}, source="a.json")


# -- refusals: one line, the model as it was --------------------------------------------------------------------


def test_plain_inject_of_eva_says_how_and_leaves_the_model():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(AdapterError, match=r"init 'eva' computes A .* lorakit.inject_eva\(model, config, batches\)"):
        lorakit.inject(model, _config())
    assert not lorakit.adapter_names(model) and not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())


def test_bad_data_is_refused_before_the_model_changes():
    model = tiny_llama()
    with pytest.raises(DataError, match="EVA needs at least one batch of data, got none"):
        lorakit.inject_eva(model, _config(), [], progress=False)
    unlabelled = _batches(n=3)
    for b in unlabelled:
        b["labels"][:] = -100
    with pytest.raises(DataError, match=r"never saw 8 positions in one batch .* eva_label_mask false"):
        lorakit.inject_eva(model, _config(), unlabelled, progress=False)
    assert not lorakit.adapter_names(model)
    res = lorakit.inject_eva(model, _config(eva_label_mask=False, eva_batches=3), unlabelled, progress=False)
    assert res.batches == 3


def test_a_taken_name_is_refused_before_any_data_is_read():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, targets=["q_proj"]))
    read = []

    def stream():
        for b in _batches(n=2):
            read.append(b)
            yield b

    with pytest.raises(AdapterError, match="adapter 'default' already exists"):
        lorakit.inject_eva(model, _config(), stream(), progress=False)
    assert not read


# -- training ---------------------------------------------------------------------------------------------------


def test_lorakit_train_with_eva(tmp_path):
    # the answers are 2-3 tokens: every token, so that a batch has more positions than components
    summary, model = addition_run(tmp_path, "--lora.init", "eva", "--lora.eva_label_mask", "false",
                                  "--lora.eva_batches", "8")
    eva = summary["eva"]
    assert eva["batches"] >= 1 and eva["modules"] >= 1
    assert summary["after"]["loss"] < summary["before"]["loss"]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva"


def test_train_refuses_eva_with_another_method():
    from lorakit.train.config import load_config

    with pytest.raises(ConfigError, match="lora.init eva works with method lora"):
        load_config(None, ["--lora.init", "eva", "--method", "dylora"])


# -- the real default model -------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_model_eva_matches_peft(default_model_dir):
    """PEFT's EVA as the oracle: the same ranks for every module, the same principal directions. Three layers are
    compared; the model is cut after them (their inputs do not depend on later layers, and PEFT's pass would
    otherwise run all 30 for every batch)."""
    from peft.tuners.lora.eva import get_eva_state_dict

    from lorakit.data.tokenize import encode_dataset
    from lorakit.train.config import RunConfig
    from lorakit.train.run import load_examples
    from lorakit.train.schedule import init_batches

    model, tok = lorakit.load_model(str(default_model_dir))
    first_layers(model, 3)
    cfg = RunConfig()
    train, _, _ = load_examples(cfg)
    rows, _ = encode_dataset(tok, train, max_len=cfg.data.max_len, chat=cfg.data.chat)
    batches = list(init_batches(rows, cfg, tok.pad_token_id))
    layers = [0, 1, 2]  # all of the cut model's: lorakit's pass and PEFT's see the same layers
    ours = lorakit.eva_components(model, LoraConfig(r=16, alpha=32, targets=TARGETS, layers=layers, init="eva"),
                                  batches, progress=False)
    theirs = get_eva_state_dict(
        model,
        batches,
        peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, layers_to_transform=layers,
                        init_lora_weights="eva", eva_config=peft.EvaConfig()),
        show_progress_bar=False,
    )
    assert ours.converged and len(ours.ranks) == 21
    assert ours.ranks == {m: theirs[m].shape[0] for m in ours.ranks}
    for m, a in ours.components.items():
        cos = (a * theirs[m]).sum(1).abs()
        torch.testing.assert_close(cos, torch.ones_like(cos), atol=1e-4, rtol=0)
