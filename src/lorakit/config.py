"""`LoraConfig`: what to adapt and how. Its checks are `lorakit.config_checks`.

Field names are short (`alpha`, `targets`, `dropout`); PEFT's names (`lora_alpha`, `target_modules`,
`lora_dropout`, ...) appear only in `to_peft_dict` / `from_peft_dict`, whose key mapping is `lorakit.peft_keys`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lorakit.config_checks import check_config
from lorakit.errors import ConfigError
from lorakit.peft_keys import ALL_LINEAR, config_kwargs, peft_fields, peft_key

INITS_IN_WEIGHTS = ("loftq", "eva", "mica")
"""Inits whose result lives wholly in the adapter's saved weights, where computing it again at load is impossible
(LoftQ needs the original weights, EVA the data) or wasted (MiCA's SVD): a loaded adapter takes its A and B from
the file, and keeps the init's name in its config."""

@dataclass
class LoraConfig:
    """Settings for one LoRA adapter. ΔW = s·B·A with s = alpha/r (or alpha/√r with `use_rslora`)."""

    r: int = 8
    """Rank of the update: A is (r × in_features), B is (out_features × r)."""
    alpha: float = 8.0
    """Scaling numerator: the update is multiplied by alpha/r (alpha/√r with rsLoRA)."""
    dropout: float = 0.0
    """Dropout probability on the input of A (ignored for Embedding targets, as in PEFT)."""
    targets: str | list[str] = ALL_LINEAR
    """Modules to adapt: a list of exact names or name suffixes, one regex string (full match), or "all-linear"."""
    exclude: str | list[str] | None = None
    """Modules never to adapt: names/suffixes (list) or a full-match regex (str)."""
    layers: list[int] | None = None
    """Only adapt modules in these layer indices (the number after `layers_pattern`, e.g. `layers.3.`)."""
    layers_pattern: str | list[str] | None = None
    """Name of the module list holding the layers (e.g. "layers", "h"); guessed when None."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: regex matched against the end of the module name."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: regex matched against the end of the module name."""
    bias: str = "none"
    """Which base biases train and get saved with the adapter: "none", "all" or "lora_only"."""
    lora_bias: bool = False
    """A trainable bias on B, saved with the adapter (PEFT's `lora_bias`, file key `lora_B.bias`): the update is
    s·(B·A·x + b). Each adapter carries its own b, so switching or mixing adapters never touches the base's bias
    (unlike `bias`); merging adds s·b to the base's bias, so it needs one. For adapters extracted from a full
    fine-tune whose biases changed (`lorakit extract`). Not with DoRA, an init other than "default"/"random",
    Embedding targets or target_parameters (as in PEFT)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/√r instead of alpha/r."""
    init: str = "default"
    """"default" (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r)), "pissa" (top-r SVD of W0), "olora" (QR
    of W0), "orthogonal" (A, B random with B·A = 0; r even), "loftq" (for a 4-bit base: Q + s·B·A ≈ W0, LoftQ),
    "eva" (A from the principal components of the layer inputs on data: `inject_eva`), "corda" (A, B from W0
    oriented by its inputs' covariance on data, W0 keeps the residual: `inject_corda`; saved as plain LoRA),
    "lora_ga" (A, B from the SVD of W0's gradient on data, W0 keeps the residual: `inject_loraga`; saved as plain
    LoRA), "mica" (B the left singular
    vectors of W0's r smallest singular values, frozen; A zero and trained), "random"."""
    pissa_niter: int = 0
    """PiSSA (init "pissa"): 0 takes the exact SVD of W0; N > 0 a randomised SVD with N power iterations (PEFT's
    "pissa_niter_N"), faster on large weights. Its start comes from random draws that no load repeats, so such an
    adapter saves as plain LoRA of rank 2r on the original W0 (as CorDA's)."""
    loftq_iter: int = 1
    """LoftQ's alternating steps (init "loftq"): 1 keeps the base's NF4 codes; more re-quantize W0 - s·B·A."""
    eva_rho: float = 2.0
    """EVA (init "eva"): a module's rank may grow to round(r·rho) where its inputs' variance is spread out, taken
    from modules where it is concentrated; the sum of ranks stays that of the config. 1 keeps every rank."""
    eva_tau: float = 0.99
    """EVA: a component has converged when its cosine similarity to the previous batch's estimate is >= tau."""
    eva_label_mask: bool = True
    """EVA: use only the positions that carry a label (the answer tokens), as PEFT's use_label_mask; false: every
    non-padding token (for data where few tokens carry labels)."""
    eva_whiten: bool = False
    """EVA: divide each component by the square root of its singular value."""
    eva_adjust_scaling: bool = True
    """EVA: a module whose rank changed gets alpha·(new rank / r), so every module keeps the scaling alpha/r."""
    eva_batches: int = 100
    """EVA: the most batches it reads; a component not converged by then is used as it is, with a warning."""
    corda_mode: str = "ipm"
    """CorDA (init "corda"): "ipm" (instruction-previewed) starts the adapter from the r directions of W0·C (C:
    the covariance of the layer's inputs on the training data) the data uses most; "kpm" (knowledge-preserved)
    from the r it uses least, leaving the others in the frozen W0."""
    corda_batches: int = 32
    """CorDA: the batches whose inputs make up C (each row a sample; PEFT suggests a few hundred samples)."""
    lora_ga_direction: str = "ArB2r"
    """LoRA-GA (init "lora_ga"): which of the gradient's top 2r singular directions start A and B: "ArB2r" (A the
    first r, B the next r; the paper's choice), "A2rBr" (the other way round), "ArBr" (alternating), "random"."""
    lora_ga_scale: str = "stable"
    """LoRA-GA: "stable" (B times d_out^¼/√gamma, the paper's), "weight_svd" (B's top singular value that of W0),
    "gd_scale" (A and B divided by the scaling s), "unit" (as the SVD gives them)."""
    lora_ga_stable_gamma: float = 16
    """LoRA-GA: gamma of the "stable" scale (larger: a smaller start)."""
    lora_ga_batches: int = 8
    """LoRA-GA: the batches whose mean gradient it decomposes."""
    use_dora: bool = False
    """Weight-decomposed LoRA: a trainable magnitude per output feature times the normalised W0 + ΔW."""
    task_type: str | None = None
    """PEFT task type written to adapter_config.json; None: the one that fits the model, at save (CAUSAL_LM,
    SEQ_CLS, TOKEN_CLS, QUESTION_ANS, SEQ_2_SEQ_LM, or null for a bare model, as PEFT writes when unset)."""
    base_model: str | None = None
    """Name or path of the base model, written to adapter_config.json as base_model_name_or_path."""
    modules_to_save: list[str] | None = None
    """Modules the adapter trains and saves whole, each in its own copy (PEFT's modules_to_save): a module is
    saved when its name is one of these or ends with "." + one, as in PEFT 0.22, e.g. ["score"] or ["lm_head"]. None: a classification model's head (score/classifier/qa_outputs),
    as PEFT adds it, and nothing for other models."""
    target_parameters: list[str] | None = None
    """Parameters to adapt that are no Linear (PEFT's target_parameters): `<module>.<parameter>` names or their
    ends, e.g. ["experts.gate_up_proj", "experts.down_proj"] for mixture-of-experts weights stored as one 3-D
    parameter; 2-D parameters too. targets may then be [] (no modules)."""
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Embedding rows the adapter trains alone, e.g. new special tokens (PEFT's trainable_token_indices): a list of
    token ids for the input embedding (and the output head tied to it), or {module name: token ids}."""
    layer_replication: list[list[int]] | None = None
    """A deeper model from the base's own layers (PEFT's layer_replication): [[0, 20], [10, 30]] makes layers
    0..19 then 10..29, the copies sharing their weights, each with its own adapter; the file's keys name the new
    layers, and a load replicates again. Merging is refused (the copies share W0). lorakit.replicate."""
    alora_invocation_tokens: list[int] | None = None
    """Activated LoRA (PEFT's aLoRA): the token ids that invoke the adapter. Each row's tokens before the last
    occurrence of this sequence see the base model alone, so their KV cache is the base's; the adapter acts from
    the invocation on. Not mergeable. lorakit.variants.alora."""
    use_bdlora: dict[str, Any] | None = None
    """BD-LoRA (PEFT's use_bdlora): a block-diagonal A or B, for serving many adapters on a model sharded across
    devices: {"target_modules_bd_a": [...], "target_modules_bd_b": [...], "nblocks": N, "match_strict": true}.
    A module whose name contains a bd_a pattern gets a block-diagonal A of N blocks, bd_b a block-diagonal B
    (row-sharded layers: A; column-sharded: B); `match_strict` refuses a target that matches neither.
    lorakit.variants.bdlora."""
    ensure_weight_tying: bool = False
    """Where the model ties its output head to its input embedding (SmolLM2, Llama 3.2, GPT-2): give both one
    update, as they have one weight (PEFT's ensure_weight_tying). A LoRA on either lives on the embedding, and the
    head's is its transpose; a module saved whole on either is one copy. Merging keeps the model tied. False (as
    in PEFT): each gets its own update, and merging unties them. lorakit.tying."""
    use_kasa: bool = False
    """KaSA (PEFT's kasa_config): drop W0's r smallest singular components and train ΔW = s·B·diag(d)·A, a learnable
    singular value per rank. lorakit keeps W0 and subtracts the dropped part beside the adapter, so switching,
    disabling and removing stay exact. Linear layers. lorakit.variants.kasa."""
    kasa_beta: float = 1e-4
    """KaSA: weight of the training loss's term Σ d² (over the adapted layers)."""
    kasa_gamma: float = 1e-3
    """KaSA: weight of the training loss's term ‖BᵀB − I‖_F + ‖AAᵀ − I‖_F (over the adapted layers)."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, (tuple, set)):
            self.targets = sorted(self.targets)
        if isinstance(self.exclude, (tuple, set)):
            self.exclude = sorted(self.exclude)
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if isinstance(self.modules_to_save, (tuple, set)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        lr = self.layer_replication
        if isinstance(lr, (list, tuple)) and all(isinstance(p, (list, tuple)) for p in lr):
            self.layer_replication = [list(p) for p in lr]
        if isinstance(self.alora_invocation_tokens, tuple):
            self.alora_invocation_tokens = list(self.alora_invocation_tokens)
        check_config(self)

    # -- per-module values -------------------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        """Rank for `module_name`, honouring `rank_pattern`."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """Alpha for `module_name`, honouring `alpha_pattern`."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scaling_for(self, module_name: str) -> float:
        """The factor s in ΔW = s·B·A for `module_name`."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def replace(self, **changes: Any) -> LoraConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- PEFT json (the key mapping: lorakit.peft_keys) ---------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` content PEFT expects for this config."""
        return peft_fields(self)

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], *, source: str = "adapter_config.json") -> LoraConfig:
        """Parse PEFT's `adapter_config.json`. Unknown keys warn; missing required keys and unsupported features raise."""
        kwargs = config_kwargs(d, source)
        try:
            return cls(**kwargs)
        except ConfigError as e:  # say the key as the file spells it: lora_alpha, not alpha
            msg, theirs = str(e), peft_key(e.key)
            if e.key and theirs and msg.startswith(e.key):
                msg = theirs + msg[len(e.key) :]
            raise ConfigError(f"{source}: {msg}", key=theirs) from None


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rule: the first pattern key that matches the end of the module name (`(.*\\.)?(key)$`)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None

