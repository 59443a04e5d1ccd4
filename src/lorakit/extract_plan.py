"""What `lorakit.extract` compares: the two models' folders and configs, the base's module tree (on the meta device),
and, tensor by tensor, what changed and how the adapter can carry it (a `Plan`).

Both checkpoints are read one tensor at a time (`lorakit.readers.ModelTensors`). Every mismatch (an architecture,
a shape, a tensor one of them lacks) fails in one line naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, ModelLoadError
from lorakit.handlers import handler_for
from lorakit.readers import ModelTensors
from lorakit.targeting import select_modules

# -- inputs ---------------------------------------------------------------------------------------------------


def model_folder(spec: str | os.PathLike | None, which: str) -> Path:
    from lorakit.models import resolve_model_dir  # transformers, only when a model is read

    try:
        return resolve_model_dir(spec)
    except ModelLoadError as e:
        raise ModelLoadError(f"the {which} model: {e}") from e


def skeleton_of(base_dir: Path, tuned_dir: Path) -> nn.Module:
    """The base's module tree without weights (on the meta device): module types and tied parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    configs = []
    for d in (base_dir, tuned_dir):
        try:
            configs.append(AutoConfig.from_pretrained(d, local_files_only=True))
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{d}: cannot read config.json: {str(e).splitlines()[0]}") from e
    kinds = [(c.model_type, tuple(c.architectures or ())) for c in configs]
    if kinds[0] != kinds[1]:
        raise ConfigError(
            f"the base ({base_dir}) is {kinds[0][0]} {list(kinds[0][1])} and the tuned model ({tuned_dir}) is "
            f"{kinds[1][0]} {list(kinds[1][1])}: extraction needs one architecture"
        )
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(configs[0])
    except (ValueError, KeyError) as e:
        raise ModelLoadError(
            f"{base_dir}: not a causal LM transformers can build: {str(e).splitlines()[0]}"
        ) from e


def same_keys(old: ModelTensors, new: ModelTensors) -> None:
    """Both checkpoints hold the same tensor names (a tied head in one and not the other differs here)."""
    for a, b in ((old, new), (new, old)):
        extra = sorted(set(a.keys()) - set(b.keys()))
        if extra:
            raise ModelLoadError(
                f"{a.folder} has {extra[0]}, which {b.folder} has not: not the same architecture"
            )


def parameters(skeleton: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(skeleton.named_parameters())  # a tied parameter once, under its first name


# -- what changed ---------------------------------------------------------------------------------------------


class Plan:
    """What changed, and how the adapter carries each change."""

    def __init__(self, skeleton: nn.Module, targets: str | list[str] | None) -> None:
        self.modules = dict(skeleton.named_modules())
        self.owners: dict[int, list[str]] = {}  # id(parameter) -> the modules that hold it as their weight
        for name, module in self.modules.items():
            w = getattr(module, "weight", None)
            if isinstance(w, nn.Parameter) and handler_for(module) is not None:
                self.owners.setdefault(id(w), []).append(name)
        self.allowed = None if targets is None else set(select(skeleton, targets))
        self.key_prefix = getattr(skeleton, "base_model_prefix", "") or ""
        self.loras: dict[str, str] = {}  # module -> the parameter name its ΔW is read from
        self.biases: list[str] = []  # LoRA-able modules whose bias changed
        self.other: dict[str, float] = {}  # modules with other changed parameters -> their largest change
        self.left_out: dict[str, float] = {}
        self.dtypes: tuple[str, str] | None = None  # (base, tuned) where a tensor's dtypes differ
        self.numel = sum(p.numel() for _, p in parameters(skeleton))

    def lora_ok(self, module: str) -> bool:
        return self.allowed is None or module in self.allowed


def select(skeleton: nn.Module, targets: str | list[str]) -> list[str]:
    return select_modules(skeleton, LoraConfig(targets=targets))


def read_tensor(plan: Plan, ckpt: ModelTensors, pname: str) -> torch.Tensor:
    key = ckpt.key(pname, plan.key_prefix)
    if key is None:
        raise ModelLoadError(f"{ckpt.folder}: has no tensor {pname}, which its config's model has")
    return ckpt.get(key)


def compare(plan: Plan, pname: str, param: nn.Parameter, old: ModelTensors, new: ModelTensors) -> None:
    a, b = read_tensor(plan, old, pname), read_tensor(plan, new, pname)
    for which, t, ckpt in (("base", a, old), ("tuned", b, new)):
        if tuple(t.shape) != tuple(param.shape):
            raise ModelLoadError(
                f"{ckpt.folder}: {pname} has shape {tuple(t.shape)}, the {which} config says {tuple(param.shape)}"
            )
    if a.dtype != b.dtype and plan.dtypes is None:
        plan.dtypes = (str(a.dtype).removeprefix("torch."), str(b.dtype).removeprefix("torch."))
    if torch.equal(a, b):
        return
    module, _, leaf = pname.rpartition(".")

    def change() -> float:  # ‖ΔW‖/‖W‖, for the report: only for what the adapter may not carry
        return (b.float() - a.float()).norm().item() / max(a.float().norm().item(), 1e-30)

    owners = plan.owners.get(id(param), []) if leaf == "weight" else []
    for m in owners:  # a weight LoRA can carry (several modules' weight, if tied)
        if plan.lora_ok(m):
            plan.loras[m] = pname
        else:
            plan.left_out[m] = change()
    if owners:
        return
    if leaf == "bias" and handler_for(plan.modules[module]) is not None:
        plan.biases.append(module)
    else:
        plan.other[module] = max(plan.other.get(module, 0.0), change())
