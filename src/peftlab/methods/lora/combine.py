"""HF PEFT's `add_weighted_adapter` for LoRA: new adapters as weighted combinations of existing ones, every
combination type PEFT has (the task-tensor maths in core/task_merging.py)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...core.task_merging import CombineOptions, check_density, merge_task_tensors
from .layers import LoraEmbedding


# combination type -> (how the new adapter is built, the task-tensor merge: core/task_merging.py)
FACTORWISE = {"linear": "sum", "ties": "ties", "dare_linear": "dare_linear", "dare_ties": "dare_ties",
              "magnitude_prune": "magnitude_prune"}             # A's and B's merged separately (equal ranks)
THROUGH_SVD = {"svd": "sum", "ties_svd": "ties", "dare_linear_svd": "dare_linear", "dare_ties_svd": "dare_ties",
               "magnitude_prune_svd": "magnitude_prune"}          # the ΔW's merged, then truncated to svd_rank
COMBINATION_TYPES = (*FACTORWISE, "cat", *THROUGH_SVD)


def _rank(config) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def add_weighted_lora(tuner, peft_model, adapters: list[str], weights: list[float], adapter_name: str,
                      options: CombineOptions) -> None:
    """HF PEFT's combinations of LoRA adapters, every type. Factor-wise types ("linear", "ties", "dare_linear",
    "dare_ties", "magnitude_prune"; equal ranks) merge the A's weighted by sign(w·s)·√|w·s| and the B's by √|w·s|;
    "cat" stacks them (rank Σr, exact); the "*svd" types merge the ΔW's weighted by w and keep the top svd_rank
    (default max r) singular directions. The result has scale 1 (alpha = r)."""
    kind = "linear" if len(adapters) == 1 else (options.combination_type or "svd")
    configs = [peft_model.peft_config[a] for a in adapters]
    if any(c.use_dora for c in configs):
        raise ValueError("add_weighted_adapter cannot combine DoRA adapters (their update is not additive)")
    if any(c.trainable_token_indices or c.target_parameters for c in configs):
        raise ValueError("add_weighted_adapter combines low-rank factors only; it cannot combine adapters with "
                         "trainable_token_indices or target_parameters")
    ranks = [_rank(c) for c in configs]
    if kind in FACTORWISE:
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type={kind!r} merges the factors entry by entry and needs equal ranks, got "
                             f"{ranks}; use 'cat' or an '*svd' type")
        new_rank = ranks[0]
    elif kind == "cat":
        new_rank = sum(ranks)
    elif kind in THROUGH_SVD:
        new_rank = options.svd_rank or max(ranks)
    else:
        raise ValueError(f"combination_type must be one of {', '.join(COMBINATION_TYPES)}; got {kind!r}")
    merge = FACTORWISE.get(kind) or THROUGH_SVD.get(kind)
    if merge:
        check_density(merge, options.density)
    targets: set = set()
    for c in configs:
        targets |= {c.target_modules} if isinstance(c.target_modules, str) else set(c.target_modules)
    spec = "|".join(f"(?:{t})" for t in targets) if any(isinstance(c.target_modules, str) for c in configs) \
        else sorted(targets)
    with torch.random.fork_rng(devices=[]):   # its initial factors are overwritten; the generator is PEFT's below
        peft_model.add_adapter(adapter_name, configs[0].replace(
            r=new_rank, lora_alpha=new_rank, target_modules=spec, rank_pattern={}, alpha_pattern={},
            init_lora_weights=True, use_rslora=False))
    layers = [layer for _, layer in tuner._layers_with(peft_model.model, adapter_name)]
    _draw_like_peft_injection([layer.adapters[adapter_name] for layer in layers])
    for layer in layers:
        new = layer.adapters[adapter_name]
        parts = [(layer.adapters[a], w) for a, w in zip(adapters, weights) if a in layer.adapters]
        with torch.no_grad():
            new.lora_A.zero_()
            new.lora_B.zero_()
            if kind == "cat":  # layers missing some adapters keep zero rows/columns
                a = torch.cat([ad.lora_A * (w * ad.scale) for ad, w in parts], 0)
                b = torch.cat([ad.lora_B for ad, w in parts], 1)
                new.lora_A[: a.shape[0]] = a
                new.lora_B[:, : b.shape[1]] = b
            elif kind in FACTORWISE:
                new.lora_A.copy_(_factorwise([ad.lora_A for ad, _ in parts], [w * ad.scale for ad, w in parts],
                                             True, merge, options))
                new.lora_B.copy_(_factorwise([ad.lora_B for ad, _ in parts], [w * ad.scale for ad, w in parts],
                                             False, merge, options))
            else:
                a, b = _through_svd(layer, new, parts, new_rank, merge, options)
                new.lora_A.copy_(a)
                new.lora_B.copy_(b)


def _draw_like_peft_injection(new_adapters) -> None:
    """HF PEFT injects the new adapter before merging and its initialisation consumes the global CPU generator:
    per layer, in module order, nn.Linear's kaiming-uniform draw for A and for B, then A's init drawn again (an
    embedding: randn for A and B, then B's normal init). DARE then draws its masks. Consuming the generator the
    same way gives PEFT's masks for the same seed, and leaves the generator where PEFT leaves it."""
    for ad in new_adapters:
        a, b = ad.lora_A.shape, ad.lora_B.shape
        if isinstance(ad, LoraEmbedding):
            torch.randn(a), torch.randn(b), torch.empty(b).normal_()
        else:
            torch.empty(a).uniform_(), torch.empty(b).uniform_(), torch.empty(a).uniform_()


def _factorwise(factors: list[torch.Tensor], scaled_weights: list[float], signed: bool, merge: str,
                options: CombineOptions) -> torch.Tensor:
    """The A's (signed: sign(w·s)·√|w·s|) or the B's (√|w·s|) of the adapters, merged entry by entry."""
    roots = [math.sqrt(abs(w)) * (-1 if signed and w < 0 else 1) for w in scaled_weights]
    return merge_task_tensors([f.detach() for f in factors], torch.tensor(roots).to(factors[0].device), merge,
                              options.density, options.majority_sign_method).to(factors[0].dtype)


def _through_svd(layer, new, parts, rank: int, merge: str, options: CombineOptions):
    """(A, B) of rank `rank` from the merged ΔW's: U_r S_r and V_rᵀ, clamped to a quantile if svd_clamp."""
    deltas = [ad.delta_weight(layer.base_layer) for ad, _ in parts]
    delta = merge_task_tensors(deltas, torch.tensor([w for _, w in parts]).to(deltas[0].device), merge,
                               options.density, options.majority_sign_method)
    if getattr(new, "fan_in_fan_out", False) or isinstance(new, LoraEmbedding):
        delta = delta.t()  # back to (d_out, d_in) = (B, A) orientation
    u, sv, vh = torch.linalg.svd(delta, full_matrices=options.svd_full_matrices, driver=options.svd_driver)
    b, a = u[:, :rank] @ torch.diag(sv[:rank]), vh[:rank, :]
    if options.svd_clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), options.svd_clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return a, b
