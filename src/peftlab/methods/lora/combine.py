"""HF PEFT's `add_weighted_adapter` for LoRA: new adapters as weighted combinations of existing ones."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .layers import LoraEmbedding


def add_weighted_lora(tuner, peft_model, adapters: list[str], weights: list[float], adapter_name: str,
                      combination_type: str = "svd", svd_rank: Optional[int] = None) -> None:
    """HF PEFT's combinations of LoRA adapters: "linear" (same rank; A, B weighted by √(w·s)), "cat" (rank
    Σr, exact), "svd" (Σ w·ΔW truncated to svd_rank or max r). The result has scale 1 (alpha = r)."""
    configs = [peft_model.peft_config[a] for a in adapters]
    if any(c.use_dora for c in configs):
        raise ValueError("add_weighted_adapter cannot combine DoRA adapters (their update is not additive)")
    if any(c.trainable_token_indices or c.target_parameters for c in configs):
        raise ValueError("add_weighted_adapter combines low-rank factors only; it cannot combine adapters with "
                         "trainable_token_indices or target_parameters")
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = [c.r for c in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' needs equal ranks, got {ranks}; use 'cat' or 'svd'")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type == "svd":
        new_rank = svd_rank or max(ranks)
    else:
        raise ValueError(f"combination_type must be 'linear', 'cat' or 'svd', got {combination_type!r}")
    targets: set = set()
    for c in configs:
        targets |= {c.target_modules} if isinstance(c.target_modules, str) else set(c.target_modules)
    spec = "|".join(f"(?:{t})" for t in targets) if any(isinstance(c.target_modules, str) for c in configs) \
        else sorted(targets)
    peft_model.add_adapter(adapter_name, configs[0].replace(
        r=new_rank, lora_alpha=new_rank, target_modules=spec, rank_pattern={}, alpha_pattern={},
        init_lora_weights=True, use_rslora=False))
    for _, layer in tuner._layers_with(peft_model.model, adapter_name):
        new = layer.adapters[adapter_name]
        parts = [(layer.adapters[a], w) for a, w in zip(adapters, weights) if a in layer.adapters]
        with torch.no_grad():
            if combination_type == "cat":  # layers missing some adapters keep zero rows/columns
                a = torch.cat([ad.lora_A * (w * ad.scale) for ad, w in parts], 0)
                b = torch.cat([ad.lora_B for ad, w in parts], 1)
                new.lora_A.zero_()[: a.shape[0]] = a
                new.lora_B.zero_()[:, : b.shape[1]] = b
            elif combination_type == "linear":
                root = [math.sqrt(abs(w * ad.scale)) for ad, w in parts]
                sign = [1.0 if w * ad.scale >= 0 else -1.0 for ad, w in parts]
                new.lora_A.copy_(sum(r * g * ad.lora_A for (ad, _), r, g in zip(parts, root, sign)))
                new.lora_B.copy_(sum(r * ad.lora_B for (ad, _), r in zip(parts, root)))
            else:
                delta = sum(w * ad.delta_weight(layer.base_layer) for ad, w in parts)
                if getattr(new, "fan_in_fan_out", False) or isinstance(new, LoraEmbedding):
                    delta = delta.t()  # back to (d_out, d_in) = (B, A) orientation
                u, sv, vh = torch.linalg.svd(delta, full_matrices=True)
                new.lora_B.copy_(u[:, :new_rank] @ torch.diag(sv[:new_rank]))
                new.lora_A.copy_(vh[:new_rank, :])
