"""Hot-swapping adapters on SmolLM2-135M (float32, r=16 on every linear layer): lorakit.hotswap against PEFT's
hotswap_adapter, and what each does to a torch.compile'd model.

1. Seconds per swap, the two files alternating (rank 16 alpha 32, and rank 8 alpha 64), interleaved rounds, with
   `lorakit.load_adapter` of a new adapter plus `delete_adapter` of the old one as the reload it replaces. Each
   swap's logits are checked against the file loaded afresh (atol 1e-3 on logits ~20).
2. Compilations: the model compiled with a backend that counts the graphs dynamo hands it, then swapped to the
   other file and run again: lorakit, PEFT as is, and PEFT after its prepare_model_for_compiled_hotswap.
3. With `--inductor`: the same with torch.compile's default backend, timing the first forward after the compile
   and the first after the swap (a recompilation shows as seconds).

    .venv/bin/python benchmarks/bench_hotswap.py --rounds 7 [--inductor]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

import lorakit

X = torch.tensor([[1, 504, 3458, 314, 260, 1345, 282, 4236, 30, 2114, 6772, 28]])


def base():
    model, _ = lorakit.load_model(dtype=torch.float32)
    return model.eval()


def make_adapter(folder: Path, seed: int, r: int, alpha: float) -> torch.Tensor:
    model = base()
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=alpha, targets="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lorakit.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        lorakit.save_adapter(model, folder)
        return model(X).logits


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


class Graphs:
    def __init__(self):
        self.n = 0

    def __call__(self, gm, inputs):
        self.n += 1
        return gm.forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--inductor", action="store_true", help="also time inductor's compilations (minutes)")
    args = p.parse_args()
    print(
        f"cpu: {platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
        f"threads {torch.get_num_threads()}; torch {torch.__version__}, peft {peft.__version__}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_hotswap-"))
    files = [tmp / "a", tmp / "b"]
    wants = [make_adapter(files[0], 1, 16, 32), make_adapter(files[1], 2, 8, 64)]

    ours = base()
    lorakit.load_adapter(ours, files[0])
    theirs = peft.PeftModel.from_pretrained(base(), files[0]).eval()
    reload = base()
    lorakit.load_adapter(reload, files[0], "a0")

    def swap_ours(i):
        lorakit.hotswap(ours, files[i % 2])
        return ours

    def swap_peft(i):
        hotswap_adapter(theirs, str(files[i % 2]), adapter_name="default", torch_device="cpu")
        return theirs

    def swap_reload(i):
        lorakit.load_adapter(reload, files[i % 2], f"a{i}")
        lorakit.delete_adapter(reload, f"a{i - 1}")
        return reload

    cases = {
        "lorakit.hotswap": swap_ours,
        "PEFT hotswap_adapter": swap_peft,
        "lorakit load + delete": swap_reload,
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for i in range(1, 2 * args.rounds + 1):  # i odd: file b, even: file a; the first pair warms up
        for label, fn in cases.items():
            t = time.perf_counter()
            model = fn(i)
            dt = time.perf_counter() - t
            torch.testing.assert_close(logits(model), wants[i % 2], rtol=0, atol=1e-3, msg=label)
            if i > 2:
                times[label].append(dt)
    print(f"\n## seconds per swap (median of {len(times['lorakit.hotswap'])}, interleaved)\n")
    print("| swap | median s | min s | max s |\n|---|---:|---:|---:|")
    for label, ts in times.items():
        print(f"| {label} | {statistics.median(ts):.3f} | {min(ts):.3f} | {max(ts):.3f} |")
    ratio = statistics.median(times["PEFT hotswap_adapter"]) / statistics.median(times["lorakit.hotswap"])
    print(f"\nPEFT / lorakit: {ratio:.2f}x")

    print("\n## compilations of a torch.compile'd model, before and after one swap (to r=8, alpha 64)\n")
    print("| model | graphs before | after the swap | logits as loaded afresh |\n|---|---:|---:|---|")
    for label in ("lorakit.hotswap", "PEFT hotswap_adapter", "PEFT after prepare_model_for_compiled_hotswap"):
        graphs = Graphs()
        if label.startswith("lorakit"):
            model = base()
            lorakit.load_adapter(model, files[0])
        else:
            model = peft.PeftModel.from_pretrained(base(), files[0]).eval()
            if "prepare" in label:
                prepare_model_for_compiled_hotswap(model, target_rank=16)
        compiled = torch.compile(model, backend=graphs)
        torch.testing.assert_close(logits(compiled), wants[0], rtol=0, atol=1e-3)
        before = graphs.n
        if label.startswith("lorakit"):
            lorakit.hotswap(compiled, files[1])
        else:
            hotswap_adapter(compiled, str(files[1]), adapter_name="default", torch_device="cpu")
        same = bool(torch.allclose(logits(compiled), wants[1], rtol=0, atol=1e-3))
        print(f"| {label} | {before} | {graphs.n} | {'yes' if same else 'NO'} |", flush=True)
        torch._dynamo.reset()
    if args.inductor:
        inductor(files, wants)


def inductor(files, wants) -> None:
    print("\n## torch.compile (inductor): seconds of the first forward after compiling, and after one swap\n")
    print("| model | first forward s | first after the swap s | then s |\n|---|---:|---:|---:|")
    for label in ("lorakit.hotswap", "PEFT hotswap_adapter"):
        if label.startswith("lorakit"):
            model = base()
            lorakit.load_adapter(model, files[0])
        else:
            model = peft.PeftModel.from_pretrained(base(), files[0]).eval()
        compiled = torch.compile(model)
        spans = []
        for step in range(3):
            if step == 1:
                if label.startswith("lorakit"):
                    lorakit.hotswap(compiled, files[1])
                else:
                    hotswap_adapter(compiled, str(files[1]), adapter_name="default", torch_device="cpu")
            t = time.perf_counter()
            out = logits(compiled)
            spans.append(time.perf_counter() - t)
        torch.testing.assert_close(out, wants[1], rtol=0, atol=1e-3, msg=label)
        print(f"| {label} | {spans[0]:.1f} | {spans[1]:.2f} | {spans[2]:.3f} |", flush=True)
        torch._dynamo.reset()


if __name__ == "__main__":
    sys.exit(main())
