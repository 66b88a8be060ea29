"""LN-tuning: train only the normalisation layers' parameters (Zhao et al. 2023); HF PEFT's LN_TUNING file format.

Selective (core/selective.py): the norms' own weights (and biases) train in place. HF PEFT instead trains a
deep copy of each norm (`ln_tuning_layers`); the computed function is the same, and the file is PEFT's:
`<module>.ln_tuning_layers.<param>` for every parameter of each targeted norm, peft_type "LN_TUNING".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch.nn as nn

from ..core.config import PeftConfig
from ..core.layer import innermost
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.selective import Selection, SelectiveTuner
from ..core.targets import resolve_targets

# HF PEFT's default norms per architecture (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING).
LN_TARGETS: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"], "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"], "gptj": ["ln_1", "ln_f"],
    "phi": ["input_layernorm", "final_layernorm"],
    "qwen2": ["post_attention_layernorm"], "qwen3": ["post_attention_layernorm"],
    # not in HF PEFT's table: BERT-style encoders name their norms LayerNorm
    "bert": ["LayerNorm"], "roberta": ["LayerNorm"],
}


@dataclass
class LNTuningConfig(PeftConfig):
    peft_type: str = "LN_TUNING"
    target_modules: Optional[Union[list[str], str]] = None   # None: the architecture's norms (LN_TARGETS)
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[Union[list[str], str]] = None


@register_tuner("LN_TUNING", LNTuningConfig)
class LNTuningTuner(SelectiveTuner):
    peft_type = "LN_TUNING"

    def whole_key(self, entry) -> str:
        return f"{entry.module_name}.ln_tuning_layers.{entry.param}"

    def select(self, model: nn.Module, config: LNTuningConfig) -> list[Selection]:
        out = []
        for name in resolve_targets(model, config, default_table=LN_TARGETS):
            name, module = innermost(model, name)
            params = [p for p, t in module._parameters.items() if t is not None]
            if not params:
                raise ValueError(f"LN-tuning: target {name} ({type(module).__name__}) has no parameters to tune "
                                 f"(a norm without elementwise affine?); exclude it or pick other target_modules")
            out += [Selection(name, p, "whole") for p in params]
        return out


register_method(MethodInfo(
    "ln-tuning", LNTuningConfig, category="selective", kind="selective", mergeable=True, hf_peft_compatible=True,
    default_lr=1e-3, description="train only the normalisation layers' weights and biases (HF PEFT's LN_TUNING)"))
