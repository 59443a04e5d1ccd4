"""The native NF4 kernels (lorakit.quant.native): they build where a C compiler is, they give the same numbers as
the torch ops bit for bit (with and without double quantization, AVX-512 and portable builds), and without a
compiler lorakit warns and keeps the torch ops.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from lorakit.quant import nf4
from lorakit.quant.nf4 import NF4Linear

from tiny import linear_of, nf4_weights


@pytest.fixture
def torch_ops():
    """Run a block with the native kernels off (the torch ops), then put them back."""
    from lorakit.quant import native

    class Off:
        def __enter__(self):
            self.old = native.set_enabled(False)

        def __exit__(self, *exc):
            native.set_enabled(self.old)

    return Off()


def test_the_native_kernels_build_where_a_compiler_is(tmp_path):
    import shutil

    from lorakit.quant import native

    if shutil.which("cc") or shutil.which("gcc"):  # every machine of this project has one; CI proves it
        assert native.library() is not None
    assert native.set_enabled(False) is True and native.library() is None
    native.set_enabled(True)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 130), (256, 512), (7, 64)])
def test_native_kernels_equal_the_torch_ops_bit_for_bit(shape, double_quant, torch_ops):
    w = nf4_weights(shape, torch.float32)
    w.view(-1)[:64] = 0  # an all-zero block
    flat = w.view(-1)[64:128]
    flat[:15] = (
        nf4._table("bounds", "cpu") * flat.abs().max()
    )  # values on midpoints: ties go to the lower level
    layer, got = _forms(w, double_quant)
    got["scratch_fp32"] = nf4.scratch_weight(layer, torch.float32).clone()  # the training path: 8-bit block
    got["scratch_bf16"] = nf4.scratch_weight(
        layer, torch.bfloat16
    ).clone()  # constants decoded in the kernel
    with torch_ops:
        want_layer, want = _forms(w, double_quant)
    want["scratch_fp32"], want["scratch_bf16"] = want["fp32"], want["bf16"]
    assert torch.equal(layer.qweight, want_layer.qweight)
    for key in got:
        a, b = got[key], want[key]
        assert (
            all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) if key == "codes" else torch.equal(a, b)
        ), key


def _forms(w: torch.Tensor, double_quant: bool) -> tuple[NF4Linear, dict]:
    """An NF4 layer of `w` and what it computes: codes, block constants, and the weight in fp32 and bf16."""
    layer = NF4Linear.from_linear(linear_of(w), double_quant=double_quant)
    return layer, {
        "codes": nf4.quantize_4bit(w),
        "absmax": layer.absmax_fp32(),
        "fp32": layer.dequantize(torch.float32),
        "bf16": layer.dequantize(torch.bfloat16),
    }


def test_without_a_compiler_a_warning_and_the_torch_ops(tmp_path):
    """A machine where the kernels do not build (here: a compiler that always fails) still quantizes and runs,
    says so in one line, and gets the same numbers."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, lorakit\n"
        "from lorakit.quant.nf4 import NF4Linear\n"
        "from lorakit.quant import native\n"
        "torch.manual_seed(0)\n"
        "layer = NF4Linear.from_linear(torch.nn.Linear(128, 64))\n"
        "y = layer(torch.ones(2, 128))\n"
        "assert native.library() is None\n"
        "print(float(y.sum()))\n"
    )
    env = {**os.environ, "CC": "false", "LORAKIT_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NF4 native kernels unavailable, using torch ops: false failed" in done.stderr
    ours = subprocess.run(
        [sys.executable, "-c", code.replace("is None", "is not None")],
        env={**os.environ, "LORAKIT_CACHE": str(tmp_path / "ok"), "LORAKIT_GEMV": "fp32"},  # the exact route
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert float(ours.stdout) == pytest.approx(float(done.stdout), abs=1e-4)


def _cpu_has(flag: str) -> bool:
    try:
        return f" {flag} " in next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")) + " "
    except (OSError, StopIteration):
        return False


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mno-avx512f is an x86 flag")
@pytest.mark.parametrize(
    ("flags", "width"),
    [("-mno-avx512f", 256), ("-mno-avx512f -mno-avx2", 0)],
    ids=["avx2", "portable"],
)
def test_the_kernels_without_avx512_equal_the_torch_ops_too(tmp_path, flags, width):
    """The kernels have three builds: AVX-512 (this machine's, where it has it), AVX2 with its own int8 route
    (the AVX2 machines of this project), and portable C loops. Build the other two here, with those instruction
    sets turned off, and run the bit-for-bit and decoding tests on them (on the portable build, where there is
    no int8 route, the int8 setting must change nothing)."""
    import os
    import subprocess
    import sys

    if width == 256 and not (_cpu_has("avx2") and _cpu_has("fma")):
        width = 0  # a CPU without AVX2 builds the portable loops either way
    cc = tmp_path / "cc-narrow"
    cc.write_text(f'#!/bin/sh\nexec gcc "$@" {flags}\n')
    cc.chmod(0o755)
    env = {**os.environ, "CC": str(cc), "LORAKIT_CACHE": str(tmp_path / "cache")}
    check = (
        "from lorakit.quant import native; assert native.library() is not None; "
        "print(native.simd(), native.int8_route(), native.vnni())"
    )
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(width), str(width == 256), "False"], done.stdout
    tests = f"{__file__}::test_native_kernels_equal_the_torch_ops_bit_for_bit"
    decoding = str(Path(__file__).with_name("test_nf4_decode.py"))  # all of it, int8 route or none
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests, decoding]
    cmd += ["-m", "not real_model", "-k", "not lorakit_gemv_fp32"]  # those two run a model or a fresh process
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:]
