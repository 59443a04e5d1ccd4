"""A new base-layer type and a new LoRA variant plug in from outside the core, with no core file edited.

Both are registered here, as a plug-in package would register them on import: a linear layer that stores its
weight as (in, out) and is no nn.Linear, with its own `Handler`; and a "gated" variant, ΔW = g·s·B·A with a
trainable scalar gate g per layer that is saved as its own tensor and recorded in the file's metadata. The
adapter is injected, trained one step, merged and unmerged, saved, and loaded into a fresh model.

Tolerances: float32 sums of 8-16 terms of size ~1 agree to ~1e-6; merging reorders them, so 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lorakit
from lorakit.errors import AdapterError
from lorakit.handlers import TransposedHandler, handler_for, register_handler
from lorakit.layers import LoraAdapter, LoraLayer, Variant, delta_weight, register_variant


class RowMajorLinear(nn.Module):
    """y = x·W + b with W stored (in, out), as some custom kernels keep it; not a subclass of nn.Linear."""

    def __init__(self, k: int, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, d) / k**0.5)
        self.b = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w + self.b


class RowMajorHandler(TransposedHandler):
    linear = True

    def weight(self, base: nn.Module) -> torch.Tensor:
        return base.w

    def base_nobias(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x @ base.w


@register_variant
class GatedVariant(Variant):
    """ΔW = g·s·B·A, g a trainable scalar per layer (0.5 at init)."""

    name = "test_gated"
    label = "gated LoRA"

    def tensor_names(self, handler):
        return {**super().tensor_names(handler), "gate": "lora_gate"}

    def tensor_shapes(self, handler, base, r):
        return {**super().tensor_shapes(handler, base, r), "gate": (1,)}

    def init(self, layer: LoraLayer, adapter: LoraAdapter) -> None:
        adapter.gate = nn.Parameter(torch.full((1,), 0.5, dtype=adapter.lora_A.dtype))

    def factors(self, adapter: LoraAdapter):
        return adapter.lora_A, adapter.lora_B * adapter.gate, adapter.scaling

    def forward(self, layer, adapter, x, base_out):
        A, B, s = self.factors(adapter)
        return layer.handler.lora(layer.base_layer, adapter.dropout(x), A, B, s)

    def metadata(self) -> dict[str, str]:
        return {"lorakit.test_gated": "{}"}


register_handler(RowMajorLinear, RowMajorHandler())


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = RowMajorLinear(8, 16)
        self.act = nn.Tanh()
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.inp(x)))


CONFIG = lorakit.LoraConfig(r=2, alpha=4, targets=["inp", "out"])
X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def _trained() -> Net:
    model = Net()
    base_out = model(X).detach()
    lorakit.inject(model, CONFIG, variant="test_gated")
    assert torch.equal(model(X), base_out)  # B = 0 at init: the base model's output
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"{m}.adapters.default.{t}" for m in ("inp", "out") for t in ("lora_A", "lora_B", "gate")
    }
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = (model(X) - torch.ones(5, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    assert not torch.allclose(model(X), base_out)  # the step moved B
    return model


def test_a_registered_handler_and_variant_inject_and_train():
    model = _trained()
    layer = model.inp
    assert isinstance(layer, LoraLayer) and isinstance(layer.handler, RowMajorHandler)
    assert handler_for(layer) is layer.handler
    adapter = layer.adapters["default"]
    assert isinstance(adapter.variant, GatedVariant)
    # the output, computed by hand from the tensors: x·W + b + g·s·(x·Aᵀ)·Bᵀ, then the plain nn.Linear's LoRA
    A, B, g, s = adapter.lora_A, adapter.lora_B, adapter.gate, adapter.scaling
    h = torch.tanh(X @ layer.base_layer.w + layer.base_layer.b + g * s * (X @ A.T @ B.T))
    o = model.out.adapters["default"]
    expected = model.out.base_layer(h) + o.gate * o.scaling * (h @ o.lora_A.T @ o.lora_B.T)
    torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=0)


def test_merge_unmerge_in_the_base_layout():
    model = _trained()
    w0 = model.inp.base_layer.w.detach().clone()
    before = model(X).detach()
    lorakit.merge(model)
    dw = delta_weight(model.inp, model.inp.adapters["default"])
    assert dw.shape == w0.shape == (8, 16)  # ΔW in the base's (in, out) layout, from the handler
    torch.testing.assert_close(model.inp.base_layer.w, w0 + dw, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(X), before, atol=1e-5, rtol=0)
    lorakit.unmerge(model)
    torch.testing.assert_close(model.inp.base_layer.w, w0, atol=1e-6, rtol=0)


def test_save_and_load_keep_the_variant_and_its_tensor(tmp_path):
    model = _trained()
    lorakit.save_adapter(model, tmp_path / "gated")
    with safe_open(str(tmp_path / "gated" / "adapter_model.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "base_model.model.inp.lora_gate" in keys and "base_model.model.out.lora_gate" in keys
    assert meta["lorakit.test_gated"] == "{}"
    fresh = Net()
    assert lorakit.load_adapter(fresh, tmp_path / "gated") == "default"
    loaded = fresh.inp.adapters["default"]
    assert isinstance(loaded.variant, GatedVariant)
    assert torch.equal(loaded.gate, model.inp.adapters["default"].gate)
    torch.testing.assert_close(fresh(X), model(X), atol=1e-6, rtol=0)


def test_a_file_missing_the_variants_tensor_is_refused_and_the_model_unchanged(tmp_path):
    model = _trained()
    lorakit.save_adapter(model, tmp_path / "gated")
    from safetensors.torch import load_file, save_file

    file = tmp_path / "gated" / "adapter_model.safetensors"
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    del tensors["base_model.model.out.lora_gate"]
    save_file(tensors, str(file), metadata=meta)
    fresh = Net()
    with pytest.raises(AdapterError, match=r"missing tensor base_model\.model\.out\.lora_gate"):
        lorakit.load_adapter(fresh, tmp_path / "gated")
    assert not lorakit.adapter_names(fresh) and isinstance(fresh.inp, RowMajorLinear)


def test_an_unknown_variant_name_leaves_the_model_as_it_was():
    model = Net()
    with pytest.raises(AdapterError, match="unknown LoRA variant 'nope'; registered: .*test_gated"):
        lorakit.inject(model, CONFIG, variant="nope")
    assert not lorakit.adapter_names(model) and isinstance(model.inp, RowMajorLinear)


@pytest.mark.parametrize("bad_layer", ["inp", "out"])
def test_a_non_finite_merge_is_refused_and_no_weight_changes(bad_layer):
    """After PEFT's safe_merge: merged into a copy, checked, only then assigned; here every layer is checked
    before any is assigned, so a bad second layer leaves the first one unmerged too."""
    model = _trained()
    with torch.no_grad():
        adapter = getattr(model, bad_layer).adapters["default"]
        adapter.lora_A.fill_(1e20)
        adapter.lora_B.fill_(1e20)  # finite factors whose product ΔW overflows float32
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    before = model(X).detach()
    with pytest.raises(AdapterError, match=rf"^{bad_layer}: merging adapter 'default' into .* non-finite"):
        lorakit.merge(model)
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n]), n
    assert all(not layer.merged for _, layer in lorakit.lora_layers(model))
    torch.testing.assert_close(model(X), before, atol=0, rtol=0, equal_nan=True)
