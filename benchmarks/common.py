"""Shared benchmark helpers: SmolLM2-135M-shaped models, adapted copies sharing one frozen base, interleaved timing.

Timing method (issue 6): `interleaved` lives in the library (peftlab.bench.timing, shared with `peftlab bench`):
all modes in ONE process take turns step by step, CPU time, each step against the reference steps beside it,
median of rounds.
"""
from __future__ import annotations

import os

# OpenMP threads that spin-wait at barriers burn CPU time while the other thread is descheduled by a
# neighbour, which makes process_time() wander by 2×; set before torch loads (importing peftlab loads it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from peftlab.bench.timing import interleaved, timed  # noqa: E402,F401  (re-exported for the benchmark scripts)

import contextlib
import copy
import sys
from typing import Callable

import torch

SMOL_SHAPES = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                   tie_word_embeddings=True, rms_norm_eps=1e-5)


def setup_torch(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def base_model(real: bool = True, layers: int | None = None):
    """SmolLM2-135M: the real embedded model, or a LlamaConfig with its shapes and random weights."""
    if real and layers is None:
        try:
            from peftlab.models import load_model
            model, _ = load_model("smollm2-135m")
            return model.float().eval()
        except Exception as e:  # no cached copy: the shapes are what matter for timing
            print(f"[note] real SmolLM2 unavailable ({type(e).__name__}: {e}); using random weights", file=sys.stderr)
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(SMOL_SHAPES)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    return model.float().eval()


def shared_copy(model):
    """A structural copy of `model` whose parameters and buffers are the very same tensors (frozen base shared)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def input_grad_hook(model) -> None:
    """Make the embedding output require grad, so every layer computes its input gradient (frozen-base limit)."""
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))


def frozen_copy(base):
    """The frozen-base reference: `base`'s weights, nothing trainable, input gradients on from the embeddings."""
    frozen = shared_copy(base)
    for p in frozen.parameters():
        p.requires_grad_(False)
    input_grad_hook(frozen)
    return frozen


def body_step(model, ids, grad) -> Callable[[], None]:
    """A step of the decoder stack alone (no LM head, no loss): forward, then backward of a fixed output gradient."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = inner.model
    # calling the inner model bypasses PeftModel.forward, so bracket the pass for sibling fusion here
    fusion = model.siblings.forward_pass if hasattr(model, "siblings") else lambda _: contextlib.nullcontext()

    def step():
        with fusion(body):
            out = body(input_ids=ids).last_hidden_state
        out.backward(grad)
        for p in model.parameters():
            p.grad = None
    return step


def randomize(model, seed: int = 0, std: float = 0.02) -> None:
    """Non-zero adapter weights (B starts at zero; a zero B must not make any path look cheaper)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad or "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)


def make_adapted(base, lib: str, kind: str, r: int = 16, adapters: int = 1, seed: int = 0):
    """An adapted copy of `base` (weights shared). lib: 'peftlab' | 'peft'; kind: 'lora' | 'dora'."""
    model = shared_copy(base)
    if lib == "peftlab":
        import peftlab as lib_mod
    else:
        import peft as lib_mod
    cfg = lambda: lib_mod.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0,
                                     use_dora=(kind == "dora"))
    pm = lib_mod.get_peft_model(model, cfg(), adapter_name="a0")
    for i in range(1, adapters):
        pm.add_adapter(f"a{i}", cfg())
    randomize(pm, seed)
    return pm


def train_step(model, batch) -> Callable[[], None]:
    def step():
        out = model(**batch)
        out.loss.backward()
        for p in model.parameters():
            p.grad = None
    return step


def token_batch(batch: int, seq: int, vocab: int = 49152, seed: int = 0, labels: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids}
    if labels:
        out["labels"] = ids.clone()
    return out


def print_table(title: str, results: dict[str, dict], targets: dict[str, str] | None = None) -> None:
    targets = targets or {}
    print(f"\n{title}")
    print("| mode | CPU s/step (median) | ratio vs reference (median of step ratios) | middle half (IQR) "
          "| spread (min–max) | ratio of fastest steps | target |")
    print("|---|---|---|---|---|---|---|")
    for n, r in results.items():
        print(f"| {n} | {r['sec']:.3f} | {r['ratio']:.3f} | {r['iqr'][0]:.3f}–{r['iqr'][1]:.3f} "
              f"| {min(r['ratios']):.3f}–{max(r['ratios']):.3f} | {r['min_ratio']:.3f} | {targets.get(n, '')} |")
    sys.stdout.flush()


def env_line() -> str:
    import transformers
    try:
        import peft
        pv = peft.__version__
    except Exception:
        pv = "n/a"
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {pv}, "
            f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
