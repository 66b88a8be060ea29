"""RoCoFT: train only k rows (or k columns) of each target weight (Kowsher et al. 2024).

W ∈ R^{d_out×d_in}; "row" trains W[:k, :] (k output neurons, k·d_in values), "column" trains W[:, :k]
(k input features, d_out·k values) — the first k, as the reference implementation does. Selective
(core/selective.py): the selected values are a small Parameter kept in the weight itself, so the trainable
count and the optimizer state are exactly the k rows/columns. Saved as `<module>.rocoft_values` (k×d_in or
d_out×k) and `<module>.rocoft_index`; optional `train_bias` adds the layer's bias (`<module>.bias`).
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

MODES = ("row", "column")


@dataclass
class RoCoFTConfig(PeftConfig):
    peft_type: str = "ROCOFT"
    rank: int = 1                   # k rows or columns per weight (the survey's RoCoFT-3row is rank=3)
    mode: str = "row"
    target_modules: Optional[Union[list[str], str]] = "all-linear"
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    train_bias: bool = False        # the reference also trains the adapted layers' biases when True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"RoCoFTConfig: rank (rows/columns per weight) must be >= 1, got {self.rank}")
        if self.mode not in MODES:
            raise ValueError(f"RoCoFTConfig: mode must be 'row' or 'column', got {self.mode!r}")


@register_tuner("ROCOFT", RoCoFTConfig)
class RoCoFTTuner(SelectiveTuner):
    peft_type = "ROCOFT"
    partial_prefix = "rocoft"

    def select(self, model: nn.Module, config: RoCoFTConfig) -> list[Selection]:
        out = []
        for name, module in linear_targets(model, config, "RoCoFT", "rows/columns"):
            fifo = type(module).__name__ == "Conv1D"
            d_out, d_in = weight_view(module, "weight", fifo).shape
            size = d_out if config.mode == "row" else d_in
            index = torch.arange(min(config.rank, size))
            out.append(Selection(name, "weight", "rows" if config.mode == "row" else "cols", index))
            if config.train_bias and isinstance(module._parameters.get("bias"), nn.Parameter):
                out.append(Selection(name, "bias", "whole"))
        return out


register_method(MethodInfo(
    "rocoft", RoCoFTConfig, category="selective", kind="selective", mergeable=True,
    default_lr=1e-2, rank_field="rank", description="train only k rows (or columns) of each target weight matrix"))
