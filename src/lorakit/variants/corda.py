"""CorDA, Context-oriented Decomposition Adaptation (Yang et al. 2024, arXiv:2406.05223): a data-driven init that
decomposes each weight oriented by the covariance of its inputs on data.

For a linear layer with weight W (d×k) and C the covariance of its inputs on the data (k×k): W·C = U·S·Vh (SVD),
so W = U·S·(Vh·C⁻¹). "ipm" (instruction-previewed mode) takes the r largest triplets as the adapter, so training
starts from the directions the task's data uses most; "kpm" (knowledge-preserved mode) takes the r smallest,
leaving in the frozen W0 the directions that data (for instance question answering on world knowledge) relies on.
A = √(S_r/s)·(Vh_r·C⁻¹), B = U_r·√(S_r/s), and W0 ← W0 − s·B·A: the output is unchanged at the start.

Matches PEFT's `init_lora_weights="corda"` (`preprocess_corda`, then `get_peft_model`):
- C is the mean over samples of Xᵀ·X, X one sample's inputs to the layer (its non-padding positions) divided by
  its largest value. PEFT hooks one sample per forward; here each row of a batch is a sample.
- C is damped to C + damp·mean(diag C)·I, damp from 0.01 doubling until ‖(C + …)·(C + …)⁻¹ − I‖ < 0.05.
- Layers that read the same input (q, k, v; gate, up) share one C.

Saving: B·A is relative to W0 − s·B0·A0, and B0, A0 come from the data, so a load cannot compute them again
(PEFT's cannot either, without `preprocess_corda` on the same data). So `save_adapter` writes the adapter as plain
LoRA on the original W0 (rank 2r: A' = [A; A0], B' = [B, −B0], the same s; PEFT's
`path_initial_model_for_weight_conversion`), which PEFT, llama.cpp and lorakit load on the original base. A PEFT
file that still says "corda" is refused in one line that says how to convert it. A training checkpoint holds the
rank-r A and B; a resumed run computes CorDA again from the same batches.

`lorakit.inject_corda(model, config, batches)` runs it; `lorakit train --lora.init corda` runs it on the first
`corda_batches` training batches.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from lorakit.config import LoraConfig
from lorakit.control import disabled
from lorakit.data.jsonl import DataError
from lorakit.device import model_device, to_device
from lorakit.errors import AdapterError
from lorakit.inject import check_new_name, delete_adapter, inject
from lorakit.registry import registry
from lorakit.targeting import select_modules
from lorakit.variants.datapass import (
    DataInitRecord,
    Stop,
    decomposable_targets,
    forward,
    linear,
    positions,
    register_data_init,
    same_inputs,
)
from lorakit.variants.pissa import decomposable_weight, move_into_adapter

log = logging.getLogger(__name__)


@dataclass
class CordaResult(DataInitRecord):
    """What CorDA read: the covariance of each target module's inputs (modules with the same input share one;
    d_in² floats per distinct input, ~400 MB on SmolLM2, which `lean` drops)."""

    covariances: dict[str, torch.Tensor]
    batches: int
    samples: int
    """Rows of the batches that had at least one non-padding position: PEFT's samples."""
    tokens: int
    groups: int
    """Distinct inputs."""
    modules: int
    seconds: float = 0.0
    """Wall time of the passes (inject_corda adds the decompositions)."""

    label = "CorDA"
    key = "corda"
    heavy = "covariances"

    def describe(self) -> str:
        """One line: what CorDA read."""
        return (
            f"{self.batches} batches, {self.samples} samples ({self.tokens:,} tokens), {self.groups} distinct layer "
            f"inputs, {self.modules} modules, {self.seconds:.0f} s"
        )


def corda_covariances(
    model: nn.Module,
    config: LoraConfig,
    batches: Iterable[dict[str, torch.Tensor]],
    modules: list[str] | None = None,
    *,
    progress: bool = True,
) -> CordaResult:
    """The covariance of the inputs of the linear modules `config` selects (or `modules`) on the first
    config.corda_batches of `batches` (dicts with input_ids and attention_mask), as PEFT's preprocess_corda
    computes it. Adapters already on the model are switched off for the passes; the model is left as it was."""
    names = modules if modules is not None else select_modules(model, config)
    names = [n for n in names if linear(model, n)]
    if not names:
        raise AdapterError("CorDA: none of the modules it would adapt is a linear layer (CorDA initialises those only)")
    device = model_device(model)
    stream = itertools.islice(batches, config.corda_batches)
    first = next(stream, None)
    if first is None:
        raise DataError("CorDA needs at least one batch of data, got none")
    was_training = model.training
    start = time.perf_counter()
    model.eval()
    try:
        with torch.no_grad(), disabled(model):
            groups = same_inputs(model, names, to_device(first, device), "CorDA")
            sums = [torch.zeros(w, w, dtype=torch.float32, device=device) for _, w in groups]
            read, samples, tokens = 0, 0, 0
            bar = tqdm(total=config.corda_batches, desc="CorDA", unit="batch", disable=not progress, leave=False)
            try:
                for batch in itertools.chain([first], stream):
                    batch = to_device(batch, device)
                    keep = positions(batch, label_mask=False)
                    _accumulate(model, batch, keep, groups, sums)
                    read += 1
                    samples += int(keep.any(1).sum())
                    tokens += int(keep.sum())
                    bar.update(1)
            finally:
                bar.close()
    finally:
        model.train(was_training)
    covariances = {}
    for (group, _), total in zip(groups, sums, strict=True):
        mean = total / samples
        for m in group:
            covariances[m] = mean
    covariances = {n: covariances[n] for n in names}  # model order
    return CordaResult(covariances, read, samples, tokens, len(groups), len(names), time.perf_counter() - start)


def _accumulate(model: nn.Module, batch, keep: torch.Tensor, groups, sums: list[torch.Tensor]) -> None:
    """One pass: add each sample's Xᵀ·X, X scaled by its largest value, to its group's sum."""
    done: list[int] = []
    handles = []
    for i, (group, _) in enumerate(groups):

        def hook(module, args, i=i, name=group[0]):
            x = args[0].float()
            if x.dim() == 3 and x.shape[:2] == keep.shape:
                kept = keep[..., None]
                top = x.masked_fill(~kept, float("-inf")).amax(dim=(1, 2)).abs()  # per sample, as PEFT's max()
                x = (x / top[:, None, None])[keep]
            else:
                x = x.reshape(-1, x.shape[-1])
                x = x / x.max().abs()
            if not torch.isfinite(x).all():
                raise AdapterError(
                    f"CorDA: {name!r} got inputs that are not finite, or a sample whose inputs are all zero"
                )
            sums[i].addmm_(x.T, x)
            done.append(i)
            if len(done) == len(groups):
                raise Stop

        handles.append(model.get_submodule(group[0]).register_forward_pre_hook(hook))
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()


def corda_factors(
    w: torch.Tensor, covariance: torch.Tensor, r: int, s: float, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of CorDA for W0 = `w` (2-D, f32) and its inputs' covariance: the r largest ("ipm") or smallest
    ("kpm") triplets of W0·C, each factor with √(S_r/s)."""
    c = covariance.float()
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    level = c.diagonal().mean()
    damp = 0.01
    for _ in range(64):
        fixed = c + eye * (level * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise AdapterError("CorDA: the covariance of a layer's inputs cannot be inverted, even damped")
    u, sv, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    v = vh @ inv
    pick = slice(0, r) if mode == "ipm" else slice(sv.shape[0] - r, None)
    root = (sv[pick] / s).sqrt()
    return v[pick] * root[:, None], u[:, pick] * root


def inject_corda(
    model: nn.Module,
    config: LoraConfig,
    batches: Iterable[dict[str, torch.Tensor]],
    name: str = "default",
    *,
    activate: bool = True,
    trainable: bool = True,
    progress: bool = True,
) -> CordaResult:
    """Add LoRA adapter `name` with CorDA's init (config.corda_mode "ipm" or "kpm"), from the inputs the targets
    see on the first config.corda_batches of `batches` (dicts of input_ids and attention_mask: what a training loop
    feeds). W0 keeps the residual; deleting the adapter gives it back. Saved, the adapter is plain LoRA of rank 2r
    on the original W0. Every check runs before the model is touched; a failure leaves it as it was."""
    check_new_name(model, name)
    config = config.replace(init="corda")
    names = decomposable_targets(model, config, "CorDA")
    result = corda_covariances(model, config, batches, names, progress=progress)
    start = time.perf_counter()
    inject(model, config.replace(init="default"), name, activate=activate, trainable=trainable)
    try:
        with torch.no_grad():
            for m in tqdm(names, desc="CorDA: decompose", unit="layer", disable=not progress, leave=False):
                layer = model.get_submodule(m)
                adapter = layer.adapters[name]
                w = decomposable_weight(layer, adapter, "CorDA")
                a, b = corda_factors(
                    layer.handler.to_2d(w).float(),
                    result.covariances[m],
                    adapter.r,
                    adapter.scaling,
                    config.corda_mode,
                )
                adapter.lora_A.copy_(a)
                adapter.lora_B.copy_(b)
                adapter.start = (a.clone(), b.clone())
                move_into_adapter(layer, adapter, w)
    except BaseException:
        delete_adapter(model, name)  # gives each W0 its residual back
        raise
    registry(model).adapters[name].config = config
    result.seconds += time.perf_counter() - start
    log.info("CorDA (%s): %s", config.corda_mode, result.describe())
    return result


register_data_init("corda", "decomposes W0 by the covariance of its inputs on data", "inject_corda")
