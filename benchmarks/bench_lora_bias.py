"""Benchmark: mixed-adapter batches of lora_bias adapters (PEFT's bias on B) on the default model, against PEFT.

A batch of `--batch` rows (default 32) where row i uses adapter i mod N (default N = 32; r=16 on all seven
projections, random non-zero A, B and b). Four ways of running it, interleaved and repeated `--repeats` times:

* ``lorakit``: ``AdapterBank.use(names)``: the stacked mixed-adapter forward, the biases in a stack of their own;
* ``lorakit-plain``: the same adapters without their biases (plain LoRA, the same stacked path): what the biases
  cost;
* ``lorakit-looped``: the lora_bias adapters through the per-adapter fallback (one masked pass per distinct
  adapter), which is how they ran before they could stack;
* ``peft``: PEFT's mixed batch, ``model(..., adapter_names=names)``, with the lora_bias adapters.

Prefill and decode are timed as in bench_mixed.py (one forward over batch × prompt tokens keeping the last
position's logits; one greedy decode step of all rows with the KV cache). Throughput is tokens per second, medians
over repeats; the ratios are each way's time over lorakit's, paired within each repeat (median [min–max]). Before
timing, lorakit's mixed-batch logits are checked against PEFT's and against each row alone.

    .venv/bin/python benchmarks/bench_lora_bias.py [--write-docs] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import lorakit
from lorakit.bank import AdapterBank
from lorakit.bench import cpu_name, display_command, version, write_docs
from lorakit.variants.lora_bias import LoraBiasVariant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mixed import TARGETS, _work  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
START, END = "<!-- bench_lora_bias:start -->", "<!-- bench_lora_bias:end -->"
WAYS = ("lorakit", "lorakit-plain", "lorakit-looped", "peft")


def make_adapters(model, n: int, r: int, out: Path) -> tuple[list[Path], list[Path]]:
    """n random lora_bias adapters, and the same A and B without their biases, as PEFT folders."""
    biased, plain = [], []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=r, targets=TARGETS, lora_bias=True), name="tmp")
        with torch.no_grad():
            for p in lorakit.adapter_parameters(model, "tmp"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        biased.append(lorakit.save_adapter(model, out / f"b{i}", name="tmp"))
        lorakit.delete_adapter(model, "tmp")
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=r, targets=TARGETS), name="tmp")
        lorakit.load_adapter(model, biased[-1], name="tmpb")
        with torch.no_grad():  # the same A and B
            for (_, layer) in lorakit.lora_layers(model):
                if "tmp" in layer.adapters:
                    layer.adapters["tmp"].lora_A.copy_(layer.adapters["tmpb"].lora_A)
                    layer.adapters["tmp"].lora_B.copy_(layer.adapters["tmpb"].lora_B)
        plain.append(lorakit.save_adapter(model, out / f"p{i}", name="tmp"))
        lorakit.delete_adapter(model, "tmp")
        lorakit.delete_adapter(model, "tmpb")
    return biased, plain


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=8, help="decode steps timed")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=32, help="distinct adapters in the batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 4, prompt 8, new 2, N 2, 1 repeat")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.prompt, args.new, args.adapters, args.repeats = 4, 8, 2, 2, 1
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    model, tok = lorakit.load_model(None, dtype=torch.float32)
    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench_lora_bias-"))
    biased, plain = make_adapters(model, args.adapters, args.r, tmp)
    bank = AdapterBank(model, max_adapters=2 * args.adapters)
    for i in range(args.adapters):
        bank.load(f"b{i}", biased[i])
        bank.load(f"p{i}", plain[i])
    import peft

    base2, _ = lorakit.load_model(None, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base2, str(biased[0]), adapter_name="b0")
    for i, d in enumerate(biased[1:], start=1):
        peft_model.load_adapter(str(d), adapter_name=f"b{i}")
    peft_model.eval()
    ids = torch.randint(
        100, model.config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1)
    )
    mask = torch.ones_like(ids)
    gen = dict(do_sample=False, pad_token_id=tok.pad_token_id or 0)
    names = [f"b{i % args.adapters}" for i in range(args.batch)]

    def run(way: str, kind: str) -> float:
        """Seconds, after one untimed forward (which builds the layers' stacks for this set of adapters)."""
        if way == "peft":
            peft_model(input_ids=ids[:, :2], adapter_names=names)
            return _work(peft_model, ids, mask, kind, args.new, gen, adapter_names=names)
        ns = [n.replace("b", "p") for n in names] if way == "lorakit-plain" else names
        LoraBiasVariant.stacks = way != "lorakit-looped"
        try:
            with bank.use(ns):
                model(input_ids=ids[:, :2])
                return _work(model, ids, mask, kind, args.new, gen)
        finally:
            LoraBiasVariant.stacks = True

    with torch.no_grad():
        check = _check(model, bank, peft_model, ids, names)
        print(check, file=sys.stderr, flush=True)
        res: dict[str, dict[str, list[float]]] = {}
        for rep in range(args.repeats):
            order = WAYS[rep % len(WAYS) :] + WAYS[: rep % len(WAYS)]
            for way in order:
                for kind in ("prefill", "decode"):
                    res.setdefault(way, {}).setdefault(kind, []).append(run(way, kind))
            print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    table = _table(res, args)
    print(table + "\n\n" + check)
    if args.write_docs:
        section = "\n".join(
            [
                "## Mixed batches of lora_bias adapters: lorakit vs PEFT `adapter_names`",
                "",
                f"- machine: {cpu_name()}, `get_cpu_capability()` = {torch.backends.cpu.get_cpu_capability()}, "
                f"torch {version('torch')}, transformers {version('transformers')}, peft {version('peft')}",
                f"- command: `{display_command()}`",
                f"- setup: default model (SmolLM2-135M-Instruct), float32 on the CPU, batch {args.batch}, prompt "
                f"{args.prompt} tokens, {args.new} decode steps, {args.adapters} adapters with lora_bias, r={args.r} "
                f"on 7 projections, row i uses adapter i mod {args.adapters}; tokens/s are medians of "
                f"{args.repeats} interleaved repeats; a ratio is that way's time over lorakit's in the same "
                "repeat: median [min–max]",
                f"- 1-minute load average before the run: {load_before:.2f}",
                f"- {check}",
                "",
                table,
            ]
        )
        write_docs(DOCS, section, START, END)
        print(f"updated {DOCS}")


@torch.no_grad()
def _check(model, bank, peft_model, ids, names) -> str:
    """lorakit's mixed-batch logits against PEFT's, and against each row run alone."""
    with bank.use(names):
        ours = model(input_ids=ids).logits
    theirs = peft_model(input_ids=ids, adapter_names=names).logits
    alone = []
    for i, n in enumerate(names[:4]):
        bank.activate(n)
        alone.append(model(input_ids=ids[i : i + 1]).logits)
    bank.activate(None)
    with lorakit.disabled(model):
        d_base = (ours - model(input_ids=ids).logits).abs().max().item()
    d_peft = (ours - theirs).abs().max().item()
    d_alone = (ours[:4] - torch.cat(alone)).abs().max().item()
    return (
        f"correctness: lorakit's mixed-batch logits vs PEFT's: max difference {d_peft:.2g}; vs the first 4 rows "
        f"run alone: {d_alone:.2g}; the adapters move the logits by up to {d_base:.2g} from the base's (whose "
        f"largest magnitude is {ours.abs().max().item():.0f})"
    )


def _table(res, args) -> str:
    out = [
        "| way | prefill tokens/s | time / lorakit's | decode tokens/s | time / lorakit's |",
        "|---|---:|---:|---:|---:|",
    ]
    for way in WAYS:
        cells = []
        for kind in ("prefill", "decode"):
            secs = res[way][kind]
            tokens = args.batch * (args.prompt if kind == "prefill" else 1)
            pairs = [t / ref for t, ref in zip(secs, res["lorakit"][kind], strict=True)]
            cells.append(f"{tokens / statistics.median(secs):.0f}")
            cells.append(f"{statistics.median(pairs):.2f} [{min(pairs):.2f}–{max(pairs):.2f}]")
        out.append(f"| {way} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
