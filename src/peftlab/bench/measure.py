"""What a trained cell costs, measured on its model: training memory, where it acts, adapter size, step time,
inference latency against the frozen base (timing.interleaved: CPU-time ratios, so rows compare on a noisy VM)."""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from .timing import interleaved

# Which part of a Transformers model a trained tensor lives in, from its name (the survey's "where applied"
# column). Checked in order: a prompt encoder's tensors are "input" even though they sit beside attention.
_SITES = [("input", r"prompt_encoder|prompt_embeddings|prefix|virtual"),
          ("head", r"classifier|score\.|lm_head|qa_outputs|pooler"),
          ("embeddings", r"embed|wte|wpe|word_embeddings|position_embeddings|token_type"),
          ("norm", r"norm|ln_|LayerNorm"),
          ("attention", r"attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value"),
          ("FFN", r"mlp|intermediate|output\.dense|ffn|fc|up_proj|down_proj|gate_proj")]


def where_applied(model) -> list[str]:
    """The model parts that hold trainable tensors (a head trained beside every method is not counted)."""
    found = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            site = next((s for s, pat in _SITES if re.search(pat, name)), "other")
            found.add(site)
    found.discard("head")
    order = [s for s, _ in _SITES] + ["other"]
    return sorted(found, key=order.index) or ["head only"]


def dir_bytes(path) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.device)


def training_memory(model, batch: dict) -> dict:
    """Bytes a training step holds at its peak: on CUDA the allocator's peak over one step; on CPU an account of
    weights + gradients + AdamW's two moments (fp32) + the tensors autograd saves in forward (counted once per
    storage, parameters excluded). Why an account on CPU: the process's RSS only grows across the cells of one
    process, and on a shared VM it moves with the allocator, not with the method."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    optim = sum(2 * p.numel() * 4 for p in trainable)
    dev = params[0].device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        model(**batch).loss.backward()
        peak = torch.cuda.max_memory_allocated(dev) + optim
        model.zero_grad(set_to_none=True)
        return {"peak_bytes": int(peak), "weights": weights, "grads": grads, "optimizer": optim, "how": "cuda"}
    param_keys = {_storage_key(p) for p in params}
    seen: dict = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            key = _storage_key(t)
            if key not in param_keys and key not in seen:
                seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    saved = sum(seen.values())
    return {"peak_bytes": int(weights + grads + optim + saved), "weights": weights, "grads": grads,
            "optimizer": optim, "activations": saved, "how": "accounted"}


def _frozen_step(model, batch):
    def step():
        model(**batch).loss.backward()
        for p in model.parameters():
            p.grad = None
    return step


def _forward(model, batch):
    def fwd():
        with torch.inference_mode():
            model(**batch)
    return fwd


def step_time(model, base, batch: dict, rounds: int) -> dict:
    """A training step (forward + backward, no optimizer) of the adapted model over the frozen base's step with
    input gradients on (the physical limit of any method that leaves the base frozen)."""
    model.train()
    base.train()
    hook = base.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    try:
        r = interleaved({"base": _frozen_step(base, batch), "method": _frozen_step(model, batch)}, "base",
                        rounds=rounds, warmup=1, verbose=False)
    finally:
        hook.remove()
        base.eval()
    return {"ratio": r["method"]["ratio"], "sec": r["method"]["sec"], "base_sec": r["base"]["sec"],
            "iqr": list(r["method"]["iqr"])}


def latency(model, base, batch: dict, rounds: int, mergeable: bool) -> dict:
    """Inference forward of the model as trained (unmerged) and, where the method declares it mergeable, with the
    adapter merged into the weights, each over the base forward."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    out = {"unmerged": interleaved({"base": _forward(base, inputs), "m": _forward(model, inputs)}, "base",
                                   rounds=rounds, verbose=False)["m"]["ratio"], "merged": None}
    if mergeable:
        with merged(model):
            out["merged"] = interleaved({"base": _forward(base, inputs), "m": _forward(model, inputs)}, "base",
                                        rounds=rounds, verbose=False)["m"]["ratio"]
    return out


@contextlib.contextmanager
def merged(model):
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()
