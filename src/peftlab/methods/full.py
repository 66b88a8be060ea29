"""Full fine-tuning, the reference row: every parameter of the model trains (nothing frozen, nothing added).

Built on the selective core (core/selective.py) with every parameter selected whole, so it has the same
semantics as BitFit/LN-tuning: the model's tensors hold the tuned values (always "merged"; merge_and_unload()
returns the fine-tuned model), and a copy of the original weights is kept so disable_adapter(), unload() and
delete_adapter() give the base model back. That copy costs one more model's worth of memory (fp32: 4 bytes per
parameter) on top of full fine-tuning's own weights, gradients and two AdamW moments.

The saved "adapter" holds every parameter under its own name (tied weights once), peft_type "FULL"; it is as
large as the model. peftlab's CLI saves full fine-tuning as a plain Transformers model directory instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..core.config import PeftConfig
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.selective import SLOT, Selection, SelectiveTuner


@dataclass
class FullConfig(PeftConfig):
    peft_type: str = "FULL"


@register_tuner("FULL", FullConfig)
class FullTuner(SelectiveTuner):
    peft_type = "FULL"

    def select(self, model: nn.Module, config: FullConfig) -> list[Selection]:
        out = []
        # named_parameters() lists a tied tensor (lm_head = embed_tokens) once: selecting it twice would stash
        # and restore it twice, and the second restore would undo the first.
        for name, p in model.named_parameters():
            module_name, _, param = name.rpartition(".")
            if SLOT in name.split(".") or ".copies." in f".{name}":
                continue  # another adapter's own state
            out.append(Selection(module_name, param, "whole"))
        if not out:
            raise ValueError(f"{type(model).__name__} has no parameters to fine-tune")
        return out

    def whole_key(self, entry) -> str:
        return f"{entry.module_name}.{entry.param}" if entry.module_name else entry.param


register_method(MethodInfo(
    "full", FullConfig, category="full", kind="full", mergeable=True,
    default_lr=5e-5, saves="model",
    description="full fine-tuning of every parameter, the reference row (keeps a copy of the original weights)"))
