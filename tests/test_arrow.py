"""Arrow routing (`lorakit.arrow`, PEFT's `arrow_config` / `create_arrow_model`): per token and layer, the top-k
adapters of a library by |x·prototype|, mixed by a softmax; GenKnowSub; exact prototypes; PEFT as the oracle of
the routing; the limits (one adapter, uniform mixing); every refusal leaving the model as it was; the CLI; the real
default model.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from peft.tuners.lora.arrow import create_arrow_model
from peft.tuners.lora.config import ArrowConfig

import lorakit
from lorakit import LoraConfig
from lorakit.arrow import top_right_singular_vector
from lorakit.cli import main as cli_main
from lorakit.errors import AdapterError, ConfigError

from tiny import ids, randomize, snapshot, tiny_llama, unchanged

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["t0", "t1", "t2", "g0", "g1"]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A model with five random adapters of the same modules (three tasks, two general), and their folders."""
    root = tmp_path_factory.mktemp("arrow")
    model = tiny_llama()
    for n in NAMES:
        lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"), n)
    randomize(model, std=0.2)
    for n in NAMES:
        lorakit.save_adapter(model, root / n, n)
    return model, root


def _ours(model, x, **kw):
    with torch.no_grad(), lorakit.arrow(model, **kw) as plan:
        logits = model(x).logits
        layers = [layer for _, layer in lorakit.lora_layers(model) if plan.names[0] in layer.adapters]
        protos = {id(layer): plan._prototypes(layer) for layer in layers}
    return logits, protos


def test_the_prototype_is_the_top_right_singular_vector():
    g = torch.Generator().manual_seed(0)
    for r, k, d in ((4, 32, 48), (8, 16, 64), (1, 10, 10)):
        A, B = torch.randn(r, k, generator=g), torch.randn(d, r, generator=g)
        want = torch.linalg.svd((B @ A).double())[2][0]
        got = top_right_singular_vector(A, B).double()
        assert abs(float(got @ want)) > 1 - 1e-6 and abs(float(got.norm()) - 1) < 1e-6  # float32 output


@pytest.mark.parametrize("gks", [False, True], ids=["arrow", "arrow+genknowsub"])
def test_the_routing_is_peft_s(library, gks):
    """PEFT's create_arrow_model on the same folders, its prototypes replaced by ours (PEFT's 15 power-iteration
    steps from a random start miss the top singular vector where the top two singular values are close, which
    flips the top-k): the same logits (atol 1e-5: float32 sums in another order)."""
    model, root = library
    x = ids(batch=2, seq=10)
    general = NAMES[3:] if gks else ()
    ours, protos = _ours(model, x, adapters=NAMES[:3], top_k=2, temperature=0.7, general=general)
    config = ArrowConfig(top_k=2, router_temperature=0.7, use_gks=gks, rng_seed=0)
    pm = create_arrow_model(
        tiny_llama(), [str(root / n) for n in NAMES[:3]], config, general_adapter_paths=[str(root / n) for n in general] or None
    ).eval()
    with torch.no_grad():
        pm(x)  # PEFT's GenKnowSub and prototypes happen at the first forward
        theirs_layers = [m for m in pm.modules() if hasattr(m, "lora_arrow")]
        our_layers = [layer for _, layer in lorakit.lora_layers(model) if "t0" in layer.adapters]
        assert len(theirs_layers) == len(our_layers) == 14
        cosines = []
        for mine, theirs in zip(our_layers, theirs_layers, strict=True):
            arrow = theirs.lora_arrow["arrow_router"]
            cosines += (protos[id(mine)] @ arrow.prototypes.T).diagonal().abs().tolist()
            arrow.prototypes.copy_(protos[id(mine)])
        torch.testing.assert_close(pm(x).logits, ours, atol=1e-5, rtol=0)
        with lorakit.disabled(model):
            assert (model(x).logits - ours).abs().max() > 1e-2  # the routing does change the output
    # PEFT's power iteration lands on the top singular vector for most adapters, but not where the top two
    # singular values are close (these random adapters): what replacing its prototypes was for
    assert sorted(cosines)[len(cosines) // 2] > 0.99


def test_one_adapter_is_that_adapter_and_a_hot_softmax_is_the_mean(library):
    model, _ = library
    x = ids(batch=2, seq=10)
    with torch.no_grad():
        lorakit.set_active(model, "t1")
        alone = model(x).logits
        lorakit.set_active(model, {"t0": 1 / 3, "t1": 1 / 3, "t2": 1 / 3})
        mean = model(x).logits
    torch.testing.assert_close(_ours(model, x, adapters=["t1"], top_k=1)[0], alone, atol=1e-5, rtol=0)
    # top_k = all and a temperature far above the scores: every adapter weighs 1/3 (softmax of nearly equal values)
    torch.testing.assert_close(
        _ours(model, x, adapters=NAMES[:3], top_k=3, temperature=1e6)[0], mean, atol=1e-4, rtol=0
    )


def test_genknowsub_restores_the_adapters_bit_for_bit_and_generation_works(library):
    model, _ = library
    before = snapshot(model)
    x = ids(batch=1, seq=6)
    with lorakit.arrow(model, NAMES[:3], top_k=2, general=NAMES[3:]):
        out = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11) and unchanged(model, before)
    assert all(layer.row_plan is None for _, layer in lorakit.lora_layers(model))


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(adapters=[]), AdapterError, "no adapters to route"),
        (dict(adapters=["t0", "nope"]), AdapterError, "no adapter 'nope'"),
        (dict(adapters=["t0", "t0"]), AdapterError, "routes once"),
        (dict(adapters=["t0", "g0"], general=["g0"]), AdapterError, "routes once"),
        (dict(adapters=["t0"], top_k=0), ConfigError, "top_k must be a positive integer"),
        (dict(adapters=["t0"], temperature=0), ConfigError, "temperature must be a number > 0"),
    ],
)
def test_bad_arguments(library, kw, error, match):
    model, _ = library
    before = snapshot(model)
    with pytest.raises(error, match=match) as info, lorakit.arrow(model, **kw):
        pass
    assert "\n" not in str(info.value) and unchanged(model, before)


def test_what_arrow_cannot_route_is_refused_untouched():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]), "a")
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj"]), "b")
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], use_dora=True), "dora")
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["embed_tokens"]), "emb")
    lorakit.inject(model, LoraConfig(r=2, alpha=8, targets=["q_proj", "v_proj"]), "r2")
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"]), "head")
    randomize(model)
    before = snapshot(model)
    for names, general, match in (
        (["a", "b"], (), "does not adapt 'model.layers.0.self_attn.v_proj'"),
        (["a", "dora"], (), "adapter 'dora' is DoRA, not plain LoRA"),
        (["emb"], (), "is no linear layer"),
        (["a"], ["r2"], "general adapters need the ranks"),
        (["a", "head"], (), "adapter 'head' also saves modules whole"),
    ):
        with pytest.raises(AdapterError, match=match), lorakit.arrow(model, names, general=general):
            pass
        assert unchanged(model, before)
    with (
        lorakit.row_adapters(model, ["a"]),
        pytest.raises(AdapterError, match="already routes its rows"),
        lorakit.arrow(model, ["a", "r2"]),
    ):
        pass
    lorakit.set_active(model, "a")
    lorakit.merge(model)
    with pytest.raises(AdapterError, match="merged"), lorakit.arrow(model, ["a", "r2"]):
        pass


def _cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["generate", *args]) == 0
    return out.getvalue().strip()


@pytest.mark.real_model
def test_real_model_cli_and_peft(default_model_dir, tmp_path):
    """Three random adapters on SmolLM2: `lorakit generate --adapter ... --arrow 2` prints what lorakit.arrow
    generates, and PEFT's routing with our prototypes gives our logits (atol 2e-3: logits ~40, f32 sums)."""
    from lorakit.generate import generate

    model, tok = lorakit.load_model(default_model_dir)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # A's Kaiming init
    for i in range(3):
        lorakit.inject(model, LoraConfig(r=8, alpha=16, targets="all-linear"), f"a{i}")
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    for i in range(3):
        lorakit.save_adapter(model, tmp_path / f"a{i}", f"a{i}")
    names = [f"a{i}" for i in range(3)]
    with lorakit.arrow(model, names, top_k=2):
        want = generate(model, tok, "Name a fruit.", max_new_tokens=8)
    with lorakit.disabled(model):
        base = generate(model, tok, "Name a fruit.", max_new_tokens=8)
    assert want != base
    folders = [a for i in range(3) for a in ("--adapter", str(tmp_path / f"a{i}"))]
    got = _cli("Name a fruit.", "--model", str(default_model_dir), *folders, "--arrow", "2", "--max-new-tokens", "8")
    assert got == want
    x = tok(["The capital of France is"], return_tensors="pt")["input_ids"]
    ours, protos = _ours(model, x, adapters=names, top_k=2)
    fresh, _ = lorakit.load_model(default_model_dir)
    pm = create_arrow_model(fresh, [str(tmp_path / n) for n in names], ArrowConfig(top_k=2, rng_seed=0)).eval()
    with torch.no_grad():
        pm(x)
        theirs_layers = [m for m in pm.modules() if hasattr(m, "lora_arrow")]
        our_layers = [layer for _, layer in lorakit.lora_layers(model) if "a0" in layer.adapters]
        for mine, theirs in zip(our_layers, theirs_layers, strict=True):
            theirs.lora_arrow["arrow_router"].prototypes.copy_(protos[id(mine)])
        torch.testing.assert_close(pm(x).logits, ours, atol=2e-3, rtol=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--general", "x"], "--general is Arrow's (GenKnowSub): give --arrow K too"),
        (["--arrow", "2"], "--arrow K routes between adapters: give them with --adapter (repeat)"),
    ],
)
def test_cli_refusals_are_one_line_before_any_load(capsys, argv, message):
    assert cli_main(["generate", "hi", "--model", "/no/such/model", *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"lorakit generate: error: {message}"


def test_adapters_of_different_ranks_route_together():
    """PEFT requires one rank; here r=4 and r=2 mix (a very hot softmax: their mean, atol 1e-4)."""
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets="all-linear"), "a")
    lorakit.inject(model, LoraConfig(r=2, alpha=8, targets="all-linear"), "b")
    randomize(model, std=0.2)
    x = ids(batch=2, seq=8)
    lorakit.set_active(model, {"a": 0.5, "b": 0.5})
    with torch.no_grad():
        mean = model(x).logits
    torch.testing.assert_close(_ours(model, x, adapters=["a", "b"], top_k=2, temperature=1e6)[0], mean, atol=1e-4, rtol=0)


def test_a_peft_arrow_router_file_says_what_to_do():
    d = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "arrow_config": {"top_k": 2}}
    with pytest.raises(ConfigError, match="route between them with lorakit.arrow"):
        LoraConfig.from_peft_dict(d)
