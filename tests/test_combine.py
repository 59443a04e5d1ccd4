"""Combining adapters: `cat` is exact in ΔW space, `linear`/`svd` of one adapter reproduce it, TIES / DARE /
magnitude pruning equal the papers' equations computed here on the full ΔW matrices, results load in PEFT, and bad
input fails in one line without writing anything.

Sources differ in r, alpha, rsLoRA and rank/alpha patterns, so every check also checks the per-module scaling.
Tolerances: references are computed in float64 from the sources' float32 factors; the combined factors are
rounded once to float32, so ΔW (entries ~0.1-1) agrees to ~1e-7 and we allow atol=1e-6. Logits of the tiny models
agree to ~1e-7; we allow 1e-5 (1e-5 also for PEFT vs lorakit, as in test_peft_interop.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit import AdapterError, AdapterFileError, ConfigError, LoraConfig, delta_weight
from lorakit.combine import combine, combine_tensors

from tiny import ConvNet, ids, randomize, tiny_gpt2, tiny_llama

DELTA_ATOL = 1e-6
LOGIT_ATOL = 1e-5
WEIGHTS = [0.7, 0.3, -0.5]


def _three(targets, patterned: str, alpha_patterned: str) -> list[LoraConfig]:
    """Plain, rsLoRA with another r and alpha, and rsLoRA with a rank_pattern and an alpha_pattern."""
    return [
        LoraConfig(r=4, alpha=8, targets=targets),
        LoraConfig(r=2, alpha=16, targets=targets, use_rslora=True),
        LoraConfig(
            r=3,
            alpha=5,
            targets=targets,
            use_rslora=True,
            rank_pattern={patterned: 5},
            alpha_pattern={alpha_patterned: 2.0},
        ),
    ]


FAMILIES = {
    "llama": (
        tiny_llama,
        ids(),
        _three(["embed_tokens", "q_proj", "v_proj"], "v_proj", r"layers\.1\..*q_proj"),
    ),
    "gpt2": (tiny_gpt2, ids(), _three(["wte", "c_attn"], "wte", r"h\.0\.attn\.c_attn")),
    "conv": (ConvNet, ids(vocab=20), _three(["emb", "conv1", "conv2", "head"], "conv2", "emb")),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> three adapter folders on that family's tiny model, with random non-zero A and B."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for family, (make, _, configs) in FAMILIES.items():
        paths = []
        for i, cfg in enumerate(configs):
            model = make()
            lorakit.inject(model, cfg)
            randomize(model, std=0.1, seed=10 + i)
            paths.append(lorakit.save_adapter(model, root / f"{family}{i}"))
        out[family] = paths
    return out


def _output(model, x):
    y = model(x)
    return getattr(y, "logits", y)


def _deltas(make, path, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Module -> ΔW = s·B·A in the base weight's layout, from lorakit's one delta-weight function."""
    model = make().to(dtype)
    lorakit.load_adapter(model, path)
    return {
        m: delta_weight(layer, layer.adapters["default"]).detach() for m, layer in lorakit.lora_layers(model)
    }


def _multi_adapter_output(make, x, paths, weights):
    model = make()
    for i, p in enumerate(paths):
        lorakit.load_adapter(model, p, f"a{i}")
    lorakit.set_active(model, {f"a{i}": w for i, w in enumerate(weights)})
    return _output(model, x)


def _loaded_output(make, x, path):
    model = make()
    lorakit.load_adapter(model, path)
    return _output(model, x)


# -- exactness ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_cat_is_exact(family, sources, tmp_path):
    make, x, configs = FAMILIES[family]
    paths = sources[family]
    out = combine(paths, WEIGHTS, "cat", tmp_path / "cat")
    got = _deltas(make, out)
    refs = [_deltas(make, p) for p in paths]
    assert got.keys() == refs[0].keys()
    for m, d in got.items():
        want = sum(w * ref[m] for w, ref in zip(WEIGHTS, refs, strict=True))
        torch.testing.assert_close(d, want, atol=DELTA_ATOL, rtol=0, msg=m)
    config, _ = lorakit.read_adapter(out)
    for m in got:  # r adds up per module, and scaling is 1 everywhere
        assert config.rank_for(m) == sum(c.rank_for(m) for c in configs), m
        assert config.scaling_for(m) == 1.0, m
    ours = _loaded_output(make, x, out)
    torch.testing.assert_close(ours, _multi_adapter_output(make, x, paths, WEIGHTS), atol=LOGIT_ATOL, rtol=0)
    assert (ours - _output(make(), x)).abs().max() > 1e-3, "the adapters must change the output"


def test_cat_in_memory_matches_files(sources, tmp_path):
    """The in-memory core gives the same tensors as the file API, and the config's scaling makes ΔW exact."""
    loaded = [lorakit.read_adapter(p) for p in sources["llama"]]
    config, tensors = combine_tensors(loaded, WEIGHTS, "cat")
    file_config, file_tensors = lorakit.read_adapter(
        combine(sources["llama"], WEIGHTS, "cat", tmp_path / "out")
    )
    assert config == file_config and tensors.keys() == file_tensors.keys()
    assert all(torch.equal(tensors[k], file_tensors[k]) for k in tensors)
    refs = [_deltas(tiny_llama, p) for p in sources["llama"]]
    m = "model.layers.1.self_attn.q_proj"
    A = tensors[f"base_model.model.{m}.lora_A.weight"].double()
    B = tensors[f"base_model.model.{m}.lora_B.weight"].double()
    want = sum(w * ref[m] for w, ref in zip(WEIGHTS, refs, strict=True))
    torch.testing.assert_close(config.scaling_for(m) * B @ A, want, atol=DELTA_ATOL, rtol=0)


@pytest.mark.parametrize("method", ["linear", "svd"])
@pytest.mark.parametrize("family", FAMILIES)
def test_single_source_with_weight_one_is_reproduced(family, method, sources, tmp_path):
    make, x, _ = FAMILIES[family]
    src = sources[family][2]  # rsLoRA + rank_pattern + alpha_pattern
    out = combine([src], [1.0], method, tmp_path / method)
    got, want = _deltas(make, out), _deltas(make, src)
    assert got.keys() == want.keys()
    for m in got:
        torch.testing.assert_close(got[m], want[m], atol=DELTA_ATOL, rtol=0, msg=m)
    torch.testing.assert_close(
        _loaded_output(make, x, out), _loaded_output(make, x, src), atol=LOGIT_ATOL, rtol=0
    )


def test_linear_is_peft_semantics_not_exact(sources, tmp_path):
    """linear mixes A and B separately: for two adapters of equal rank ΔW gains cross terms B_i·A_j."""
    paths = [sources["llama"][0], sources["llama"][0]]
    out = combine(paths, [0.5, 0.5], "linear", tmp_path / "lin")
    m = "model.layers.0.self_attn.q_proj"
    # the same adapter twice at 0.5 each: (√0.5·√s·B + √0.5·√s·B)(√0.5·√s·A + √0.5·√s·A) = 2·ΔW, not ΔW
    torch.testing.assert_close(
        _deltas(tiny_llama, out)[m], 2 * _deltas(tiny_llama, paths[0])[m], atol=DELTA_ATOL, rtol=0
    )


# -- TIES, DARE, magnitude pruning: the papers' equations on full ΔW ------------------------------------------------
def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1 (trim): keep the top-k entries by magnitude, k = round(density·numel) (at least 1)."""
    k = max(1, round(density * t.numel()))
    threshold = t.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def _elect_and_merge(taus: list[torch.Tensor], sign_method: str) -> torch.Tensor:
    """TIES steps 2-3: γ = sgn(Σ_t τ_t) (or of Σ_t sgn τ_t), then τ_m = 1/|A| Σ_{t∈A} τ_t, A = {t: sgn τ_t = γ}."""
    gamma = torch.sign(sum(taus) if sign_method == "total" else sum(torch.sign(t) for t in taus))
    gamma = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
    total, count = torch.zeros_like(taus[0]), torch.zeros_like(taus[0])
    for t in taus:
        agree = torch.sign(t) == gamma
        total += torch.where(agree, t, torch.zeros_like(t))
        count += agree
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _dare(deltas: list[torch.Tensor], module: str, density: float, seed: int) -> list[torch.Tensor]:
    """DARE: drop each entry with probability 1 - density, rescale the survivors by 1/density.

    The masks follow combine's documented seeding; deltas are (out, in) Linear weights, the 2-D view itself.
    """
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{module}".encode()))
    keep = torch.rand((len(deltas), *deltas[0].shape), generator=g, dtype=torch.float64) < density
    return [d * k / density for d, k in zip(deltas, keep, strict=True)]


def _reference(method, deltas, module, weights, density, sign_method, seed):
    if method == "ties":
        return _elect_and_merge(
            [_trim(w * d, density) for w, d in zip(weights, deltas, strict=True)], sign_method
        )
    if method == "magnitude_prune":
        return sum(w * _trim(d, density) for w, d in zip(weights, deltas, strict=True))
    dropped = _dare(deltas, module, density, seed)
    taus = [w * d for w, d in zip(weights, dropped, strict=True)]
    return sum(taus) if method == "dare_linear" else _elect_and_merge(taus, sign_method)


PAPER_CASES = [
    pytest.param("llama", "ties", "total", id="ties-llama"),
    pytest.param("llama", "ties", "frequency", id="ties-frequency-llama"),
    pytest.param("gpt2", "ties", "total", id="ties-gpt2-conv1d-embedding"),
    pytest.param("conv", "ties", "total", id="ties-conv"),
    pytest.param("llama", "magnitude_prune", "total", id="magnitude-prune-llama"),
    pytest.param("conv", "magnitude_prune", "total", id="magnitude-prune-conv"),
    pytest.param("llama", "dare_linear", "total", id="dare-linear-llama"),
    pytest.param("llama", "dare_ties", "total", id="dare-ties-llama"),
    pytest.param("llama", "dare_ties", "frequency", id="dare-ties-frequency-llama"),
]


@pytest.mark.parametrize(("family", "method", "sign_method"), PAPER_CASES)
def test_matches_paper_equations_on_full_delta(family, method, sign_method, sources, tmp_path):
    """svd_rank=32 is full rank for every module here, so the combined ΔW is the merged matrix itself."""
    make = FAMILIES[family][0]
    paths, density, seed = sources[family], 0.4, 7
    if family == "llama":  # keep the DARE masks in the (out, in) layout: Linear modules only
        paths = [_only(p, ["q_proj", "v_proj"], tmp_path / p.name) for p in paths]
    kwargs = {"density": density, "svd_rank": 32, "seed": seed, "majority_sign_method": sign_method}
    out = combine(paths, WEIGHTS, method, tmp_path / "out", **kwargs)
    got = _deltas(make, out)
    refs = [_deltas(make, p) for p in paths]
    changed = 0.0
    for m, d in got.items():
        want = _reference(method, [r[m] for r in refs], m, WEIGHTS, density, sign_method, seed)
        torch.testing.assert_close(d, want, atol=DELTA_ATOL, rtol=0, msg=m)
        plain = sum(w * r[m] for w, r in zip(WEIGHTS, refs, strict=True))
        changed = max(changed, (want - plain).abs().max().item())
    assert changed > 1e-2, "pruning must change the result, or the test proves nothing"


def _only(path: Path, leaves: list[str], dest: Path) -> Path:
    """A copy of adapter `path` restricted to modules ending in `leaves` (the config's targets too)."""
    config, tensors = lorakit.read_adapter(path)
    kept = {k: t for k, t in tensors.items() if any(f".{leaf}." in k for leaf in leaves)}
    dest.mkdir()
    save_file(kept, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dest / "adapter_config.json").write_text(json.dumps(config.replace(targets=leaves).to_peft_dict()))
    return dest


def test_svd_truncation_is_the_best_rank_k_approximation(sources, tmp_path):
    make, paths = tiny_llama, sources["llama"]
    out = combine(paths, WEIGHTS, "ties", tmp_path / "out", density=0.5, svd_rank=2)
    full = combine(paths, WEIGHTS, "ties", tmp_path / "full", density=0.5, svd_rank=32)
    got, merged = _deltas(make, out), _deltas(make, full)
    for m, d in got.items():
        U, S, Vh = torch.linalg.svd(merged[m], full_matrices=False)
        torch.testing.assert_close(d, U[:, :2] @ torch.diag(S[:2]) @ Vh[:2], atol=DELTA_ATOL, rtol=0, msg=m)
    config, _ = lorakit.read_adapter(out)
    assert config.r == 2 and not config.rank_pattern and config.alpha == 2


def test_dare_is_seeded(sources, tmp_path):
    paths = sources["llama"]
    a = combine(paths, WEIGHTS, "dare_linear", tmp_path / "a", density=0.5, seed=1)
    b = combine(paths, WEIGHTS, "dare_linear", tmp_path / "b", density=0.5, seed=1)
    c = combine(paths, WEIGHTS, "dare_linear", tmp_path / "c", density=0.5, seed=2)
    a, b, c = ((p / "adapter_model.safetensors").read_bytes() for p in (a, b, c))
    assert a == b != c


# -- PEFT ---------------------------------------------------------------------------------------------------------
PEFT_CASES = [
    pytest.param("llama", "cat", {}, id="cat-rank-alpha-patterns"),
    pytest.param("gpt2", "ties", {"density": 0.5, "svd_rank": 4}, id="ties-conv1d-embedding"),
    pytest.param("llama", "svd", {"allow_missing": True}, id="svd-different-modules"),
]


@pytest.mark.parametrize(("family", "method", "kwargs"), PEFT_CASES)
def test_combined_adapter_loads_in_peft(family, method, kwargs, sources, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
    make, x, _ = FAMILIES[family]
    paths = sources[family]
    if kwargs.get("allow_missing"):  # q,v,embed + q,k: a regex naming the exact union of modules
        paths = [paths[0], _only(paths[1], ["q_proj", "k_proj"], tmp_path / "qk")]
    out = combine(paths, [0.7, 0.3, -0.5][: len(paths)], method, tmp_path / "out", **kwargs)
    theirs = _output(peft.PeftModel.from_pretrained(make(), out).eval(), x)
    ours = _loaded_output(make, x, out)
    torch.testing.assert_close(theirs, ours, atol=LOGIT_ATOL, rtol=0)
    assert (ours - _output(make(), x)).abs().max() > 1e-3


# -- bad input ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad(sources, tmp_path_factory):
    """Adapters that must not combine with sources['llama'][0]."""
    root = tmp_path_factory.mktemp("bad")
    llama = sources["llama"]

    def saved(make, cfg, name):
        model = make()
        lorakit.inject(model, cfg)
        randomize(model)
        return lorakit.save_adapter(model, root / name)

    def with_base(path, base, name):
        dest = shutil.copytree(path, root / name)
        cfg = json.loads((dest / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base}))
        return dest

    corrupt = shutil.copytree(llama[0], root / "corrupt")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return {
        "base_a": with_base(llama[0], "org/model-a", "base_a"),
        "base_b": with_base(llama[1], "org/model-b", "base_b"),
        "qk": saved(tiny_llama, LoraConfig(r=4, targets=["embed_tokens", "q_proj", "k_proj"]), "qk"),
        "wide": saved(
            lambda: tiny_llama(vocab=64),
            LoraConfig(r=4, targets=["embed_tokens", "q_proj", "v_proj"]),
            "wide",
        ),
        "dora": saved(tiny_llama, LoraConfig(r=4, targets=["q_proj", "v_proj"], use_dora=True), "dora"),
        "corrupt": corrupt,
        "missing": root / "no-such-adapter",
    }


ERROR_CASES = [
    pytest.param(["base_a", "base_b"], "cat", {}, AdapterError, r"base_b: made for base model 'org/model-b'", id="bases"),
    pytest.param(["llama0", "qk"], "cat", {}, AdapterError, r"llama0: has no LoRA on model\.layers\.0\.self_attn\.k_proj, which .*qk adapts", id="modules"),
    pytest.param(["llama0", "wide"], "cat", {}, AdapterError, r"embed_tokens: ΔW is an embedding \(32, 128\) in .*llama0 but an embedding \(32, 64\) in .*wide", id="shapes"),
    pytest.param(["llama0", "llama1"], "average", {}, ConfigError, r"unknown combine method 'average'", id="method"),
    pytest.param(["llama0", "llama1"], "cat", {"weights": [1.0]}, ConfigError, r"got 1 weights for 2 adapters", id="weights"),
    pytest.param(["llama0", "llama1"], "ties", {"density": 0.0}, ConfigError, r"density must be in \(0, 1\], got 0\.0", id="density-0"),
    pytest.param(["llama0", "llama1"], "dare_ties", {"density": 1.5}, ConfigError, r"density must be in \(0, 1\], got 1\.5", id="density-1.5"),
    pytest.param(["llama0", "llama1"], "ties", {}, ConfigError, r"method 'ties' needs a density", id="density-missing"),
    pytest.param(["llama0", "llama1"], "svd", {"svd_rank": 0}, ConfigError, r"svd_rank must be a positive integer, got 0", id="svd-rank"),
    pytest.param(["llama0", "llama1"], "linear", {}, AdapterError, r"'linear' needs equal ranks.*use 'cat' \(exact\) or 'svd'", id="linear-ranks"),
    pytest.param(["llama0", "dora"], "cat", {}, AdapterError, r"dora: DoRA adapters cannot be combined", id="dora"),
    pytest.param(["llama0", "missing"], "cat", {}, AdapterFileError, r"no-such-adapter: not an adapter folder", id="missing"),
    pytest.param(["llama0", "corrupt"], "cat", {}, AdapterFileError, r"corrupt/adapter_model\.safetensors: corrupt", id="corrupt"),
]  # fmt: skip


@pytest.mark.parametrize(("names", "method", "kwargs", "error", "match"), ERROR_CASES)
def test_bad_input_is_one_line_and_writes_nothing(
    names, method, kwargs, error, match, sources, bad, tmp_path
):
    known = {**bad, "llama0": sources["llama"][0], "llama1": sources["llama"][1]}
    paths = [known[n] for n in names]
    kwargs = dict(kwargs)
    weights = kwargs.pop("weights", None)
    with pytest.raises(error, match=match) as info:
        combine(paths, weights, method, tmp_path / "out", **kwargs)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == [], "nothing may be written on error"


def test_failed_combine_leaves_existing_output_unchanged(sources, bad, tmp_path):
    out = combine(sources["llama"][:2], None, "cat", tmp_path / "out")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(AdapterError):
        combine([sources["llama"][0], bad["qk"]], None, "cat", out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folder left behind"


# -- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_writes_the_adapter(sources, tmp_path):
    a, b = (str(p) for p in sources["llama"][:2])
    cmd = ["combine", a, b, "--weights", "0.7", "0.3", "--method", "cat", "--out", str(tmp_path / "out")]
    ok = subprocess.run([sys.executable, "-m", "lorakit", *cmd], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "combined 2 adapters with cat" in ok.stdout
    config, _ = lorakit.read_adapter(tmp_path / "out")
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 4 + 2
    record = json.loads((tmp_path / "out" / "combine.json").read_text())
    assert record["method"] == "cat" and record["weights"] == [0.7, 0.3]


def test_cli_bad_call_exits_2_in_one_line(sources, tmp_path, capsys):
    """In-process (`python -m lorakit` is `sys.exit(main())`), to spare a second interpreter start."""
    from lorakit.cli import main

    a, b = (str(p) for p in sources["llama"][:2])
    rc = main(["combine", a, b, "--weights", "0.7", "--method", "cat", "--out", str(tmp_path / "bad")])
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["lorakit combine: error: got 1 weights for 2 adapters; give one weight per adapter"]
    assert not (tmp_path / "bad").exists()


# -- the real default model ---------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_cat_on_real_model_equals_both_adapters_active(default_model_dir, tmp_path):
    """SmolLM2-135M: logits (magnitude ~20) through 30 fp32 layers; the cat adapter computes the same sum in a
    different order (one rank-8 product instead of two rank-4 products), which differs by ~3e-5; atol=2e-4."""
    model, tok = lorakit.load_model(default_model_dir)
    x = tok("The capital of France is", return_tensors="pt")["input_ids"]
    for i, alpha in enumerate([8, 16]):
        lorakit.inject(model, LoraConfig(r=4, alpha=alpha, targets=["q_proj", "v_proj"]), f"s{i}")
    randomize(model, std=0.05, seed=20)
    paths = [lorakit.save_adapter(model, tmp_path / f"s{i}", f"s{i}") for i in range(2)]
    lorakit.set_active(model, {"s0": 0.7, "s1": 0.3})
    with torch.no_grad():
        want = model(x).logits
        with lorakit.disabled(model):
            base = model(x).logits
    out = combine(paths, [0.7, 0.3], "cat", tmp_path / "cat")
    lorakit.load_adapter(model, out, "cat")
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    assert (want - base).abs().max() > 1e-2, "the adapters must change the output"
