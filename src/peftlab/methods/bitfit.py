"""BitFit: train only the bias terms (Ben Zaken et al. 2021); optionally add zero biases to bias-free models.

Selective (core/selective.py): the model's own biases train in place; the adapter file holds only them, under
their own names (`<module>.bias`). LLaMA-style models have no biases at all: by default that is an error that
says so; `add_bias=True` adds zero-initialised biases to the target linear layers (the model is unchanged at
step 0), which unload() removes again and merge_and_unload() keeps (declaring them in the HF config where it
has LLaMA's `attention_bias` / `mlp_bias` switches, so the merged model saves and reloads with them).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch.nn as nn

from ..core.config import PeftConfig
from ..core.layer import PeftlabModule, innermost
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.selective import SLOT, Selection, SelectiveTuner
from ..core.targets import is_linear_like, output_head_names, resolve_targets


@dataclass
class BitFitConfig(PeftConfig):
    peft_type: str = "BITFIT"
    # None: every bias in the model (attention, FFN, norms), except the output head; with add_bias, also every
    # linear layer without one. A list/regex restricts both to the matching modules.
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    add_bias: bool = False


def _candidates(model: nn.Module, config: BitFitConfig) -> list[str]:
    if config.target_modules is not None:
        return resolve_targets(model, config)
    heads = output_head_names(model, config.task_type)
    names = [n for n, m in model.named_modules() if n and n not in heads and SLOT not in n.split(".")
             and (isinstance(m._parameters.get("bias"), nn.Parameter) or (config.add_bias and is_linear_like(m)))]
    if not names:
        return []
    # exclude_modules, layers_to_transform and modules_to_save filter them as they filter any target list.
    return resolve_targets(model, config.replace(target_modules=names))


@register_tuner("BITFIT", BitFitConfig)
class BitFitTuner(SelectiveTuner):
    peft_type = "BITFIT"

    def select(self, model: nn.Module, config: BitFitConfig) -> list[Selection]:
        try:
            names = _candidates(model, config)
        except ValueError:
            names = []
        out, seen = [], set()
        for name in names:
            name, module = innermost(model, name)
            if id(module) in seen or isinstance(module, PeftlabModule):
                continue
            seen.add(id(module))
            if isinstance(module._parameters.get("bias"), nn.Parameter):
                out.append(Selection(name, "bias", "whole"))
            elif config.add_bias and is_linear_like(module):
                out.append(Selection(name, "bias", "new"))
        if not out:
            what = "the targeted modules" if config.target_modules is not None else "this model"
            raise ValueError(
                f"BitFit: {what} ({type(model).__name__}) has no bias parameters, so there is nothing for BitFit "
                f"to train (LLaMA-style models are bias-free). Pass BitFitConfig(add_bias=True) (CLI: --set "
                f"add_bias=true) to add zero-initialised biases to the linear layers (the model is unchanged at "
                f"step 0), or choose another method.")
        return out

    def merge_and_unload(self, model: nn.Module) -> None:
        added = [e.module_name for _, _, _, e in self.entries(model) if e.kind == "new" and e.applied]
        super().merge_and_unload(model)
        if not added:
            return
        cfg = getattr(model, "config", None)
        flags = {"attention_bias": r"\.self_attn\.", "mlp_bias": r"\.mlp\."}
        undeclared = []
        for name in added:
            flag = next((f for f, pat in flags.items() if re.search(pat, name) and hasattr(cfg, f)), None)
            if flag:
                setattr(cfg, flag, True)   # other layers the flag covers get zero biases on reload
            else:
                undeclared.append(name)
        if undeclared:
            warnings.warn(f"BitFit added biases to {len(undeclared)} layer(s) (e.g. {undeclared[0]}) that this "
                          f"model's config does not declare; a model saved from here may drop them on reload",
                          stacklevel=3)


register_method(MethodInfo(
    "bitfit", BitFitConfig, category="selective", kind="selective", mergeable=True,
    default_lr=1e-3,
    description="train only the bias terms (add_bias=True adds zero biases to bias-free models such as LLaMA)"))
