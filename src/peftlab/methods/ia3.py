"""(IA)³: learned vectors l (init 1) that rescale activations (Liu et al. 2022); mergeable as W ⊙ l.

Attention-side targets (k/v) scale the output, l ⊙ (W x + b), with l of shape (d_out, 1); feed-forward targets
scale the input, W (l ⊙ x), with l of shape (1, d_in). HF PEFT's IA3Config and file layout (`ia3_l` per layer).
Two (IA)³ adapters active on one feed-forward layer compose additively here (W(l1⊙x) + W((l2−1)⊙x)), where HF
PEFT multiplies them (W(l1⊙l2⊙x)); a single active adapter, mixed batches and merging match PEFT.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import PeftConfig
from ..core.layer import Adapter
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.targets import linear_features
from ..core.tuner import LayerTuner

# HF PEFT's per-architecture defaults: targets, and which of them are feed-forward (input-scaled).
IA3_TARGETS = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"], "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"], "deberta": ["in_proj", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"], "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"], "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"], "llama4": ["q_proj", "v_proj", "down_proj"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"], "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
}
IA3_FEEDFORWARD = {k: [v[-1]] for k, v in IA3_TARGETS.items()}  # the last entry of each list is the FFN output
IA3_FEEDFORWARD["mt5"] = []


@dataclass
class IA3Config(PeftConfig):
    peft_type: str = "IA3"
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    feedforward_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        ff, tm = self.feedforward_modules, self.target_modules
        if isinstance(ff, list) and isinstance(tm, list) and not set(ff) <= set(tm):
            raise ValueError(f"feedforward_modules {sorted(set(ff) - set(tm))} are not in target_modules {tm}; "
                             f"feedforward_modules must be a subset of target_modules")


def is_feedforward(config: IA3Config, module_name: str) -> bool:
    ff = config.feedforward_modules
    if isinstance(ff, str):
        return re.fullmatch(ff, module_name) is not None
    return any(module_name.endswith(k) for k in ff or [])  # HF PEFT: plain suffix match


class IA3Linear(Adapter):
    mergeable = True
    saved_names = {"ia3_l": "ia3_l"}

    def __init__(self, d_in: int, d_out: int, feedforward: bool, fan_in_fan_out: bool = False, init: bool = True):
        super().__init__()
        self.feedforward, self.fan_in_fan_out = feedforward, fan_in_fan_out
        self.fuses_base = feedforward  # the input is scaled before the base layer runs
        self.ia3_l = nn.Parameter(torch.randn((1, d_in) if feedforward else (d_out, 1)))
        if init:
            with torch.no_grad():
                self.ia3_l.fill_(1.0)

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: Optional[torch.Tensor]) -> torch.Tensor:
        l = self.ia3_l.flatten()
        if not self.feedforward:
            return (result * l).to(result.dtype)
        if result is None:
            return base_layer((x.to(l.dtype) * l).to(x.dtype))
        # The base output is already there (mixed batch, or another adapter ran first): by linearity
        # W(l⊙x) + b = result + W((l−1)⊙x).
        w = base_layer.weight.t() if self.fan_in_fan_out else base_layer.weight  # (d_out, d_in)
        return result + F.linear((x.to(l.dtype) * (l - 1)).to(w.dtype), w).to(result.dtype)

    def _scale(self, base_layer: nn.Module) -> torch.Tensor:
        """l shaped to broadcast against the stored weight (d_out×d_in, or d_in×d_out for Conv1D)."""
        l = self.ia3_l.detach()
        return l.t() if self.fan_in_fan_out else l

    @torch.no_grad()
    def merge_into(self, base_layer: nn.Module) -> None:
        w = base_layer.weight
        w.data = (w.data * self._scale(base_layer)).to(w.dtype)
        if not self.feedforward and base_layer.bias is not None:
            b = base_layer.bias
            b.data = (b.data * self.ia3_l.detach().view(-1)).to(b.dtype)

    @torch.no_grad()
    def unmerge_from(self, base_layer: nn.Module) -> None:
        # Division undoes the merge; the 1e-8 guard is HF PEFT's (a zero entry of l cannot be undone).
        w = base_layer.weight
        w.data = (w.data / (self._scale(base_layer) + 1e-8)).to(w.dtype)
        if not self.feedforward and base_layer.bias is not None:
            b = base_layer.bias
            b.data = (b.data / (self.ia3_l.detach().view(-1) + 1e-8)).to(b.dtype)


@register_tuner("IA3", IA3Config)
class IA3Tuner(LayerTuner):
    default_targets_table = IA3_TARGETS
    supports_weighted_combination = True

    def add_weighted_adapter(self, peft_model, adapters: list[str], weights: list[float], adapter_name: str,
                             options) -> None:
        """HF PEFT's (IA)³ combination: l = Σ_i w_i l_i per layer over the adapters that adapt it, on the union of
        their targets (and of their feed-forward modules). There is one kind; combination_type does not apply."""
        if options.combination_type not in (None, "linear"):
            raise ValueError(f"(IA)³ adapters combine as a weighted sum of their scaling vectors (HF PEFT's IA3 "
                             f"add_weighted_adapter); combination_type={options.combination_type!r} does not apply")
        configs = [peft_model.peft_config[a] for a in adapters]
        fields = {}
        for field in ("target_modules", "feedforward_modules"):
            values = [getattr(c, field) for c in configs]
            if len({isinstance(v, str) for v in values}) > 1:
                raise ValueError(f"add_weighted_adapter: the adapters' {field} mix regex strings and lists; give them "
                                 f"all as lists (or all as regexes)")
            fields[field] = ("|".join(f"(?:{v})" for v in values) if isinstance(values[0], str)
                             else sorted(set().union(*(v or [] for v in values))))
        with torch.random.fork_rng(devices=[]):   # the new vectors are overwritten below
            peft_model.add_adapter(adapter_name, configs[0].replace(**fields))
        for _, layer in self._layers_with(peft_model.model, adapter_name):
            with torch.no_grad():
                new = layer.adapters[adapter_name].ia3_l
                new.zero_()
                for a, w in zip(adapters, weights):
                    if a in layer.adapters:
                        new += layer.adapters[a].ia3_l * w

    def inject(self, model, config: IA3Config, adapter_name: str) -> None:
        if config.feedforward_modules is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in IA3_FEEDFORWARD:
                raise ValueError(f"no default feedforward_modules for model type {model_type!r}; pass "
                                 f"feedforward_modules explicitly (the targets whose input (IA)³ should scale, "
                                 f"e.g. ['down_proj'])")
            config.feedforward_modules = list(IA3_FEEDFORWARD[model_type])  # recorded, as HF PEFT does
        super().inject(model, config, adapter_name)

    def create_adapter(self, base_layer, config: IA3Config, module_name: str, adapter_name: str) -> Adapter:
        d_in, d_out, conv1d = linear_features("(IA)³", base_layer, module_name)
        return IA3Linear(d_in, d_out, is_feedforward(config, module_name), fan_in_fan_out=conv1d,
                         init=config.init_ia3_weights)


register_method(MethodInfo(
    "ia3", IA3Config, category="additive", kind="delta-weight", mergeable=True, hf_peft_compatible=True,
    default_lr=3e-3,
    description="learned vectors rescaling k/v outputs and feed-forward inputs; mergeable (Liu et al. 2022)"))
