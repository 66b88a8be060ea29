"""PaFi (Liao, Meng & Monz 2023, "Parameter-Efficient Fine-Tuning without Introducing New Latency"): train only the
pre-trained weight entries of smallest magnitude.

The mask is task-agnostic — it depends on the pre-trained weights alone, so every task of one base shares it:
over the target weight matrices (default: every linear layer of the transformer blocks), the
k = ⌊density · (their total size)⌋ entries with the smallest |W| train (scope "global", our reading of the paper's
sorting of all candidate weights), or each matrix's own ⌊density · numel⌋ smallest (scope "per_matrix"); ties
broken by position. Selective (core/selective.py "mask"): the trainable count and optimizer state are exactly the
selected entries, the tuned values live in W itself (no added latency; always merged). The file holds
`<module>.pafi_mask` and `<module>.pafi_values`; loading takes the file's mask (the one it was trained with).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from ..core.config import PeftConfig
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.selective import Selection, SelectiveTuner, weight_view
from ..core.targets import linear_targets

SCOPES = ("global", "per_matrix")


@dataclass
class PafiConfig(PeftConfig):
    peft_type: str = "PAFI"
    density: float = 0.005            # share of the target weights that trains (0.5%)
    scope: str = "global"             # "global": smallest over all targets together; "per_matrix": within each
    target_modules: Optional[Union[list[str], str]] = "all-linear"
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"PafiConfig: density (the share of weights that trains) must be in (0, 1], got "
                             f"{self.density}")
        if self.scope not in SCOPES:
            raise ValueError(f"PafiConfig: scope must be one of {SCOPES}, got {self.scope!r}")


def smallest_magnitude_masks(weights: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """{name: bool mask} of the entries of smallest |w| (see the module docstring); weights as (d_out, d_in)."""
    if scope == "per_matrix":
        return {n: _bottom_k(w.abs().reshape(-1), int(density * w.numel())).view_as(w) for n, w in weights.items()}
    flat = torch.cat([w.detach().abs().float().reshape(-1) for w in weights.values()])
    chosen = _bottom_k(flat, int(density * flat.numel()))
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = chosen[start: start + w.numel()].view_as(w)
        start += w.numel()
    return out


def _bottom_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k smallest values; stable sort, so equal values are taken in position order."""
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if k > 0:
        mask[torch.sort(values.detach().float(), stable=True).indices[:k]] = True
    return mask


@register_tuner("PAFI", PafiConfig)
class PafiTuner(SelectiveTuner):
    peft_type = "PAFI"
    partial_prefix = "pafi"

    def select(self, model: nn.Module, config: PafiConfig) -> list[Selection]:
        weights = {name: weight_view(module, "weight", type(module).__name__ == "Conv1D")
                   for name, module in linear_targets(model, config, "PaFi", "entries")}
        masks = smallest_magnitude_masks(weights, config.density, config.scope)
        return [Selection(name, "weight", "mask", mask) for name, mask in masks.items()]


register_method(MethodInfo(
    "pafi", PafiConfig, category="selective", kind="selective", mergeable=True, default_lr=1e-3,
    description="train only the pre-trained weight entries of smallest magnitude: a task-agnostic sparse mask "
                "(Liao et al. 2023)"))
