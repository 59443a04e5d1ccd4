"""Mixed-adapter batches and the adapter bank.

Tolerance: a mixed batch computes each row's low-rank product with batched matmuls over zero-padded ranks and adds
it to the base output; the single-adapter path adds the same products in another order (fused addmm). float32
rounding through 2 layers: atol 1e-5 on logits of magnitude ~1.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
import lorakit.mixed
from lorakit import AdapterError, LoraConfig
from lorakit.bank import AdapterBank
from lorakit.mixed import row_adapters

from tiny import ids, randomize, tiny_gpt2, tiny_llama

ATOL = 1e-5


def _three_adapters(model, *, extra=None):
    lorakit.inject(model, LoraConfig(r=2, alpha=4, targets="all-linear"), name="a")
    lorakit.inject(
        model, LoraConfig(r=4, alpha=16, targets=["q_proj", "v_proj", "c_attn"], use_rslora=True), name="b"
    )
    lorakit.inject(
        model, extra or LoraConfig(r=8, alpha=8, targets="all-linear", rank_pattern={"k_proj": 3}), name="c"
    )
    randomize(model, std=0.2)


def _per_row(model, x, names, **kw):
    rows = []
    for i, name in enumerate(names):
        if name is None:
            with lorakit.disabled(model):
                rows.append(model(x[i : i + 1], **kw).logits)
        else:
            lorakit.set_active(model, name)
            rows.append(model(x[i : i + 1], **kw).logits)
    return torch.cat(rows)


@pytest.mark.parametrize(
    "names",
    [
        ["a", "b", None, "c", "a"],
        ["c", "c"],
        [None, "b"],
        ["a", "b", "c", "a", "b"],
        ["c", "c", "a", "c", "b", "c"],  # skewed: the short segments are padded to c's four rows
        ["a", "b", "c"],  # one row per adapter in the model's order: no gather or scatter
    ],
)
@torch.no_grad()
def test_mixed_batch_equals_each_row_alone(names):
    model = tiny_llama()
    _three_adapters(model)
    x = ids(batch=len(names), seq=9)
    want = _per_row(model, x, names)
    with row_adapters(model, names):
        got = model(x).logits
        again = model(x).logits  # second pass: the cached stacks
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(again, got, atol=0, rtol=0)


@torch.no_grad()
def test_cached_stacks_follow_weight_changes():
    """The per-layer stacks are reused across batches of the same rows, but an in-place change of an adapter's
    weights (as training or copy_ makes) rebuilds them."""
    model = tiny_llama()
    _three_adapters(model)
    names, x = ["a", "b", "c"], ids(batch=3, seq=5)
    with row_adapters(model, names):
        model(x)
    randomize(model, std=0.5, seed=9)  # in place
    want = _per_row(model, x, names)
    with row_adapters(model, names):
        torch.testing.assert_close(model(x).logits, want, atol=ATOL, rtol=0)
    lorakit.mixed.clear_row_cache(model)
    assert all(layer.row_cache is None for _, layer in lorakit.lora_layers(model))


@torch.no_grad()
def test_stacks_hold_each_adapter_once_and_serve_later_batches():
    """A layer stacks the batch's distinct adapters once (not one copy per row), and a later batch over the same
    adapters in another row order (as the serving engine's decode steps are) reuses those stacks."""
    model = tiny_llama()
    _three_adapters(model)
    x = ids(batch=6, seq=4)
    layer = model.model.layers[0].self_attn.q_proj
    first, second = ["b", "a", "b", "a", "b", "a"], ["a", None, "a", "a", "b", "b"]
    want_first, want_second = _per_row(model, x, first), _per_row(model, x, second)
    with row_adapters(model, first):
        torch.testing.assert_close(model(x).logits, want_first, atol=ATOL, rtol=0)
    stacks = layer.row_cache.a
    assert stacks.shape[0] == 2  # two adapters, six rows
    with row_adapters(model, second):
        torch.testing.assert_close(model(x).logits, want_second, atol=ATOL, rtol=0)
    assert layer.row_cache.a is stacks
    with row_adapters(model, ["c", "a", "c", None, "a", "b"]):  # another set of adapters: new stacks
        model(x)
    assert layer.row_cache.a is not stacks and layer.row_cache.a.shape[0] == 3


def test_mixed_batch_with_grad_on_and_frozen_adapters():
    """Grad mode on (e.g. gradients w.r.t. the input) but adapters frozen: the stacked path, without in-place
    adds, gives the per-row answer and a gradient."""
    model = tiny_llama()
    _three_adapters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    names = ["a", None, "c", "b", "a"]
    x = ids(batch=5, seq=4)
    with torch.no_grad():
        want = _per_row(model, x, names)
    emb = model.get_input_embeddings()(x).requires_grad_(True)
    with row_adapters(model, names):
        got = model(inputs_embeds=emb).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    got.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


@torch.no_grad()
def test_mixed_batch_with_fallback_layers():
    """DoRA and embedding adapters have no stacked form: the per-adapter fallback gives the same answer."""
    model = tiny_llama()
    _three_adapters(
        model, extra=LoraConfig(r=4, targets=["embed_tokens", "q_proj", "down_proj"], use_dora=True)
    )
    names = ["c", "a", None, "c", "b"]
    x = ids(batch=5, seq=7)
    want = _per_row(model, x, names)
    with row_adapters(model, names):
        torch.testing.assert_close(model(x).logits, want, atol=ATOL, rtol=0)


@torch.no_grad()
def test_mixed_batch_gpt2_conv1d():
    model = tiny_gpt2()
    lorakit.inject(model, LoraConfig(r=4, targets=["c_attn", "c_fc"]), name="a")
    lorakit.inject(model, LoraConfig(r=8, alpha=4, targets=["c_attn", "c_proj"]), name="b")
    randomize(model, std=0.2)
    names = ["b", "a", "b", None]
    x = ids(batch=4, seq=6)
    want = _per_row(model, x, names)
    with row_adapters(model, names):
        torch.testing.assert_close(model(x).logits, want, atol=ATOL, rtol=0)


@torch.no_grad()
def test_mixed_generation_equals_per_row_generation():
    """Greedy decoding with a KV cache and left padding: prefill and every decode step go through the plan."""
    model = tiny_llama()
    _three_adapters(model)
    names = ["a", None, "c", "b"]
    x = ids(batch=4, seq=6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding on row 1
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with row_adapters(model, names):
        got = model.generate(input_ids=x, attention_mask=mask, **kw)
    for i, name in enumerate(names):
        if name is None:
            with lorakit.disabled(model):
                want = model.generate(input_ids=x[i : i + 1], attention_mask=mask[i : i + 1], **kw)
        else:
            lorakit.set_active(model, name)
            want = model.generate(input_ids=x[i : i + 1], attention_mask=mask[i : i + 1], **kw)
        assert torch.equal(got[i], want[0]), (i, name)


def test_mixed_batch_trains_each_rows_adapter():
    """With gradients on, each adapter gets the gradient of its own rows only (the looped path carries it)."""
    model = tiny_llama()
    _three_adapters(model)
    lorakit.inject(model, LoraConfig(r=2, targets=["q_proj"]), name="t", trainable=True)
    names = ["t", None, "a"]
    x = ids(batch=3, seq=5)
    with row_adapters(model, names):
        model(x).logits.sum().backward()
    q = model.model.layers[0].self_attn.q_proj.adapters["t"]
    mixed_grad = q.lora_B.grad.clone()
    model.zero_grad(set_to_none=True)
    lorakit.set_active(model, "t")
    model(x[:1]).logits.sum().backward()
    torch.testing.assert_close(mixed_grad, q.lora_B.grad, atol=1e-5, rtol=1e-5)


def test_row_adapter_errors():
    model = tiny_llama()
    _three_adapters(model)
    with pytest.raises(AdapterError, match="no adapter 'zz'"), row_adapters(model, ["a", "zz"]):
        pass
    with (
        row_adapters(model, ["a", "b"]),
        pytest.raises(AdapterError, match="name 2 rows, but the batch has 3"),
    ):
        model(ids(batch=3))
    lorakit.set_active(model, "a")
    lorakit.merge(model)
    with pytest.raises(AdapterError, match="unmerge"), row_adapters(model, ["a", "b"]):
        pass


# --------------------------------------------------------------------------------------------------------------
# The bank
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def adapter_dirs(tmp_path):
    dirs = {}
    for i, name in enumerate("pqrs"):
        model = tiny_llama()
        lorakit.inject(model, LoraConfig(r=2 + i, targets=["q_proj", "v_proj"]))
        randomize(model, seed=i, std=0.3)
        dirs[name] = lorakit.save_adapter(model, tmp_path / name)
    return dirs


@torch.no_grad()
def test_bank_lru_pin_and_use(adapter_dirs):
    model = tiny_llama()
    x = ids(batch=3)
    base = model(x).logits
    bank = AdapterBank(model, max_adapters=2)
    bank.load("p", adapter_dirs["p"], pin=True)
    bank.load("q", adapter_dirs["q"])
    bank.load("r", adapter_dirs["r"])  # full: evicts q (p is pinned)
    assert bank.names() == ["p", "r"]
    with bank.use(["p", None, "r"]):
        mixed = model(x).logits
    torch.testing.assert_close(mixed[1], base[1], atol=ATOL, rtol=0)
    with bank.use(["r", "r", "r"]):
        only_r = model(x).logits
    torch.testing.assert_close(mixed[2], only_r[2], atol=ATOL, rtol=0)
    bank.activate("p")  # hot swap for plain calls
    torch.testing.assert_close(model(x).logits[0], mixed[0], atol=ATOL, rtol=0)
    bank.activate(None)
    torch.testing.assert_close(model(x).logits, base, atol=0, rtol=0)
    # r in use, p pinned: nothing can be evicted
    with bank.use(["r", None, None]), pytest.raises(AdapterError, match="pinned or in use"):
        bank.load("s", adapter_dirs["s"])
    assert bank.names() == ["p", "r"]


@torch.no_grad()
def test_bank_unload_while_in_use_waits(adapter_dirs):
    model = tiny_llama()
    bank = AdapterBank(model)
    bank.load("p", adapter_dirs["p"])
    bank.load("q", adapter_dirs["q"])
    x = ids(batch=2)
    with bank.use(["p", "q"]):
        before = model(x).logits
        bank.unload("p")  # a request is in flight: p stays until it ends
        assert "p" not in bank.names()
        torch.testing.assert_close(model(x).logits, before, atol=0, rtol=0)
    assert lorakit.adapter_names(model) == ["q"]
    with pytest.raises(AdapterError, match="no adapter 'p' in the bank"), bank.use(["p"]):
        pass


@torch.no_grad()
def test_bank_use_restores_routing_and_hold_only_leases(adapter_dirs):
    """`use` of one adapter leaves the adapter that was active before active again; `hold` keeps an adapter
    loaded through an unload without touching which adapter plain calls use."""
    model = tiny_llama()
    x = ids(batch=2)
    bank = AdapterBank(model)
    bank.load("p", adapter_dirs["p"])
    bank.load("q", adapter_dirs["q"])
    bank.activate("p")
    only_p = model(x).logits
    with bank.use(["q", "q"]):
        assert lorakit.active_adapters(model) == {"q": 1.0}
    assert lorakit.active_adapters(model) == {"p": 1.0}
    torch.testing.assert_close(model(x).logits, only_p, atol=0, rtol=0)
    with bank.hold(["q"]):
        assert lorakit.active_adapters(model) == {"p": 1.0}
        bank.unload("q")
        assert "q" not in bank.names() and "q" in lorakit.adapter_names(model)
    assert lorakit.adapter_names(model) == ["p"]
    with pytest.raises(AdapterError, match="no adapter 'q' in the bank"), bank.hold(["q"]):
        pass


def test_bank_full_bad_load_evicts_nothing(adapter_dirs, tmp_path):
    model = tiny_llama()
    bank = AdapterBank(model, max_adapters=1)
    bank.load("p", adapter_dirs["p"])
    wrong = tiny_gpt2()  # an adapter for another architecture: its modules are not in this model
    lorakit.inject(wrong, LoraConfig(r=2, targets=["c_attn"]))
    bad = lorakit.save_adapter(wrong, tmp_path / "gpt2")
    with pytest.raises(lorakit.LorakitError):
        bank.load("bad", bad)
    assert bank.names() == ["p"]


def test_bank_bad_load_changes_nothing(adapter_dirs, tmp_path):
    model = tiny_llama()
    bank = AdapterBank(model)
    bank.load("p", adapter_dirs["p"])
    with pytest.raises(AdapterError, match="already loaded"):
        bank.load("p", adapter_dirs["q"])
    (tmp_path / "bad").mkdir()
    with pytest.raises(lorakit.LorakitError):
        bank.load("bad", tmp_path / "bad")
    assert bank.names() == ["p"] and lorakit.adapter_names(model) == ["p"]


@pytest.mark.real_model
@torch.no_grad()
def test_real_model_mixed_batch(default_model_dir):
    torch.manual_seed(0)  # the adapters' init draws from the global generator: the same values in any test order
    model, tok = lorakit.load_model(str(default_model_dir))
    lorakit.inject(model, LoraConfig(r=8, targets="all-linear"), name="x")
    lorakit.inject(model, LoraConfig(r=16, alpha=32, targets=["q_proj", "v_proj"]), name="y")
    randomize(model, std=0.01)  # 0.02 can drive the model chaotic, where fp32 rounding grows (see test_real_model)
    enc = tok(["Hello there", "The capital of France is", "1, 2, 3,"], return_tensors="pt", padding=True)
    names = ["x", "y", None]
    want = _per_row_masked(model, enc, names)
    with row_adapters(model, names):
        got = model(**enc).logits
    # A batch of 3 and a batch of 1 take different matmul blockings: the base model alone (adapters off) differs by
    # ~8e-5 between the two on logits of magnitude ~35, and 12 seeds of this test measured up to 1.7e-4. 5e-4 leaves
    # room for other CPUs; giving a row the other adapter moves its logits by ~2.8.
    torch.testing.assert_close(got, want, atol=5e-4, rtol=0)


def _per_row_masked(model, enc, names):
    rows = []
    for i, name in enumerate(names):
        one = {k: v[i : i + 1] for k, v in enc.items()}
        if name is None:
            with lorakit.disabled(model):
                rows.append(model(**one).logits)
        else:
            lorakit.set_active(model, name)
            rows.append(model(**one).logits)
    return torch.cat(rows)
