"""lorakit.hotswap and prepare_hotswap: another file's adapter in the same tensors, with its outputs, without
recompiling a compiled model; refusals leave the model as it was.

Tolerance: hotswap folds s_file/s into B, one float32 product per element (relative 6e-8), and the zero-padded
ranks add exact zeros; the logits (~1) of a swapped model are compared with a fresh load at atol 1e-5, the float32
noise of two summation orders over a few layers. Where the ratio is 1, the tensors are compared exactly.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit import AdapterError, LoraConfig

from tiny import SEVEN, ids, randomize, snapshot, tied_config, tied_llama, tiny_llama, unchanged

X = ids()


def saved(folder, seed: int, **kw):
    """A tiny Llama's adapter, randomised with `seed`, saved to `folder`."""
    model = lorakit.inject(tiny_llama(), LoraConfig(**{"r": 4, "alpha": 8, "targets": SEVEN, **kw}))
    randomize(model, std=0.3, seed=seed)
    lorakit.save_adapter(model, folder)
    return folder


def fresh(folder) -> torch.Tensor:
    """The logits of a new tiny Llama with the adapter at `folder` loaded: what a swapped model must compute."""
    model = tiny_llama()
    lorakit.load_adapter(model, folder)
    with torch.no_grad():
        return model(X).logits


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


class Graphs:
    """A torch.compile backend that counts the graphs dynamo hands it (each compilation) and runs them eagerly."""

    def __init__(self):
        self.n = 0

    def __call__(self, gm, inputs):
        self.n += 1
        return gm.forward


@pytest.mark.parametrize(
    "kw",
    [
        {},  # same rank and alpha: B copied exactly
        {"r": 2, "alpha": 16},  # smaller rank, another scaling
        {"r": 4, "alpha": 3, "use_rslora": True},
        {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},  # fewer modules: the others compute zero
        {"r": 3, "alpha": 6, "rank_pattern": {"down_proj": 1}, "alpha_pattern": {"o_proj": 2}},
    ],
    ids=["same", "smaller-rank", "rslora", "fewer-modules", "patterns"],
)
def test_a_swapped_model_computes_the_file_in_the_same_tensors(tmp_path, kw):
    model = tiny_llama()
    lorakit.load_adapter(model, saved(tmp_path / "a", seed=1))
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    pointers = {n: p.data_ptr() for n, p in params.items()}
    before = logits(model)
    lorakit.hotswap(model, saved(tmp_path / "b", seed=2, **kw))
    after = logits(model)
    torch.testing.assert_close(after, fresh(tmp_path / "b"), rtol=0, atol=1e-5)
    assert (after - before).abs().max() > 1e-2  # the swap changed the outputs
    now = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert now.keys() == params.keys() and all(now[n] is params[n] for n in now)
    assert all(p.data_ptr() == pointers[n] for n, p in now.items())
    if not kw:  # the same alpha and rank: the file's tensors, bit for bit
        assert all(
            torch.equal(lorakit.adapter_state_dict(model)[k], v) for k, v in _file(tmp_path / "b").items()
        )


def _file(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_compiled_model_takes_the_swap_without_compiling_again(tmp_path):
    """The swap's values reach the compiled graph, which dynamo did not compile again; setting the scaling, as a
    naive swap of a rank-2 alpha-16 file would, does make it compile again (so the count can fail)."""
    model = tiny_llama().eval()
    lorakit.load_adapter(model, saved(tmp_path / "a", seed=1))
    graphs = Graphs()
    compiled = torch.compile(model, backend=graphs)
    logits(compiled)
    first = graphs.n
    for seed, kw in ((2, {"r": 2, "alpha": 16}), (3, {"r": 4, "alpha": 3, "use_rslora": True}), (4, {})):
        lorakit.hotswap(compiled, saved(tmp_path / f"s{seed}", seed=seed, **kw))
        torch.testing.assert_close(logits(compiled), fresh(tmp_path / f"s{seed}"), rtol=0, atol=1e-5)
    assert first >= 1 and graphs.n == first
    for _, layer in lorakit.lora_layers(model):
        layer.adapters["default"].scaling *= 2
    logits(compiled)
    assert graphs.n > first


def test_prepare_hotswap_makes_room_and_the_adapter_saves_as_it_computes(tmp_path):
    model = tiny_llama()
    lorakit.load_adapter(model, saved(tmp_path / "a", seed=1, r=2, alpha=6, rank_pattern={"o_proj": 1}))
    before = logits(model)
    big = saved(tmp_path / "big", seed=2, r=8, alpha=4)
    keep = snapshot(model)
    with pytest.raises(AdapterError, match=r"r=8 at .* above adapter 'default''s r=\d; make room first") as e:
        lorakit.hotswap(model, big)
    assert "\n" not in str(e.value) and unchanged(model, keep)
    lorakit.prepare_hotswap(model, 8)
    torch.testing.assert_close(
        logits(model), before, rtol=0, atol=1e-5
    )  # zeros add nothing but a new sum order
    lorakit.save_adapter(model, tmp_path / "padded")
    config = lorakit.describe_adapter(tmp_path / "padded")["config"]
    assert config.r == 8 and config.rank_pattern == {} and config.alpha_pattern  # o_proj kept its own scaling
    torch.testing.assert_close(fresh(tmp_path / "padded"), before, rtol=0, atol=1e-5)
    lorakit.hotswap(model, big)
    torch.testing.assert_close(logits(model), fresh(big), rtol=0, atol=1e-5)
    lorakit.save_adapter(model, tmp_path / "swapped")  # the slot's config, the file's update
    torch.testing.assert_close(fresh(tmp_path / "swapped"), fresh(big), rtol=0, atol=1e-5)


def test_peft_hotswap_and_ours_compute_the_same_and_peft_loads_what_we_save(tmp_path):
    import peft
    from peft.utils.hotswap import hotswap_adapter

    a, b = saved(tmp_path / "a", seed=1), saved(tmp_path / "b", seed=2, r=2, alpha=16)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), a)
    hotswap_adapter(theirs, str(b), adapter_name="default", torch_device="cpu")
    ours = tiny_llama()
    lorakit.load_adapter(ours, a)
    lorakit.hotswap(ours, b)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-5)
    lorakit.save_adapter(ours, tmp_path / "saved")  # r=4 with b's update in its first 2 ranks
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved")
    torch.testing.assert_close(logits(again), logits(ours), rtol=0, atol=1e-5)


def test_a_llama_cpp_adapter_file_swaps_in(tmp_path):
    from lorakit.ondevice.adapter import save_adapter_gguf

    source = tiny_llama()
    lorakit.load_adapter(source, saved(tmp_path / "b", seed=2, r=2, alpha=16))
    save_adapter_gguf(source, tmp_path / "b.gguf")
    model = tiny_llama()
    lorakit.load_adapter(model, saved(tmp_path / "a", seed=1))
    lorakit.hotswap(model, tmp_path / "b.gguf")
    torch.testing.assert_close(logits(model), fresh(tmp_path / "b"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("targets", [SEVEN, ["q_proj", "down_proj"]], ids=["same-modules", "fewer-modules"])
def test_dora_swaps_its_magnitude_too(tmp_path, targets):
    """A module the DoRA file leaves out computes its base alone: its pair zero and its magnitude W0's norm."""
    model = tiny_llama()
    lorakit.load_adapter(model, saved(tmp_path / "a", seed=1, use_dora=True))
    lorakit.hotswap(model, saved(tmp_path / "b", seed=2, use_dora=True, r=2, alpha=5, targets=targets))
    torch.testing.assert_close(logits(model), fresh(tmp_path / "b"), rtol=0, atol=1e-5)


def test_a_pissa_file_swaps_in_as_plain_lora_on_the_original_w0(tmp_path):
    model = tiny_llama()
    lorakit.load_adapter(model, saved(tmp_path / "a", seed=1, r=8, alpha=16))
    lorakit.hotswap(model, saved(tmp_path / "p", seed=2, init="pissa"))  # rank 2·4 as plain LoRA
    torch.testing.assert_close(logits(model), fresh(tmp_path / "p"), rtol=0, atol=1e-5)


def test_mixed_batches_see_the_swapped_values(tmp_path):
    model = tiny_llama()
    lorakit.load_adapter(model, saved(tmp_path / "a", seed=1), "a")
    lorakit.load_adapter(model, saved(tmp_path / "c", seed=3), "c")
    with torch.no_grad(), lorakit.row_adapters(model, ["a", "c"]):
        model(X)  # the stacks of a and c are cached now
    lorakit.hotswap(model, saved(tmp_path / "b", seed=2), "a")
    with torch.no_grad(), lorakit.row_adapters(model, ["a", "c"]):
        mixed = model(X).logits
    torch.testing.assert_close(mixed[:1], fresh(tmp_path / "b")[:1], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1:], fresh(tmp_path / "c")[1:], rtol=0, atol=1e-5)


def hot(model, folder):
    lorakit.hotswap(model, folder)


REFUSED = {  # label: (the adapter's LoraConfig keywords, the file's (None: no file), set-up, the call, its words)
    "no-adapter": (
        {},
        {},
        None,
        lambda m, f: lorakit.hotswap(m, f, "other"),
        "no adapter 'other' on this model",
    ),
    "no-folder": ({}, None, None, hot, "nowhere"),
    "more-modules": (
        {"targets": ["q_proj"]},
        {},
        None,
        hot,
        r"adapts model\.layers\.0\.self_attn\.k_proj, which adapter 'default' does not",
    ),
    "dora-into-plain": ({}, {"use_dora": True}, None, hot, "a DoRA adapter, and adapter 'default' is not"),
    "plain-into-dora": (
        {"use_dora": True},
        {},
        None,
        hot,
        "a plain LoRA adapter, and adapter 'default' is not",
    ),
    "kasa-file": ({}, {"use_kasa": True}, None, hot, "KaSA or BD-LoRA; hotswap takes plain LoRA and DoRA"),
    "kasa-adapter": ({"use_kasa": True}, {}, None, hot, "adapter 'default': KaSA or BD-LoRA"),
    "lora-bias-adapter": ({"lora_bias": True}, {}, None, hot, "adapter 'default': lora_bias"),
    "merged": ({}, {}, lorakit.merge, hot, "adapter 'default' is merged into .*; unmerge it first"),
    "prepare-below": ({}, None, None, lambda m, f: lorakit.prepare_hotswap(m, 2), "has r=4 at .* above 2"),
    "prepare-bad-r": (
        {},
        None,
        None,
        lambda m, f: lorakit.prepare_hotswap(m, 0),
        "r must be a positive integer",
    ),
    "prepare-compiled": (
        {},
        None,
        None,
        lambda m, f: lorakit.prepare_hotswap(torch.compile(m), 8),
        "call it on the model before torch.compile",
    ),
}


@pytest.mark.parametrize("label", REFUSED)
def test_what_cannot_be_swapped_is_refused_and_the_model_left_as_it_was(tmp_path, label):
    own, theirs, setup, act, words = REFUSED[label]
    model = tiny_llama()
    lorakit.load_adapter(model, saved(tmp_path / "slot", seed=1, **own))
    folder = tmp_path / "nowhere" if theirs is None else saved(tmp_path / "file", seed=2, **theirs)
    if setup is not None:
        setup(model)
    before, config = snapshot(model), model._lorakit.adapters["default"].config
    with pytest.raises(lorakit.LorakitError, match=words) as e:
        act(model, folder)
    assert "\n" not in str(e.value)
    assert unchanged(model, before) and model._lorakit.adapters["default"].config == config


def test_a_tied_head_adapter_is_refused(tmp_path):
    """With ensure_weight_tying, the head's pair is a view of the embedding's: zeroing one would zero both."""
    model = lorakit.inject(tied_llama(), tied_config("lora-embedding"))
    randomize(model, std=0.3)
    lorakit.save_adapter(model, tmp_path / "t")
    before = snapshot(model)
    with pytest.raises(AdapterError, match="adapter 'default': ensure_weight_tying") as e:
        lorakit.hotswap(model, tmp_path / "t")
    assert "\n" not in str(e.value) and unchanged(model, before)


@pytest.mark.real_model
def test_on_the_default_model_a_compiled_model_swaps_adapters_without_compiling_again(
    tmp_path, default_model_dir
):
    """SmolLM2-135M in float32, r=16 on every linear layer, then adapters of other ranks and alphas swapped in.
    Tolerance: logits of magnitude ~20 after 30 layers, float32, the swap's one rounding in B and the zero-padded
    sums: atol 1e-3 (a swap that missed a layer or a scaling moves them by more than 0.1)."""
    x = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 4236, 30]])

    def adapter(folder, seed, **kw):
        model, _ = lorakit.load_model(default_model_dir, dtype=torch.float32)
        lorakit.inject(model, LoraConfig(**{"r": 16, "alpha": 32, "targets": "all-linear", **kw}))
        randomize(model, std=0.02, seed=seed)
        lorakit.save_adapter(model, folder)
        with torch.no_grad():
            return model(x).logits

    first = adapter(tmp_path / "a", 1)
    wants = [
        adapter(tmp_path / "b", 2, r=8, alpha=64),
        adapter(tmp_path / "c", 3, r=16, alpha=8, use_rslora=True),
    ]
    model, _ = lorakit.load_model(default_model_dir, dtype=torch.float32)
    lorakit.load_adapter(model, tmp_path / "a")
    graphs = Graphs()
    compiled = torch.compile(model.eval(), backend=graphs)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, first, rtol=0, atol=1e-3)
        count = graphs.n
        for folder, want in zip(("b", "c"), wants, strict=True):
            lorakit.hotswap(compiled, tmp_path / folder)
            got = compiled(x).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
            assert (got - first).abs().max() > 0.1
    assert graphs.n == count
