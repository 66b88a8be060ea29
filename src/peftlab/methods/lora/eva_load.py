"""Putting an EVA state dict ({module: A of its new rank}) into a PeftModel's LoRA adapter, as HF PEFT does.

A layer whose rank changed gets a fresh adapter of that rank (B zero), rank 0 removes the adapter, and the config
is rewritten the way PEFT writes it: rank_pattern and alpha_pattern by full module name (alpha·r'/r when
adjust_scaling_factors), and target_modules the adapted modules (condensed to suffixes from 20 modules on).
Layers the state dict lacks (LoRA on embeddings, which EVA does not initialise) keep their init.
"""
from __future__ import annotations

import warnings

import torch

from ...core.registry import get_tuner
from ...core.targets import minimal_suffixes, pattern_value
from ...core.tuner import adapted_layers, set_submodule
from .layers import LoraEmbedding, LoraLinear

PEFT_PREFIX = "base_model.model."  # PEFT's module names in a PeftModel, which eva_state_dict keys use
MIN_TARGETS_TO_CONDENSE = 20  # PEFT's MIN_TARGET_MODULES_FOR_OPTIMIZATION


def load_eva_state_dict(model, eva_state_dict: dict, adapter_name: str) -> None:
    cfg = model.peft_config[adapter_name]
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in eva_state_dict.items()}
    layers = [(n, layer) for n, layer in adapted_layers(model.model) if adapter_name in layer.adapters
              and isinstance(layer.adapters[adapter_name], (LoraLinear, LoraEmbedding))]
    initialised, missing, rank_pattern, alpha_pattern = [], [], {}, {}
    for name, layer in layers:
        r = pattern_value(cfg.rank_pattern, name, cfg.r)
        alpha = pattern_value(cfg.alpha_pattern, name, cfg.lora_alpha)
        if name not in state or not isinstance(layer.adapters[adapter_name], LoraLinear):
            missing.append(name)
            new_rank = r
        else:
            a = state.pop(name)
            new_rank = a.shape[0]
            if new_rank == 0:
                _drop(model, name, layer, adapter_name)
                continue
            if new_rank != r and cfg.eva_config.adjust_scaling_factors:
                alpha *= new_rank / r              # keeps alpha/r: every layer's update on the same scale
            _set_a(cfg, name, layer, adapter_name, a, new_rank, alpha)
            initialised.append(name)
        if new_rank != cfg.r:
            rank_pattern[name] = new_rank
        if alpha != cfg.lora_alpha:
            alpha_pattern[name] = alpha
    _rewrite_config(model, cfg, initialised + missing)
    cfg.rank_pattern, cfg.alpha_pattern = rank_pattern, alpha_pattern
    model.set_adapter(model.active_adapters)  # the new adapters train; sibling groups are rebuilt
    if state:
        warnings.warn(f"EVA: the state dict names {len(state)} module(s) without this LoRA adapter, ignored: "
                      f"{sorted(state)[:3]}", stacklevel=3)
    if missing:
        warnings.warn(f"EVA initialised no A for {missing} (EVA covers LoRA on Linear/Conv1D layers); they keep "
                      f"their init_lora_weights=True-style init", stacklevel=3)


def _drop(model, name: str, layer, adapter_name: str) -> None:
    """Rank 0: the layer gets no adapter (the base layer again if it had no other)."""
    layer.remove(adapter_name)
    if not len(layer.adapters):
        set_submodule(model.model, name, layer.base_layer)


def _set_a(cfg, name: str, layer, adapter_name: str, a: torch.Tensor, new_rank: int, alpha) -> None:
    old = layer.adapters[adapter_name]
    if new_rank != old.r:
        one = cfg.replace(r=new_rank, lora_alpha=alpha, rank_pattern={}, alpha_pattern={})
        fresh = get_tuner(cfg.peft_type).create_adapter(layer.base_layer, one, name, adapter_name)
        layer.add(adapter_name, fresh.to(device=old.lora_A.device, dtype=old.lora_A.dtype))
    adapter = layer.adapters[adapter_name]
    if tuple(a.shape) != tuple(adapter.lora_A.shape):
        raise ValueError(f"EVA: the state dict's A for {name} is {tuple(a.shape)}, the layer needs "
                         f"(rank, {adapter.lora_A.shape[1]}); was it computed for another model?")
    adapter.lora_A.copy_(a)


def _rewrite_config(model, cfg, adapted: list[str]) -> None:
    """target_modules as PEFT writes it after EVA: the adapted modules, condensed when there are many."""
    if len(adapted) < MIN_TARGETS_TO_CONDENSE:
        cfg.target_modules = adapted
        return
    inside = tuple(n + "." for n in adapted)
    others = [n for n, _ in model.model.named_modules() if n not in set(adapted) and not n.startswith(inside)]
    cfg.target_modules = sorted(minimal_suffixes(adapted, others))
