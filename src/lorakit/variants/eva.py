"""EVA, Explained Variance Adaptation (Paischer et al. 2024, arXiv:2410.07170): a data-driven init. Each adapted
linear layer's A starts as the top principal components of the inputs that layer sees on the training data, B as
zero (the model's output is unchanged at init), and the ranks are redistributed across layers by how much of their
inputs' variance those components explain.

Matches PEFT's `init_lora_weights="eva"` (`initialize_lora_eva_weights`), whose files it reads and writes:
- The components come from an incremental PCA over batches, one partial fit per batch, of the positions that carry a
  label (`eva_label_mask`) or of every non-padding position. A component has converged when its cosine similarity to
  the previous batch's estimate reaches `eva_tau`; a layer stops reading data once its components up to its current
  rank have converged.
- Layers that read the same input (q, k, v; gate, up) share one PCA.
- The rank budget is the sum of the config's ranks. Each layer offers up to round(r·eva_rho) components, all are
  ranked by explained-variance ratio, and the budget's worth of the best are kept: a layer's rank is how many of
  its own made it (0 removes the adapter from it). With `eva_adjust_scaling` a changed rank r' gets alpha·r'/r.
- The result is plain LoRA: per-module ranks in rank_pattern, alphas in alpha_pattern, the modules in targets.

Where it differs: the SVD of each partial fit is exact (PEFT's is a randomised low-rank one, seeded); ties in the
ranking go to the layer that comes first; `eva_batches` caps the batches read (PEFT cycles until every layer has
converged); the forward pass computes the logits of the last position only where the model allows it.
`lorakit.inject_eva(model, config, batches)` runs it; `lorakit train --lora.init eva` runs it on the training data.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import warnings
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
from lorakit.inject import check_new_name, inject
from lorakit.registry import registry
from lorakit.targeting import select_modules
from lorakit.variants.datapass import (
    Stop,
    Stream,
    forward,
    linear,
    positions,
    register_data_init,
    rows,
    same_inputs,
)

log = logging.getLogger(__name__)


class _IncrementalPCA:
    """Principal components of a stream of row batches (the scikit-learn algorithm: the new batch, centred, is
    stacked under the previous components scaled by their singular values and a mean-correction row, and
    decomposed again). Exact SVD in float32; signs fixed so that each component's largest entry is positive."""

    def __init__(self, n_components: int) -> None:
        self.n = n_components
        self.seen = 0
        self.mean: torch.Tensor | None = None
        self.var_sum: torch.Tensor | None = None  # sum of squared deviations per feature (float64)
        self.components: torch.Tensor | None = None  # (n, d)
        self.singular: torch.Tensor | None = None  # (n,)
        self.ratio: torch.Tensor | None = None  # explained-variance ratio of each component

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.float()
        m = x.shape[0]
        batch_sum = x.sum(0, dtype=torch.float64)
        batch_mean = batch_sum / m
        dev = x.double() - batch_mean
        batch_var_sum = dev.square().sum(0)
        total = self.seen + m
        if self.mean is None:
            mean, var_sum = batch_mean, batch_var_sum
            stacked = (x - batch_mean.float()).contiguous()
        else:
            delta = self.mean - batch_mean
            mean = (self.mean * self.seen + batch_sum) / total
            var_sum = self.var_sum + batch_var_sum + delta.square() * (self.seen * m / total)
            correction = ((self.seen * m / total) ** 0.5 * delta).float()
            stacked = torch.cat(
                [self.singular[:, None] * self.components, x - batch_mean.float(), correction[None]], 0
            )
        _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        largest = vh.abs().argmax(1)
        signs = torch.sign(vh[torch.arange(vh.shape[0]), largest])
        vh = vh * signs[:, None]
        self.seen, self.mean, self.var_sum = total, mean, var_sum
        self.components, self.singular = vh[: self.n], s[: self.n]
        self.ratio = (s[: self.n].double().square() / var_sum.sum().clamp_min(1e-30)).float()


class _Group:
    """Target modules that read the same input, the PCA of that input (n components) and which have converged."""

    def __init__(self, modules: list[str], n: int) -> None:
        self.modules, self.n = modules, n
        self.pca = _IncrementalPCA(n)
        self.converged = torch.zeros(n, dtype=torch.bool)

    def need(self, ranks: dict[str, int]) -> int:
        """The components its modules use at `ranks`."""
        return max(ranks[m] for m in self.modules)

    def done(self, ranks: dict[str, int]) -> bool:
        return self.pca.components is not None and bool(self.converged[: self.need(ranks)].all())


@dataclass
class EvaResult:
    """What EVA found, per module: its rank and the rows of A (rank × in_features, float32)."""

    ranks: dict[str, int]
    components: dict[str, torch.Tensor]
    batches: int
    """Batches read."""
    converged: bool
    """Whether every component kept converged (to eva_tau) within eva_batches."""
    groups: int
    """Distinct inputs (layers that read the same input share one PCA)."""
    seconds: float = 0.0
    """Wall time of the passes and decompositions."""

    label = "EVA"
    key = "eva"

    def lean(self) -> EvaResult:
        """The same record without the components, for a caller that keeps it while training."""
        return dataclasses.replace(self, components={})

    def record(self) -> dict:
        """What a run's summary.json keeps of it."""
        return {
            "batches": self.batches,
            "groups": self.groups,
            "converged": self.converged,
            "seconds": self.seconds,
            "modules": sum(1 for r in self.ranks.values() if r),
        }

    def describe(self) -> str:
        """One line: what EVA read and the ranks it gave."""
        ranks = [r for r in self.ranks.values() if r]
        return (
            f"{self.batches} batches, {self.groups} distinct layer inputs, {self.seconds:.0f} s; ranks "
            f"{min(ranks)} to {max(ranks)} on {len(ranks)} modules"
            + ("" if self.converged else " (some components had not converged: raise eva_batches)")
        )


def eva_components(
    model: nn.Module,
    config: LoraConfig,
    batches: Iterable[dict[str, torch.Tensor]],
    modules: list[str] | None = None,
    *,
    progress: bool = True,
) -> EvaResult:
    """EVA's components and ranks for the linear modules `config` selects (or `modules`), from the inputs they see
    on `batches` (dicts with input_ids, attention_mask and, for the label mask, labels with -100 where nothing is
    learned). Adapters already on the model are switched off for the passes; the model is left as it was."""
    names = modules if modules is not None else select_modules(model, config)
    names = [n for n in names if linear(model, n)]
    if not names:
        raise AdapterError("EVA: none of the modules it would adapt is a linear layer (EVA initialises those only)")
    device = model_device(model)
    stream = Stream(batches, config.eva_batches)
    batches_iter = iter(stream)
    first = next(batches_iter, None)
    if first is None:
        raise DataError("EVA needs at least one batch of data, got none")
    was_training = model.training
    start = time.perf_counter()
    model.eval()
    try:
        with torch.no_grad(), disabled(model):
            groups = _group_by_input(model, names, config, to_device(first, device))
            result = _fit(model, config, groups, itertools.chain([first], batches_iter), stream, device, progress)
    finally:
        model.train(was_training)
    result.ranks = {n: result.ranks[n] for n in names}  # model order
    result.seconds = time.perf_counter() - start
    return result


def _group_by_input(model: nn.Module, names: list[str], config: LoraConfig, batch) -> list[_Group]:
    """The modules that read the same input share one PCA, of as many components as the most any of them may get
    (round(r·eva_rho), at most the input's width)."""
    return [
        _Group(modules, max(min(round(config.rank_for(m) * config.eva_rho), width) for m in modules))
        for modules, width in same_inputs(model, names, batch, "EVA")
    ]


def _fit(model, config: LoraConfig, groups: list[_Group], batches, stream: Stream, device, progress) -> EvaResult:
    group_of = {m: g for g in groups for m in g.modules}
    cap = {m: min(round(config.rank_for(m) * config.eva_rho), group_of[m].n) for m in group_of}
    budget = sum(config.rank_for(m) for m in group_of)
    ranks = dict(cap)
    read = 0
    bar = tqdm(total=config.eva_batches, desc="EVA", unit="batch", disable=not progress, leave=False)
    try:
        for batch in batches:
            if stream.cycled and any(g.pca.components is None for g in groups):
                break  # a second round cannot help a layer that no batch could update
            active = [g for g in groups if not g.done(ranks)]
            if not active:
                break
            _fit_batch(model, to_device(batch, device), active, config)
            read += 1
            if all(g.pca.components is not None for g in groups):
                ranks = _distribute(groups, cap, budget)
            bar.update(1)
            bar.set_postfix_str(f"{len(groups) - len(active)}/{len(groups)} inputs converged")
    finally:
        bar.close()
    empty = [g.modules[0] for g in groups if g.pca.components is None]
    if empty:
        raise DataError(
            f"EVA: {empty[0]!r} never saw {group_of[empty[0]].n} positions in one batch (it needs at least as "
            "many as components); use larger batches, or eva_label_mask false to read every token"
        )
    late = sum(not g.done(ranks) for g in groups)
    if late:
        warnings.warn(
            f"EVA: {late} of {len(groups)} layer inputs did not converge to eva_tau={config.eva_tau} within "
            f"{config.eva_batches} batches; their components are used as they are (raise eva_batches)",
            stacklevel=3,
        )
    components = {}
    for m, r in ranks.items():
        if r:
            pca = group_of[m].pca
            a = pca.components[:r].clone()
            if config.eva_whiten:
                a = a / pca.singular[:r].sqrt().clamp_min(1e-12)[:, None]
            components[m] = a
    return EvaResult(ranks, components, read, not late, len(groups))


def _fit_batch(model: nn.Module, batch, active: list[_Group], config: LoraConfig) -> None:
    keep = positions(batch, config.eva_label_mask)
    last = len(active) - 1
    handles = []
    order: list[int] = []
    for i, g in enumerate(active):

        def hook(module, args, g=g, i=i):
            x = rows(args[0], keep)
            if x.shape[0] >= g.n:  # fewer rows than components: this batch cannot update it (as in PEFT)
                before = g.pca.components
                g.pca.partial_fit(x)
                if before is not None:
                    g.converged = torch.nn.functional.cosine_similarity(g.pca.components, before) >= config.eva_tau
            order.append(i)
            if len(order) == last + 1:
                raise Stop

        handles.append(model.get_submodule(g.modules[0]).register_forward_pre_hook(hook))
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()


def _distribute(groups: list[_Group], cap: dict[str, int], budget: int) -> dict[str, int]:
    """Each module's rank: how many of its own components are among the `budget` with the largest explained-
    variance ratio, each module offering its group's first cap[module]; ties go to the module that comes first."""
    values, owners = [], []
    for g in groups:
        for m in g.modules:
            values.append(g.pca.ratio[: cap[m]])
            owners.extend([m] * min(cap[m], g.pca.ratio.shape[0]))
    order = torch.argsort(torch.cat(values), descending=True, stable=True)[:budget]
    ranks = dict.fromkeys(cap, 0)
    for i in order.tolist():
        ranks[owners[i]] += 1
    return ranks


def eva_config(config: LoraConfig, result: EvaResult, names: list[str]) -> LoraConfig:
    """The config of an EVA adapter on modules `names` (those `config` selects): the modules that keep a rank in
    targets, their ranks and alphas in rank_pattern and alpha_pattern, keyed by full module name (as PEFT writes
    them). A module EVA cannot initialise (not linear) keeps its rank and alpha."""
    rank_pattern, alpha_pattern, targets = {}, {}, []
    for m in names:
        r, alpha = result.ranks.get(m, config.rank_for(m)), config.alpha_for(m)
        if r == 0:
            continue
        if m in result.ranks and config.eva_adjust_scaling and r != config.rank_for(m):
            alpha = alpha * r / config.rank_for(m)
        targets.append(m)
        if r != config.r:
            rank_pattern[m] = r
        if alpha != config.alpha:
            alpha_pattern[m] = alpha
    return config.replace(
        init="eva",
        targets=targets,
        exclude=None,
        layers=None,
        layers_pattern=None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def inject_eva(
    model: nn.Module,
    config: LoraConfig,
    batches: Iterable[dict[str, torch.Tensor]],
    name: str = "default",
    *,
    activate: bool = True,
    trainable: bool = True,
    progress: bool = True,
) -> EvaResult:
    """Add LoRA adapter `name` with EVA's init: A from the principal components of each linear layer's inputs on
    `batches` (dicts of input_ids, attention_mask, labels: what a training loop feeds), B zero, ranks redistributed
    by explained variance (config.eva_rho, eva_tau, eva_label_mask, eva_whiten, eva_adjust_scaling, eva_batches).
    The adapter's config (`lorakit.read_adapter`, the saved adapter_config.json) holds the resulting ranks and
    targets. Returns what EVA found. Every check runs before the model is touched; a failure leaves it as it was.
    """
    check_new_name(model, name)
    names = select_modules(model, config)
    config = config.replace(init="eva")
    result = eva_components(model, config, batches, names, progress=progress)
    plain = [n for n in names if n not in result.ranks]  # Embedding and convolution targets: default init
    if plain:
        log.warning("EVA initialises linear layers only; %d others (%s, ...) get the default init", len(plain), plain[0])
    eva = eva_config(config, result, names)
    inject(model, eva.replace(init="default"), name, activate=activate, trainable=trainable)
    with torch.no_grad():
        for m, a in result.components.items():
            adapter = model.get_submodule(m).adapters[name]
            adapter.lora_A.copy_(a.to(adapter.lora_A.dtype))
            adapter.lora_B.zero_()
    registry(model).adapters[name].config = eva
    log.info("EVA: %s", result.describe())
    return result


register_data_init("eva", "computes A from the model's inputs on data", "inject_eva")
