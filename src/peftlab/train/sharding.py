"""FSDP2 for parameter-efficient training: the frozen base sharded, the (small) trainable state replicated.

`--fsdp` under torch.distributed applies `torch.distributed.fsdp.fully_shard` to every transformer block (the
model's `_no_split_modules` classes, as HF's FSDP auto-wrap does) and then to the Transformers model itself, with
every trainable tensor passed as `ignored_params`. So:
- the frozen base weights — what dominates a PEFT run's memory — live 1/N per rank and are all-gathered one
  block at a time for its forward (and again for its backward), then freed;
- adapters, trained biases/norms and heads stay ordinary replicated tensors, so the classic FSDP pitfall of
  frozen and trainable tensors in one flat shard does not arise, and the optimizer, checkpoints and
  save_pretrained work exactly as in a single-process run (rank 0 writes);
- their gradients are averaged over the ranks by `average_gradients` (one flattened all-reduce per step, what
  DDP would do for them), since FSDP does not reduce ignored parameters.
Every forward now needs every rank (each holds part of every block), so evaluation under --fsdp runs on all
ranks in lockstep (the same examples; rank 0 reports) instead of on rank 0 alone as under DDP.
Not supported (refused by `check_shardable` with the reason): bitsandbytes-quantised bases (FSDP2 would shard
the packed uint8 storage apart from its quantisation state) and input methods (prompt/prefix tuning look up
token embeddings outside the model's forward, where FSDP keeps them sharded). Use DDP for those.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..core.model import PeftModel
from ..core.quantized import is_quantized
from .loop import _hf_model


def check_shardable(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks to shard, after refusing what FSDP2 cannot shard here (with what to use instead)."""
    hf = _hf_model(model)
    if any(is_quantized(m) for m in hf.modules()):
        raise ValueError("--fsdp: FSDP2 cannot shard a bitsandbytes-quantised base (it would split the packed "
                         "weights from their quantisation state); train QLoRA with DDP (--nproc N without --fsdp)")
    if isinstance(model, PeftModel) and model.rewrites_inputs:
        raise ValueError("--fsdp: prompt, prefix and P-tuning methods look up token embeddings outside the "
                         "model's forward, where FSDP2 keeps them sharded; use DDP (--nproc N without --fsdp)")
    block_names = set(getattr(hf, "_no_split_modules", None) or ())
    blocks = [m for m in hf.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"--fsdp: {type(hf).__name__} names no transformer block class (_no_split_modules) to "
                         f"shard by; use DDP (--nproc N without --fsdp)")
    return blocks


def shard_frozen_base(model: nn.Module) -> None:
    """fully_shard every block, then the Transformers model, keeping every trainable tensor out of the shards."""
    from torch.distributed.fsdp import fully_shard
    blocks = check_shardable(model)
    trainable = {p for p in model.parameters() if p.requires_grad}
    for block in blocks:
        fully_shard(block, ignored_params=trainable)
    fully_shard(_hf_model(model), ignored_params=trainable)


@torch.no_grad()
def average_gradients(params: list[torch.Tensor], dist, world: int) -> None:
    """Average the replicated trainable tensors' gradients over the ranks, as DDP does (one flat all-reduce;
    a tensor without a gradient on this rank counts as zeros, so every rank sends the same layout)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(g).clone()
        offset += n
