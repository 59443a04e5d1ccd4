"""LoRA-GA, Low-Rank Adaptation with Gradient Approximation (Wang et al. 2024, arXiv:2407.05000): a data-driven
init that starts B·A aligned with the gradient of full fine-tuning, so that the first steps move the model as
full fine-tuning's would.

For a linear layer with weight W0 (d×k) and G the gradient of the training loss with respect to W0, averaged over
a few batches: G ≈ U·S·Vh (the top 2r singular triplets). With the default direction "ArB2r", A = Vh[:r] and
B = U[:, r:2r]·S[r:2r], scaled ("stable": B·d^¼/√γ). W0 keeps the residual W0 − s·B·A, so the output is unchanged
at the start.

Matches PEFT's `init_lora_weights="lora_ga"` (`preprocess_loraga`, then `get_peft_model`):
- G is the mean over batches of the gradient of each batch's mean loss (the labelled tokens'), only the target
  weights requiring a gradient while it is computed;
- the SVD is randomised, as `torch.svd_lowrank(G, q=min(4r, …), niter=4)`, with its random draws (and those of
  direction "random" and scale "weight_svd") taken in model order from one generator seeded with `seed`: the same
  seed as PEFT's `torch.manual_seed` gives PEFT's factors, and a run gives the same factors every time;
- the directions ("ArBr", "A2rBr", "ArB2r", "random") and the scales ("stable", "weight_svd", "gd_scale", "unit").

Unlike PEFT, the passes run in eval mode (no dropout: the same gradient every time, so a resumed run computes the
same start), "stable" uses the layer's output size also for a transposed (Conv1D) weight, and 2r above the
weight's smaller side is refused in one line.

Saving: as CorDA's, B·A is relative to W0 − s·B0·A0, which a load cannot compute again, so `save_adapter` writes
plain LoRA of rank 2r on the original W0 (PEFT's `path_initial_model_for_weight_conversion`). A PEFT file that
still says "lora_ga" is refused in one line that says how to convert it.

`lorakit.inject_loraga(model, config, batches)` runs it; `lorakit train --lora.init lora_ga` runs it on the first
`lora_ga_batches` training batches.
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
from lorakit.config_checks import LORA_GA_DIRECTIONS, LORA_GA_SCALES
from lorakit.control import disabled
from lorakit.data.jsonl import DataError
from lorakit.data.tokenize import IGNORE
from lorakit.device import model_device, to_device
from lorakit.errors import AdapterError
from lorakit.handlers import handler_for
from lorakit.head import causal_lm_loss
from lorakit.inject import check_new_name, delete_adapter, inject
from lorakit.layers import LoraLayer
from lorakit.registry import registry
from lorakit.variants.datapass import DataInitRecord, decomposable_targets, register_data_init
from lorakit.variants.pissa import decomposable_weight, move_into_adapter, svd_lowrank

log = logging.getLogger(__name__)


@dataclass
class LoraGaResult(DataInitRecord):
    """What LoRA-GA read: the mean gradient of the loss with respect to each target's weight (2-D, float32; as
    many floats as the target weights, which `lean` drops)."""

    gradients: dict[str, torch.Tensor]
    batches: int
    samples: int
    """Rows of the batches with at least one labelled token."""
    tokens: int
    """Labelled tokens."""
    loss: float
    """The mean of the batches' losses."""
    modules: int
    seconds: float = 0.0
    """Wall time of the passes (inject_loraga adds the decompositions)."""

    label = "LoRA-GA"
    key = "lora_ga"
    heavy = "gradients"

    def describe(self) -> str:
        """One line: what LoRA-GA read."""
        return (
            f"{self.batches} batches, {self.samples} samples ({self.tokens:,} labelled tokens), loss "
            f"{self.loss:.4f}, {self.modules} modules, {self.seconds:.0f} s"
        )


def _weight(model: nn.Module, name: str) -> nn.Parameter:
    module = model.get_submodule(name)
    return (module.base_layer if isinstance(module, LoraLayer) else module).weight


def loraga_gradients(
    model: nn.Module,
    config: LoraConfig,
    batches: Iterable[dict[str, torch.Tensor]],
    modules: list[str] | None = None,
    *,
    progress: bool = True,
) -> LoraGaResult:
    """The gradient of the causal-LM loss with respect to the weight of each module `config` selects (or of
    `modules`), averaged over the first config.lora_ga_batches of `batches` (dicts of input_ids, attention_mask
    and labels), as PEFT's preprocess_loraga computes it. Only those weights require a gradient meanwhile;
    adapters already on the model are switched off. The model is left as it was (its parameters' requires_grad,
    its mode, no .grad)."""
    names = modules if modules is not None else decomposable_targets(model, config, "LoRA-GA", factor=2)
    weights = {n: _weight(model, n) for n in names}
    device = model_device(model)
    stream = itertools.islice(batches, config.lora_ga_batches)
    first = next(stream, None)
    if first is None:
        raise DataError("LoRA-GA needs at least one batch of data, got none")
    if "labels" not in first:
        raise DataError("LoRA-GA needs batches with labels (its gradient is that of the training loss)")
    was_training = model.training
    wants = {p: p.requires_grad for p in model.parameters()}
    start = time.perf_counter()
    read, samples, tokens, total = 0, 0, 0, 0.0
    try:
        model.eval()  # no dropout: the same gradient every time
        for p in wants:
            p.requires_grad_(False)
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)
        bar = tqdm(total=config.lora_ga_batches, desc="LoRA-GA", unit="batch", disable=not progress, leave=False)
        try:
            with torch.enable_grad(), disabled(model):
                for batch in itertools.chain([first], stream):
                    batch = to_device(batch, device)
                    labelled = batch["labels"][:, 1:] != IGNORE  # what the shifted loss reads
                    if not labelled.any():
                        raise DataError(f"LoRA-GA: batch {read + 1} has no labelled token, so it has no loss")
                    loss = causal_lm_loss(model, batch)
                    if not torch.isfinite(loss):
                        raise AdapterError(f"LoRA-GA: the loss of batch {read + 1} is {loss.item()}, not finite")
                    loss.backward()
                    read += 1
                    samples += int(labelled.any(1).sum())
                    tokens += int(labelled.sum())
                    total += loss.item()
                    bar.update(1)
        finally:
            bar.close()
        gradients = {}
        for n, w in weights.items():
            if w.grad is None:
                raise AdapterError(f"LoRA-GA: {n!r} got no gradient (is it used in the forward pass?)")
            grad, w.grad = w.grad, None  # one copy of each gradient at a time, at most
            grad = grad.float().div_(read)  # float() is the tensor itself when it is float32
            gradients[n] = handler_for(model.get_submodule(n)).to_2d(grad)
    finally:
        for w in weights.values():
            w.grad = None
        for p, wanted in wants.items():
            p.requires_grad_(wanted)
        model.train(was_training)
    return LoraGaResult(gradients, read, samples, tokens, total / read, len(names), time.perf_counter() - start)


def loraga_factors(
    grad: torch.Tensor,
    w: torch.Tensor,
    r: int,
    s: float,
    *,
    direction: str = "ArB2r",
    scale: str = "stable",
    gamma: float = 16,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of LoRA-GA from the mean gradient `grad` of W0 = `w` (both 2-D, out×in, float32): r of the top 2r
    singular triplets of the gradient, picked by `direction`, B carrying their singular values, then `scale`d."""
    q = min(4 * r, *grad.shape)
    u, sv, v = svd_lowrank(grad, q, 4, generator)
    u, sv, vh = u[:, : 2 * r], sv[: 2 * r], v.T[: 2 * r]
    if direction == "ArBr":  # A the odd components, B the even ones
        a, b, sb = vh[1::2], u[:, 0::2], sv[0::2]
    elif direction == "A2rBr":
        a, b, sb = vh[r:], u[:, :r], sv[:r]
    elif direction == "ArB2r":
        a, b, sb = vh[:r], u[:, r:], sv[r:]
    elif direction == "random":
        pick = torch.randperm(2 * r, generator=generator, device=generator.device)[:r].to(sv.device)
        a, b, sb = vh[pick], u[:, pick], sv[pick]
    else:
        raise AdapterError(f"LoRA-GA direction must be one of {LORA_GA_DIRECTIONS}, got {direction!r}")
    b = b * sb
    if scale == "stable":
        b = b * (w.shape[0] ** 0.25 / gamma**0.5)
    elif scale == "weight_svd":
        top = svd_lowrank(w, r, 4, generator)[1][0]
        if sb[0] > 0:
            b = b * (top / sb[0])
    elif scale == "gd_scale":
        a, b = a / s, b / s
    elif scale != "unit":
        raise AdapterError(f"LoRA-GA scale must be one of {LORA_GA_SCALES}, got {scale!r}")
    return a.contiguous(), b.contiguous()


def inject_loraga(
    model: nn.Module,
    config: LoraConfig,
    batches: Iterable[dict[str, torch.Tensor]],
    name: str = "default",
    *,
    seed: int = 0,
    activate: bool = True,
    trainable: bool = True,
    progress: bool = True,
) -> LoraGaResult:
    """Add LoRA adapter `name` with LoRA-GA's init (config.lora_ga_direction, lora_ga_scale, lora_ga_stable_gamma),
    from the gradient of the loss on the first config.lora_ga_batches of `batches` (dicts of input_ids,
    attention_mask and labels: what a training loop feeds); `seed` seeds the randomised SVD. W0 keeps the residual;
    deleting the adapter gives it back. Saved, the adapter is plain LoRA of rank 2r on the original W0. Every check
    runs before the model is touched; a failure leaves it as it was."""
    check_new_name(model, name)
    config = config.replace(init="lora_ga")
    names = decomposable_targets(model, config, "LoRA-GA", factor=2)
    result = loraga_gradients(model, config, batches, names, progress=progress)
    start = time.perf_counter()
    generator = torch.Generator(device=model_device(model)).manual_seed(seed)
    inject(model, config.replace(init="default"), name, activate=activate, trainable=trainable)
    try:
        with torch.no_grad():
            for m in tqdm(names, desc="LoRA-GA: decompose", unit="layer", disable=not progress, leave=False):
                layer = model.get_submodule(m)
                adapter = layer.adapters[name]
                w = decomposable_weight(layer, adapter, "LoRA-GA")
                a, b = loraga_factors(
                    result.gradients[m],
                    layer.handler.to_2d(w).float(),
                    adapter.r,
                    adapter.scaling,
                    direction=config.lora_ga_direction,
                    scale=config.lora_ga_scale,
                    gamma=config.lora_ga_stable_gamma,
                    generator=generator,
                )
                adapter.lora_A.copy_(a)
                adapter.lora_B.copy_(b)
                adapter.start = (adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone())
                move_into_adapter(layer, adapter, w)
    except BaseException:
        delete_adapter(model, name)  # gives each W0 its residual back
        raise
    registry(model).adapters[name].config = config
    result.seconds += time.perf_counter() - start
    log.info("LoRA-GA (%s, %s): %s", config.lora_ga_direction, config.lora_ga_scale, result.describe())
    return result


register_data_init("lora_ga", "starts A and B from the SVD of W0's gradient on data", "inject_loraga")
