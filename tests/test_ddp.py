"""torchrun with 2 CPU processes (gloo) ends with the same adapter as 1 process with the same global batch.

Tolerance: DDP averages the two ranks' gradients with an all-reduce, one process sums two accumulated halves;
the same numbers added in another order differ by float32 rounding (~1e-8 relative), amplified a little by
4 AdamW steps. atol=1e-6 on weights of magnitude ~0.1-1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = str(Path(__file__).parent / "ddp_worker.py")


def test_two_processes_equal_one_process(tmp_path):
    one = subprocess.run([sys.executable, WORKER, str(tmp_path / "one"), "2"], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29531",
            WORKER,
            str(tmp_path / "two"),
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    start = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    assert any(v.abs().max() > 0 for k, v in start.items() if "lora_B" in k)  # training moved B off zero
