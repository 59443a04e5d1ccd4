"""Tiny randomly initialised models built from configs (no download), shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def _tiny_decoder(config_cls, model_cls, seed: int, vocab: int, hidden: int, tied: bool = False):
    torch.manual_seed(seed)
    cfg = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return model_cls(cfg).eval()


def tiny_llama(seed: int = 0, vocab: int = 128, hidden: int = 32, tied: bool = False):
    """`tied`: the output head shares the input embedding's weight (as SmolLM2's does)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny_decoder(LlamaConfig, LlamaForCausalLM, seed, vocab, hidden, tied)


TIE_KINDS = {  # ensure_weight_tying: what the adapter names -> (targets, modules_to_save)
    "lora-embedding": (["q_proj", "embed_tokens"], None),
    "lora-head": (["q_proj", "lm_head"], None),
    "saved-embedding": (["q_proj"], ["embed_tokens"]),
    "saved-head": (["q_proj"], ["lm_head"]),
}


def tied_llama():
    """tiny_llama whose head is its input embedding (as SmolLM2's)."""
    model = tiny_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def tied_config(kind: str, **kw):
    """A LoraConfig with ensure_weight_tying on the tied pair as TIE_KINDS[kind] names it (r=4, alpha=8)."""
    from lorakit import LoraConfig

    targets, saved = TIE_KINDS[kind]
    saved = kw.pop("modules_to_save", saved)
    return LoraConfig(r=4, alpha=8, targets=targets, modules_to_save=saved, ensure_weight_tying=True, **kw)


def tiny_qwen2(seed: int = 0, vocab: int = 128, hidden: int = 64):
    """A Qwen2: no RoPE row interleaving in GGUF, and biases on q, k and v."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _tiny_decoder(Qwen2Config, Qwen2ForCausalLM, seed, vocab, hidden)


def tiny_mistral(window: int = 4):
    """A Mistral whose sliding window (default 4) is shorter than the test rows: the window must reach the kernel."""
    from transformers import MistralConfig, MistralForCausalLM

    model = _tiny_decoder(MistralConfig, MistralForCausalLM, 0, 128, 32)
    model.config.sliding_window = window
    return model


SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The seven projections of a Llama-family block."""


def every_kind_of_lora():
    """A LoraConfig with every per-layer scale lorakit must get right: rsLoRA, a rank and an alpha pattern, and
    an embedding target beside the seven projections."""
    from lorakit import LoraConfig

    return LoraConfig(
        r=4,
        alpha=8,
        targets=[*SEVEN, "embed_tokens"],
        use_rslora=True,
        rank_pattern={"v_proj": 2, "layers.1.mlp.up_proj": 6},
        alpha_pattern={"down_proj": 3.0},
    )


def tiny_gpt2(seed: int = 0, vocab: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


class ConvNet(nn.Module):
    """Embedding, Conv1d, Conv2d and Linear in one plain PyTorch model."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(20, 8)
        self.conv1 = nn.Conv1d(8, 12, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(1, 6, kernel_size=3, stride=1, padding=1, dilation=1)
        self.head = nn.Linear(12 + 6 * 4 * 12, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).transpose(1, 2)  # (b, 8, t)
        c1 = self.conv1(h)  # (b, 12, t)
        c2 = self.conv2(c1[:, None, :4, :])  # (b, 6, 4, t)
        return self.head(torch.cat([c1.mean(-1), c2.flatten(1)], dim=1))


def token_rows(n: int = 24, seq: int = 10, vocab: int = 128, seed: int = 0, prompt: int = 3):
    """`n` random training rows of `seq` tokens whose first `prompt` tokens are not learned."""
    from lorakit.data.tokenize import IGNORE, Encoded

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        row = torch.randint(0, vocab, (seq,), generator=g).tolist()
        out.append(Encoded(row, [IGNORE] * prompt + row[prompt:]))
    return out


def ids(batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def first_layers(model: nn.Module, n: int) -> nn.Module:
    """`model` (a Hugging Face decoder) cut to its first `n` decoder layers, in place: for a real-model test that
    looks only at those layers' inputs, the layers after them are work without a check."""
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]
    return model


def randomize(model: nn.Module, std: float = 0.1, seed: int = 3) -> None:
    """Give every adapter parameter a random value so that adapters change the output."""
    from lorakit import adapter_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * std)


def each_row_alone(model: nn.Module, x: torch.Tensor, names) -> torch.Tensor:
    """The logits of each row of `x` run alone, row i with adapter `names[i]` active (None: adapters disabled),
    concatenated: what a mixed-adapter batch (`row_adapters`) must equal."""
    import lorakit

    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name is None:
                with lorakit.disabled(model):
                    rows.append(model(x[i : i + 1]).logits)
            else:
                lorakit.set_active(model, name)
                rows.append(model(x[i : i + 1]).logits)
    return torch.cat(rows)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict, to check later that a refused operation left the model as it was."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Whether `model` has the same state-dict keys and values as at `snapshot`."""
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def inspect_stdout(path) -> str:
    """What `lorakit inspect PATH` prints (it must succeed)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "lorakit", "inspect", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def cli_here(capsys, *args: str):
    """`lorakit ARGS` run in this process through the console script's entry point (without the seconds a new
    Python takes to import torch): a subprocess.CompletedProcess with its exit code and what it printed."""
    import subprocess

    from lorakit import cli

    capsys.readouterr()  # what the test printed before
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse's own errors and --help
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["lorakit", *args], code or 0, out.out, out.err)


def both_ways_with_peft(make, cfg, folder, x: torch.Tensor, *, std: float = 0.1, atol: float = 1e-5) -> None:
    """lorakit's adapter (random values of `std`) loads in PEFT, and PEFT's (perturbed the same way) in lorakit,
    with the same logits on `x` within `atol`; the adapter must move the logits by more than 1e-3. Writes
    `folder`/ours and `folder`/peft."""
    import peft

    import lorakit

    model = make()
    lorakit.inject(model, cfg)
    randomize(model, std=std)
    with torch.no_grad():
        ours = model(x).logits
        with lorakit.disabled(model):
            assert (model(x).logits - ours).abs().max() > 1e-3, "the adapter must change the output"
        lorakit.save_adapter(model, folder / "ours")
        theirs = peft.PeftModel.from_pretrained(make(), folder / "ours").eval()(x).logits
        torch.testing.assert_close(theirs, ours, atol=atol, rtol=0)
        pm = peft.get_peft_model(make(), peft_config(cfg))
        perturb_peft(pm, std=std)
        theirs = pm.eval()(x).logits
        pm.save_pretrained(folder / "peft")
        back = make()
        lorakit.load_adapter(back, folder / "peft")
        torch.testing.assert_close(back(x).logits, theirs, atol=atol, rtol=0)


def peft_config(cfg):
    """The `peft.LoraConfig` that means the same as lorakit's `cfg` (built from our PEFT json mapping)."""
    import peft

    d = cfg.to_peft_dict()
    return peft.LoraConfig(**{k: v for k, v in d.items() if k not in ("peft_type", "inference_mode")})


def perturb_peft(model: nn.Module, std: float, seed: int = 0) -> None:
    """Add Gaussian noise to every LoRA tensor of a PEFT model, so the adapter is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or ".modules_to_save." in n or "trainable_tokens_delta" in n:
                p.add_(torch.randn(p.shape, generator=g) * std)


def graph_names(t: torch.Tensor) -> set[str]:
    """The class names of every autograd node behind `t` (e.g. "_SiluMulBackward")."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def nf4_weights(shape, dtype, seed=0):
    """Weights that exercise NF4's edge cases: an all-zero block, exact ±absmax values, an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    flat[:64] = 0  # an all-zero block (absmax 0)
    flat[64:128] = torch.linspace(-1, 1, 64) * 0.05  # exact ±absmax and evenly spread values
    flat[200] = 0.3  # an outlier
    return w.to(dtype)


def linear_of(w: torch.Tensor, bias: bool = False) -> nn.Linear:
    """An nn.Linear holding weight `w` (out, in)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def word_tokenizer():
    """A word-level tokenizer with an EOS but no pad token (six words: enough for save, load and a prompt)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "the": 4, "cat": 5}
    backend = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def refused_untouched(model: nn.Module, error: type[Exception], words: str, act) -> None:
    """`act()` raises `error` matching `words`, in one line, and leaves `model` as it was: the same state dict and
    no lorakit registry."""
    import pytest

    before = snapshot(model)
    with pytest.raises(error, match=words) as e:
        act()
    assert "\n" not in str(e.value)
    assert unchanged(model, before) and "_lorakit" not in model.__dict__


def served_as_offline(base, folder, names) -> None:
    """`lorakit serve`'s engine, its bank loading the adapters saved at `folder`/<name>: one batch whose rows use
    `names` (None: the base) gives each row offline greedy generation's 12 tokens (each a fresh `base()` with eos 1
    and pad 0, the adapter loaded by load_adapter). Each adapter must change its row's tokens from the base's, or
    the comparison would prove nothing."""
    import queue

    def make():
        model = base()
        model.generation_config.eos_token_id = model.config.eos_token_id = 1
        model.generation_config.pad_token_id = model.config.pad_token_id = 0
        return model

    from fsdp_worker import char_tokenizer

    import lorakit
    from lorakit.bank import AdapterBank
    from lorakit.serve.engine import Engine, EngineConfig
    from lorakit.serve.requests import Done, GenRequest, SamplingParams

    prompts = [
        torch.randint(10, 100, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        for n in (20, 14, 9, 11, 17)[: len(names)]
    ]
    jobs = list(zip(names, prompts, strict=True))
    want = []
    for name, prompt in jobs:
        offline = make()
        if name is not None:
            lorakit.load_adapter(offline, folder / name, name)
        out = offline.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        want.append(out[0, len(prompt) :].tolist())
    plain = make()
    for (name, prompt), tokens in zip(jobs, want, strict=True):
        out = plain.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert name is None or tokens != out[0, len(prompt) :].tolist(), f"adapter {name} changes no token"
    served = make()
    bank = AdapterBank(served)
    for name in {n for n in names if n is not None}:
        bank.load(name, folder / name)
    eng = Engine(served, char_tokenizer(), bank, EngineConfig(max_batch=4, wait_ms=0, prefix_cache_bytes=0))
    eng.start()
    try:
        queues = []
        for name, prompt in jobs:
            events = queue.Queue()
            params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
            eng.submit(GenRequest(list(prompt), name, params, events.put))
            queues.append(events)
        got = []
        for events in queues:
            tokens = []
            while not isinstance(ev := events.get(timeout=120), Done):
                tokens += [e.token for e in getattr(ev, "logprobs", ())]
            got.append(tokens)
    finally:
        eng.stop()
    assert got == want


def learned_text(tok, enc) -> str:
    """The text of the tokens an encoded example's labels learn (lorakit.data.tokenize.Encoded)."""
    from lorakit.data.tokenize import IGNORE

    return tok.decode([i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE])


def write_jsonl(path, rows):
    """`rows` as a JSON Lines file at `path`; returns the path."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
