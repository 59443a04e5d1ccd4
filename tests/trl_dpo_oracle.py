"""TRL's DPOTrainer (trl 1.16.0) on a PEFT LoRA adapter, as the oracle for lorakit's DPO.

`trl_dpo` trains a saved PEFT adapter with TRL for `steps` optimizer steps, each on ALL pairs as one batch (so
order and shuffling cannot matter), and returns TRL's per-step logs, the trained adapter and the token ids TRL
built. What follows was read in trl/trainer/dpo_trainer.py and dpo_config.py of trl 1.16.0 and checked against
a plain-torch computation (step-1 loss within 2e-6, 3-step trajectories and adapters within 4e-5).

Tokenization (``DPOTrainer._prepare_dataset``); the completion is never tokenized on its own:

* Standard pairs ``{"prompt": str, "chosen": str, "rejected": str}``: no chat template is applied, even when
  the tokenizer has one. ``tokenizer.eos_token`` (the string) is appended to ``chosen`` and ``rejected``
  unless they already end with it. TRL tokenizes ``prompt`` alone and the concatenated strings
  ``prompt + chosen + eos`` and ``prompt + rejected + eos``, each with ``tokenizer(text)``
  (``add_special_tokens`` left True: a BOS is added exactly when the tokenizer's post-processor adds one;
  SmolLM2's adds none). With ``p`` = the smaller of the common-prefix lengths of ``ids(prompt)`` with the two
  full sequences (normally ``len(ids(prompt))``; shorter when BPE merges across the boundary, e.g. a prompt
  ending in a space, when TRL warns once), prompt ids = ``ids(prompt)[:p]`` and completion ids =
  ``ids(prompt + completion + eos)[p:]``, which end with the EOS id.
* Conversational pairs (lists of ``{"role", "content"}`` messages; a tokenizer with a chat template): prompt
  ids = ``apply_chat_template(prompt, add_generation_prompt=True)``, full ids = ``apply_chat_template(prompt +
  chosen)`` (resp. ``+ rejected``, no generation prompt), both tokenized by the template call; completion ids
  = full ids after the common prefix, as above. No EOS is appended: the completion ends with whatever the
  template renders after the assistant message (SmolLM2: ``<|im_end|>`` then a newline), and the template's
  own additions stay (SmolLM2's inserts its default system message when the first message is not a system
  one).
* Truncation is off here (``max_length=None``). The collator builds ``prompt_ids + chosen_ids`` and
  ``prompt_ids + rejected_ids`` (batch = all chosen rows, then all rejected rows), right-padded with the pad
  id (``pad_token``, else ``eos_token``), attention mask 0 on the padding.

Log-probs and losses (``DPOTrainer._compute_loss``):

* logp(completion) = SUM over its tokens t of log p(ids[t] | ids[:t]) (log-softmax of the next-token logits,
  from TRL's fused LM head, temperature 1); a completion token at position 0 (empty prompt, no BOS) has no
  prediction and is left out. The same sum under the reference. Margin m = (pc - rc) - (pr - rr).
* ``sigmoid``: per pair -logsigmoid(beta m). TRL 1.16's sigmoid IGNORES ``label_smoothing`` (only robust,
  exo_pair, aot and aot_unpaired read it). The conservative-DPO loss asked for here,
  -(1 - ls) logsigmoid(beta m) - ls logsigmoid(-beta m), equals sigmoid + ls beta m, and TRL's ``robust``
  loss is sigmoid - ls / (1 - 2 ls) beta m, so ``trl_dpo`` gets it exactly from TRL's own losses as
  ``loss_type=["sigmoid", "robust"]``, ``loss_weights=[2 - 2 ls, -(1 - 2 ls)]`` (needs 0 <= ls < 0.5).
* ``ipo``: per pair (d - 1 / (2 beta))^2 with TOKEN-AVERAGED log-ratios d = (pc - rc) / n_c - (pr - rr) / n_r,
  n = len(chosen_ids), resp. len(rejected_ids) (clamped at 1). TRL ignores ``label_smoothing`` there;
  ``trl_dpo`` refuses it.
* Loss = MEAN over pairs of the per-pair loss (weighted sum over the loss types).
* Logged metrics are those of the step's forward, before its update (``loss``, not rounded, is that batch's
  loss): ``rewards/chosen`` = mean of beta (pc - rc), ``rewards/rejected`` = mean of beta (pr - rr) (detached;
  summed log-probs, also for ipo), ``rewards/margins`` = mean of their difference, ``rewards/accuracies`` =
  mean of (chosen reward > rejected reward), strict; ``logps/chosen``, ``logps/rejected`` = means of the
  summed policy log-probs; ``grad_norm`` = total L2 norm of the adapter gradients BEFORE clipping to
  ``max_grad_norm`` (not logged when clipping is off). Also logged: learning_rate, entropy, num_tokens,
  logits/chosen, logits/rejected, mean_token_accuracy, epoch, step.

Reference model, with ``ref_model=None``: when TRL wraps a plain model with a ``peft_config`` (a new adapter),
the reference is the base model with the adapters disabled; when it is handed a ``PeftModel`` that already has
an adapter (peft >= 0.20), TRL copies that adapter into a frozen adapter "ref" and the reference is the
INITIAL ADAPTER, not the base model. So ``reference="base"`` (the default) passes the base model plus the
adapter's LoraConfig and loads the saved weights into TRL's fresh adapter before training, and
``reference="adapter"`` passes ``PeftModel.from_pretrained(..., is_trainable=True)`` (step-1 loss log 2).

Turned off or pinned: truncation (``max_length=None``), ``precompute_ref_log_probs``, ``padding_free``,
``pad_to_multiple_of``, ``use_weighting`` (WPO), ``ld_alpha`` (LD-DPO), ``f_divergence_type="reverse_kl"``,
``sync_ref_model``, router aux loss (dense model), ``loss_weights`` (only used for the cDPO identity),
gradient checkpointing and bf16 (TRL defaults both on), warmup, weight decay, eval, saving, reporting, tqdm
and the log printer; dropout (TRL zeroes every nn.Dropout, the adapter's included). trl 1.16 has no
``rpo_alpha`` or ``reference_free``. Optimizer: torch AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0,
constant lr, gradient norm clipped to ``max_grad_norm`` (None or 0: no clipping), fp32 on CPU, no gradient
accumulation, seed 0. Reruns are bit-identical.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")
"""TRL loss types that read ``label_smoothing`` themselves (sigmoid does not; trl_dpo handles it)."""


@contextlib.contextmanager
def _quiet():
    """Silence transformers/TRL/datasets logging, progress bars and warnings; restore them afterwards."""
    import datasets
    import transformers

    verbosity = transformers.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled(), transformers.logging.is_progress_bar_enabled()
    loggers = {name: logging.getLogger(name) for name in ("trl", "accelerate", "peft", "bitsandbytes")}
    levels = {name: log.level for name, log in loggers.items()}
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bar()
    transformers.logging.disable_progress_bar()
    for log in loggers.values():
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars[0]:
            datasets.enable_progress_bar()
        if bars[1]:
            transformers.logging.enable_progress_bar()
        for name, log in loggers.items():
            log.setLevel(levels[name])


def _loss_settings(loss_type: str, label_smoothing: float) -> dict:
    """DPOConfig loss fields that make TRL's loss the formula of the module docstring."""
    if loss_type == "sigmoid" and label_smoothing:
        if not 0.0 < label_smoothing < 0.5:
            raise ValueError(f"cDPO label_smoothing must lie in [0, 0.5), got {label_smoothing}")
        ls = label_smoothing
        return {
            "loss_type": ["sigmoid", "robust"],
            "loss_weights": [2.0 - 2.0 * ls, -(1.0 - 2.0 * ls)],
            "label_smoothing": ls,
        }
    if label_smoothing and loss_type not in SMOOTHED_LOSSES:
        raise ValueError(f"TRL's {loss_type!r} loss ignores label_smoothing; pass 0.0")
    return {"loss_type": [loss_type], "loss_weights": None, "label_smoothing": label_smoothing}


def training_args(out_dir: str, batch: int, steps: int, lr: float, max_grad_norm: float | None) -> dict:
    """The TrainingArguments every oracle pins (see the module docstring): `steps` AdamW steps on batches of
    `batch`, constant `lr`, no warmup or weight decay, clipping at `max_grad_norm` (None or 0: none), a log per
    step, fp32 on CPU, no checkpointing, saving, eval, reporting or tqdm, seed 0."""
    return dict(
        output_dir=str(Path(out_dir)),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=max_grad_norm or 0.0,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )


def trained(trainer, steps: int) -> tuple[list[dict], dict]:
    """(TRL's logged metrics of each of the `steps` steps, {PEFT state-dict key: tensor} of the trained "default"
    adapter) after `trainer.train()`."""
    from peft import get_peft_model_state_dict

    logs = [dict(entry) for entry in trainer.state.log_history if "loss" in entry]
    if len(logs) != steps:
        raise RuntimeError(f"expected {steps} logged steps, TRL logged {len(logs)}")
    adapter = {
        key: value.detach().clone()
        for key, value in get_peft_model_state_dict(trainer.model, adapter_name="default").items()
    }
    return logs, adapter


def train_saved_adapter(trainer_class, args, model_dir: str, adapter_dir: str, records: list[dict]):
    """TRL's `trainer_class` with `args` on `records`, training a new PEFT adapter of adapter_dir's config (dropout
    0) that starts with adapter_dir's weights, on the fp32 model in model_dir; a reference, where the trainer has
    one, is the base with the adapter off. Returns the trainer, trained."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    config = LoraConfig.from_pretrained(adapter_dir)
    config.lora_dropout = 0.0
    config.inference_mode = False
    dataset = Dataset.from_list([dict(r) for r in records])
    trainer = trainer_class(
        model=base, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=config
    )
    _load_adapter(trainer.model, adapter_dir)
    if "ref" in trainer.model.peft_config:
        raise RuntimeError("TRL made a reference adapter: the reference would not be the base")
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every log
    trainer.train()
    return trainer


def _load_adapter(model, adapter_dir: str) -> None:
    """Overwrite the "default" adapter that TRL made from the config with the weights saved in adapter_dir."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    saved = load_peft_weights(adapter_dir, device="cpu")
    current = get_peft_model_state_dict(model)
    if set(saved) != set(current):
        raise ValueError(f"adapter keys differ: {sorted(set(saved) ^ set(current))[:6]}")
    set_peft_model_state_dict(model, saved)
    loaded = get_peft_model_state_dict(model)
    for key, value in saved.items():
        if not torch.equal(loaded[key].float(), value.float()):
            raise ValueError(f"adapter weight {key} did not load")


def trl_dpo(
    model_dir: str,
    adapter_dir: str,
    pairs: list[dict],
    *,
    steps: int,
    lr: float,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    max_grad_norm: float | None = 1.0,
    out_dir: str,
    reference: str = "base",
) -> dict:
    """Train the PEFT adapter saved in adapter_dir (on the HF model folder model_dir) with TRL's DPOTrainer.

    `steps` AdamW steps, every step on ALL pairs as one batch; constant `lr`, no warmup, no weight decay,
    dropout 0, fp32 on CPU. `reference`: "base" (the base model with the adapter disabled) or "adapter" (the
    adapter as saved, TRL's choice for an existing PeftModel). `loss_type`: "sigmoid" (with `label_smoothing`:
    conservative DPO) or "ipo"; any other TRL loss name is passed through unchecked. Returns
    {"logs": [TRL's logged metrics of each step], "adapter": {PEFT state-dict key: trained tensor},
    "token_ids": [(prompt_ids, chosen_ids, rejected_ids) for each pair, as TRL tokenized it]}.
    """
    if reference not in ("base", "adapter"):
        raise ValueError(f"reference must be 'base' or 'adapter', got {reference!r}")
    if not pairs:
        raise ValueError("no pairs")
    with _quiet():
        import torch
        from datasets import Dataset
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            **training_args(out_dir, len(pairs), steps, lr, max_grad_norm),
            beta=beta,
            **_loss_settings(loss_type, label_smoothing),
            max_length=None,
            precompute_ref_log_probs=False,
            padding_free=False,
            pad_to_multiple_of=None,
            use_weighting=False,
            ld_alpha=None,
            f_divergence_type="reverse_kl",
            sync_ref_model=False,
            disable_dropout=True,
            dataset_num_proc=None,
        )
        if reference == "base":
            trainer = train_saved_adapter(DPOTrainer, args, model_dir, adapter_dir, pairs)
        else:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
            policy = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
            dataset = Dataset.from_list([dict(pair) for pair in pairs])
            trainer = DPOTrainer(model=policy, args=args, train_dataset=dataset, processing_class=tokenizer)
            assert "ref" in trainer.model.peft_config
            trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every log
            trainer.train()

    logs, adapter = trained(trainer, steps)
    data = trainer.train_dataset
    token_ids = [
        (list(p), list(c), list(r))
        for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True)
    ]
    if len(token_ids) != len(pairs):
        raise RuntimeError("TRL dropped pairs")
    return {"logs": logs, "adapter": adapter, "token_ids": token_ids}


def build_tiny_model(
    tokenizer_dir: str | Path, out_dir: str | Path, *, seed: int = 0, hidden: int = 64
) -> Path:
    """A random 2-layer LlamaForCausalLM (4 heads, 2 KV heads) with the vocabulary of the tokenizer in
    tokenizer_dir, saved with that tokenizer (and its chat template) to out_dir, a Hugging Face folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_peft_adapter(
    model_dir: str | Path, out_dir: str | Path, *, seed: int = 1, r: int = 4, alpha: int = 8
) -> Path:
    """A PEFT LoRA adapter on every linear layer but the head, with random non-zero A and B (so the policy
    differs from the base model from the start), saved to out_dir."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False
    )
    out = Path(out_dir)
    get_peft_model(base, config).save_pretrained(out)
    return out
