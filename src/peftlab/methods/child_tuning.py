"""Child-tuning_D: train only the weights with the largest Fisher information on the task data (Xu et al. 2021).

Fisher F = (1/B) Σ_batches g², with g each target weight's gradient of the task loss, its norm clipped to 1 per
tensor first (as the reference does); the child network is F ≥ the (1 − reserve_p) quantile of all target
entries together. The reference multiplies the gradient by this fixed mask inside AdamW; here the mask is
structural (core/selective.py: only the selected entries are a Parameter), which trains the same entries and
also keeps weight decay and optimizer state off the rest (the reference still decays them).

Use: `compute_fisher_mask(model, config, data)` before `get_peft_model(model, config)`; the file holds
`<module>.child_tuning_mask` (bool, d_out×d_in) and `<module>.child_tuning_values` (one per selected entry).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from ..core.calibration import device_of, iter_batches, model_inputs
from ..core.config import PeftConfig
from ..core.quantized import refuse_quantized_weight
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.selective import Selection, SelectiveTuner
from ..core.targets import linear_targets

MASK_ATTR = "_peftlab_child_tuning_mask"   # set on each target module by compute_fisher_mask, taken by inject


@dataclass
class ChildTuningConfig(PeftConfig):
    peft_type: str = "CHILD_TUNING"
    reserve_p: float = 0.3          # share of the target weights in the child network (paper: 0.1–0.3)
    target_modules: Optional[Union[list[str], str]] = "all-linear"
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.reserve_p <= 1.0:
            raise ValueError(f"ChildTuningConfig: reserve_p must be in (0, 1], got {self.reserve_p}")

    @property
    def calibration_data(self) -> str:
        return "task"  # the Fisher information of the task's own batches picks the child network

    def prepare(self, model: nn.Module, data: Any, **kwargs) -> None:
        """The task-data step get_peft_model needs first (the trainer calls it with task batches)."""
        compute_fisher_mask(model, self, data, **kwargs)


def _quantile(values: torch.Tensor, q: float) -> float:
    """numpy.percentile's linear interpolation, by partial sort (torch.quantile refuses > 16M elements)."""
    v = values.detach().cpu().numpy()
    pos = q * (v.size - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    part = np.partition(v, [lo, hi])
    return float(part[lo] + (part[hi] - part[lo]) * (pos - lo))


def compute_fisher_mask(model: nn.Module, config: ChildTuningConfig, data: Any, *, batch_size: int = 8,
                        max_samples: Optional[int] = None, tokenizer=None) -> dict[str, torch.Tensor]:
    """Fisher information of the target weights on `data`; marks the top `reserve_p` entries for inject.

    `data`: batches/rows with labels (causal LMs without labels use their input_ids, padding ignored); any
    form core/calibration.py accepts. Returns {module name: bool mask (d_out, d_in)}.
    """
    targets = linear_targets(model, config, "Child-tuning", "entries")
    for name, module in targets:
        refuse_quantized_weight("Child-tuning", name, module)
    weights = [m.weight for _, m in targets]
    saved = {p: p.requires_grad for p in model.parameters()}
    fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    device, batches = device_of(model), 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        for batch in iter_batches(data, batch_size=batch_size, tokenizer=tokenizer, max_samples=max_samples):
            inputs = model_inputs(model, batch, device)
            if "labels" not in inputs:
                mask = inputs.get("attention_mask")
                ids = inputs["input_ids"]
                inputs["labels"] = ids if mask is None else ids.masked_fill(mask == 0, -100)
            loss = getattr(model(**inputs), "loss", None)
            if loss is None:
                raise ValueError("Child-tuning's Fisher mask needs a task loss: give batches with labels")
            loss.backward()
            for f, w in zip(fisher, weights):
                if w.grad is not None:
                    torch.nn.utils.clip_grad_norm_(w, 1.0)
                    f += w.grad.float() ** 2
                    w.grad = None
            batches += 1
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
    if batches == 0:
        raise ValueError("Child-tuning: the task data gave no batches; the Fisher mask needs some task data")
    fisher = [f / batches for f in fisher]
    threshold = _quantile(torch.cat([f.flatten() for f in fisher]), 1.0 - config.reserve_p)
    masks = {}
    for (name, module), f in zip(targets, fisher):
        mask = f >= threshold
        mask = mask.t() if type(module).__name__ == "Conv1D" else mask   # as (d_out, d_in)
        setattr(module, MASK_ATTR, mask.contiguous())
        masks[name] = mask
    return masks


@register_tuner("CHILD_TUNING", ChildTuningConfig)
class ChildTuningTuner(SelectiveTuner):
    peft_type = "CHILD_TUNING"
    partial_prefix = "child_tuning"

    def select(self, model: nn.Module, config: ChildTuningConfig) -> list[Selection]:
        out = []
        for name, module in linear_targets(model, config, "Child-tuning", "entries"):
            # No mask yet (loading a saved adapter): a pending selection, filled from the file; a forward before
            # that raises a clear error instead of training nothing.
            mask = module.__dict__.pop(MASK_ATTR, None)
            out.append(Selection(name, "weight", "mask", mask))
        return out


register_method(MethodInfo(
    "child-tuning", ChildTuningConfig, category="selective", kind="selective", mergeable=True,
    default_lr=5e-5,
    description="Child-tuning_D: train only the weight entries with the largest Fisher information on task data"))
