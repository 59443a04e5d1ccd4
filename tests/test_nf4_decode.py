"""Decoding on a 4-bit base (lorakit.quant.native.gemv_plan): a few rows under no_grad multiply straight from the NF4
codes, and the weight is never written out.

Two routes. The fp32 route is exact up to the order of its sums. The int8 route (the default where the CPU has
AVX512-VNNI) rounds each input block of 64 to int8 against its absmax and each level to 1/127, and sums integer
products. It is checked here against an emulation of that arithmetic in torch (integers exact, scales in
float64), and its quality against the unquantized weight. On a CPU without VNNI the int8 setting must change
nothing, and the tests check that instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.quant import native
from lorakit.quant.nf4 import NF4_CODE, NF4Linear


@contextmanager
def route(int8: bool, kernels: bool = True):
    """Decode through the int8 or the fp32 route (kernels=False: the torch ops), then put the settings back."""
    old_int8, old_kernels = native.set_gemv_int8(int8), native.set_enabled(kernels)
    try:
        yield
    finally:
        native.set_gemv_int8(old_int8)
        native.set_enabled(old_kernels)


def _layer(out_f: int, in_f: int, double_quant: bool = True, seed: int = 0) -> tuple[NF4Linear, nn.Linear]:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    return NF4Linear.from_linear(lin, double_quant=double_quant), lin


def _inputs(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[:, 5] *= 30  # an outlier channel, as decoder activations have
    x[:, -64:] += 2  # a block whose sum is far from zero: the kernel's +127 offset must come off exactly
    if cols >= 192:
        x[:, 64:128] = 0  # an all-zero input block (absmax 0)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_the_fp32_route_multiplies_from_the_codes_like_linear(rows, dtype):
    """More than 8 rows dequantize into the scratch buffer instead. Reference: the fp32 product with the fp32
    weight. Tolerance: fp32 sums in another order than the matmul (1e-5 on outputs of ~0.5); bf16 rounds the
    product and then the bias sum, each by at most half a bf16 step, and a step is at most 2^-7 of the value:
    2^-7 relative (plus 4e-3 for outputs near zero, where the product's rounding is relative to the larger of
    the two addends)."""
    torch.manual_seed(0)
    lin = nn.Linear(512, 384)
    layer = NF4Linear.from_linear(lin)
    x = torch.randn(rows, 512).to(dtype)
    with torch.no_grad():
        with route(int8=False):
            got = layer(x)
        with route(int8=False, kernels=False):
            want = F.linear(x.float(), layer.dequantize(torch.float32), lin.bias)
    assert got.dtype == dtype and got.shape == (rows, 384)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(got.float(), want, atol=4e-3, rtol=2**-7)
    if rows > native.GEMV_MAX_ROWS:  # not a decoding shape: the int8 setting must not touch it
        with torch.no_grad(), route(int8=True):
            assert torch.equal(layer(x), got)


def _emulate_int8(layer: NF4Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 route's result (float64), and the sum of its terms' magnitudes (for the rounding tolerance)."""
    rows, cols = layer.out_features, layer.in_features
    codes = layer.qweight.reshape(rows, cols // 2).long()
    idx = torch.stack([codes >> 4, codes & 15], -1).reshape(rows, cols // 64, 64)  # high nibble first
    levels = torch.round(127 * torch.tensor(NF4_CODE, dtype=torch.float64)).long()  # level * 127, rounded
    w = levels[idx]
    blocks = x.float().reshape(x.shape[0], cols // 64, 64)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))  # fp32, as the kernel
    q = torch.round(blocks * inv).clamp(-127, 127).long()  # round half to even, as vcvtps2dq
    dots = torch.einsum("rbk,tbk->trb", w, q)  # exact integers
    offset = 127 * q.sum(-1)  # the kernel's levels are level * 127 + 127: this part comes off again
    scale = (
        layer.absmax_fp32().double().reshape(rows, -1)[None] * (amax.squeeze(-1).double() / 127**2)[:, None]
    )
    exact = (dots * scale).sum(-1)
    size = ((dots.abs() + 2 * offset.abs()[:, None]) * scale.abs()).sum(-1)
    return exact, size


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(384, 512), (96, 576), (40, 64)])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_the_int8_route_computes_what_it_says(rows, shape, double_quant):
    """Tolerance: the kernel's scales, their products with the integer sums and the sums over blocks are fp32;
    each term is rounded a few times by at most 2^-24 of itself, over at most 9 blocks a lane and 16 lanes: 2e-6
    of the sum of the terms' magnitudes. A wrong level, lane or block scale is off by far more: a level's step
    is 1/127 of its block. 576 columns are an odd number of blocks (the kernel's masked tail)."""
    layer, _ = _layer(*shape, double_quant=double_quant)
    x = _inputs(rows, shape[1])
    with torch.no_grad(), route(int8=True):
        got = layer(x).double()
    if not native.int8_route():  # no int8 route on this CPU: the setting must leave the fp32 route's numbers
        with torch.no_grad(), route(int8=False):
            assert torch.equal(got, layer(x).double())
        return
    want, size = _emulate_int8(layer, x)
    assert ((got - want).abs() <= 2e-6 * size + 1e-30).all(), float(((got - want).abs() / size).max())


def test_the_int8_route_adds_about_one_percent_to_nf4s_own_error():
    """Quality: against the unquantized weight, NF4's own error in a layer's output is about 9 % (norm-wise);
    the int8 route's roundings add about 1 % to it (in quadrature they are an order smaller). The bound of 1.05x
    leaves room for the sample, and a wrong level or scale breaks it at once."""
    layer, lin = _layer(1024, 2048)
    x = _inputs(4, 2048)
    with torch.no_grad():
        true = F.linear(x.double(), lin.weight.double())
        with route(int8=True):
            int8 = layer(x).double()
        with route(int8=False):
            fp32 = layer(x).double()
    err8, err32 = (int8 - true).norm() / true.norm(), (fp32 - true).norm() / true.norm()
    assert 0.05 < err32 < 0.15  # NF4's own error: what the comparison is against
    assert err8 <= 1.05 * err32, (float(err8), float(err32))


def test_each_row_of_a_batch_decodes_as_it_would_alone():
    """The serving engine decodes many requests in one batch: a row's result must not depend on the others
    (each row's input blocks are scaled on their own), bit for bit."""
    layer, _ = _layer(256, 512)
    x = _inputs(8, 512)
    x[3] *= 1000  # a row of another magnitude must not change its neighbours' scales
    with torch.no_grad(), route(int8=True):
        batch = layer(x)
        for i in range(8):
            assert torch.equal(batch[i], layer(x[i : i + 1])[0]), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nan_or_an_infinity_comes_out_where_a_matmul_puts_it(bad, dtype):
    """int8 cannot carry a NaN or an infinity, so a call whose input holds one takes the fp32 route, and the
    output has NaN and infinities where the float64 matmul with the dequantized weight has them (an infinity
    times a zero weight is NaN there too). The other rows still come out finite."""
    layer, _ = _layer(64, 256)
    x = _inputs(2, 256)
    x[0, 10] = bad
    x = x.to(dtype)
    with torch.no_grad():
        with route(int8=True):
            got = layer(x)
        with route(int8=False):
            exact = layer(x)
    want = x.double() @ layer.dequantize(torch.float64).T
    torch.testing.assert_close(got, exact, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert got[0].isnan().any() or got[0].isinf().all()
    assert got[1].isfinite().all()


def test_lorakit_gemv_fp32_turns_the_int8_route_off(tmp_path):
    """`LORAKIT_GEMV=fp32` in the environment of a fresh process: the fp32 route's numbers, bit for bit."""
    out = tmp_path / "y.pt"
    code = (
        "import torch\n"
        "from lorakit.quant.nf4 import NF4Linear\n"
        "torch.manual_seed(0)\n"
        "layer = NF4Linear.from_linear(torch.nn.Linear(512, 256))\n"
        "x = torch.randn(2, 512)\n"
        f"torch.save(layer(x).detach(), {str(out)!r})\n"
    )
    env = {**os.environ, "LORAKIT_GEMV": "fp32"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(512, 256))
    x = torch.randn(2, 512)
    with torch.no_grad():
        with route(int8=False):
            assert torch.equal(torch.load(out), layer(x))
        if native.int8_route():
            with route(int8=True):  # the default here, and another result
                assert not torch.equal(torch.load(out), layer(x))


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean KL(p || q) over positions, from log-probabilities."""
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.real_model
def test_on_the_real_model_the_int8_routes_error_is_small_beside_nf4s_own(default_model_dir):
    """The default model (SmolLM2-135M-Instruct), unquantized and loaded straight into NF4. Real chat prompts and
    the NF4 model's own greedy replies are fed one token at a time (each step a one-row product, the decoding
    path) through the unquantized model and through both routes. Measured (docs/scale.md): NF4 itself moves the
    next-token distribution by a KL of 0.74-0.84 nats a position from the unquantized model's; the int8 route
    moves it by 0.020-0.022 from the exact route's, and its KL from the unquantized model is 1.003-1.006x the
    exact route's. Bounds: a tenth of NF4's own KL, and 1.02x; and it agrees with the unquantized model's choice
    of next token as often as the exact route does (within 5 points). A wrong level or scale breaks all three."""
    import lorakit

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from bench_gemv_quality import teacher_forced  # the benchmark's measure: both see one thing
    finally:
        sys.path.pop(0)
    model, tok, _ = lorakit.load_quantized(default_model_dir)
    full, _ = lorakit.load_model(default_model_dir)
    model.eval(), full.eval()
    runs = {"full": [], "exact": [], "int8": []}
    for question in (
        "What is the capital of France, and why is it famous?",
        "How do I sort a list in Python?",
    ):
        messages = [{"role": "user", "content": question}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        prompt = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
        with torch.no_grad(), route(int8=False):
            reply = model.generate(prompt, max_new_tokens=40, do_sample=False)
            runs["exact"].append(teacher_forced(model, reply))
            runs["full"].append(teacher_forced(full, reply))
        with torch.no_grad(), route(int8=True):
            runs["int8"].append(teacher_forced(model, reply))
    full_lp, exact, int8 = (torch.cat(runs[k]) for k in ("full", "exact", "int8"))
    if not native.int8_route():  # no int8 route here: the setting must change nothing
        assert torch.equal(exact, int8)
        return
    nf4_own, ours = _kl(full_lp, exact), _kl(exact, int8)
    assert ours <= 0.1 * nf4_own, (ours, nf4_own)
    assert _kl(full_lp, int8) <= 1.02 * nf4_own, (_kl(full_lp, int8), nf4_own)
    picks = full_lp.argmax(-1)
    agree_exact = float((exact.argmax(-1) == picks).double().mean())
    agree_int8 = float((int8.argmax(-1) == picks).double().mean())
    assert agree_int8 >= agree_exact - 0.05, (agree_int8, agree_exact)
