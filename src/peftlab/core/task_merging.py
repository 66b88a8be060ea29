"""Merging task tensors (per-adapter updates of one layer) into one: task arithmetic, TIES, DARE, magnitude pruning.

The combination types of HF PEFT's `add_weighted_adapter`, computed the way PEFT computes them so the results are
the same to the bit (and DARE draws the same random masks given the same torch seed):
- sum (task arithmetic, Ilharco et al. 2023):   Σ_i w_i τ_i
- magnitude_prune:  τ_i keeps its top-k entries by |·| (k = ⌊density · numel⌋), then Σ_i w_i τ_i
- ties (Yadav et al. 2023, "TIES-Merging"): trim as magnitude_prune; elect the sign per entry — the sign of Σ_i τ_i
  ("total") or of Σ_i sign(τ_i) ("frequency"), ties counted positive; disjoint mean: Σ_i w_i τ_i over the i whose
  sign agrees, divided by how many agree (at least 1)
- dare_linear / dare_ties (Yu et al. 2024, "DARE"): τ_i keeps each entry with probability density (Bernoulli,
  one draw per tensor in adapter order) and is rescaled by 1/density; then sum, or TIES' sign election and
  disjoint mean
The tensors are stacked on a new leading dimension in adapter order; weights is a 1-D tensor, one per tensor.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

@dataclass
class CombineOptions:
    """HF PEFT's add_weighted_adapter arguments, under its names (what PeftModel.add_weighted_adapter passes to the
    tuner of the adapters' method)."""
    combination_type: Optional[str] = None  # None: the method's default (LoRA: "svd", as PEFT's)
    svd_rank: Optional[int] = None
    svd_clamp: Optional[float] = None       # a quantile: the SVD factors are clamped to ±(that quantile)
    svd_full_matrices: bool = True
    svd_driver: Optional[str] = None        # CUDA's cuSOLVER method (torch.linalg.svd's driver)
    density: Optional[float] = None         # pruning types: the fraction of entries kept
    majority_sign_method: str = "total"     # ties types: "total" or "frequency"


KINDS = ("sum", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


def check_density(kind: str, density: Optional[float]) -> None:
    """A pruning kind needs density in [0, 1] (PEFT's argument); say so before anything is built."""
    if kind == "sum":
        return
    if density is None:
        raise ValueError(f"combination {kind!r} prunes the updates: give density=... (the fraction of entries kept, "
                         f"between 0 and 1)")
    if density < 0:
        raise ValueError(f"density must be >= 0 (the fraction of entries kept), got {density}")


def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """t with all but its ⌊density · numel⌋ largest-magnitude entries zeroed."""
    keep = torch.zeros_like(t).reshape(-1)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
    return t * keep.reshape(t.shape)


def prune_random(t: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """t with each entry kept with probability density (DARE's drop), divided by density when rescale."""
    kept = t * torch.bernoulli(torch.full_like(t, density))
    return kept / density if rescale else kept


def _prune(t: torch.Tensor, density: float, how: str) -> torch.Tensor:
    if density >= 1:
        warnings.warn(f"density {density} >= 1: nothing is pruned")
        return t
    return prune_magnitude(t, density) if how == "magnitude" else prune_random(t, density, rescale=True)


def elected_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Per entry, whether each task's sign agrees with the elected one (TIES' "elect"; ties count positive)."""
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1, -1)


def merge_task_tensors(tensors: list[torch.Tensor], weights: torch.Tensor, kind: str = "sum",
                       density: Optional[float] = None, majority_sign_method: str = "total") -> torch.Tensor:
    """One tensor from the per-task tensors (see the module docstring for each kind)."""
    if kind not in KINDS:
        raise ValueError(f"merge kind must be one of {KINDS}, got {kind!r}")
    if kind != "sum":
        check_density(kind, density)
        how = "magnitude" if kind in ("ties", "magnitude_prune") else "random"
        tensors = [_prune(t, density, how) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))
    if kind in ("ties", "dare_ties"):
        agree = elected_sign_mask(stacked, majority_sign_method)
        return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)
    return weighted.sum(dim=0)
