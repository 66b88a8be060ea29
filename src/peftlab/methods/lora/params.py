"""LoRA's `target_parameters` (HF PEFT's ParamWrapper): LoRA on an nn.Parameter, e.g. the 3-d expert tensors of MoE.

While the module computes, its parameter reads as W + s·ΔW (the module's own forward is unchanged: it still reads
`self.gate_up_proj`). A 2-d W (d_out, d_in) gets ΔW = B A as LoRA. A 3-d W (E, d1, d2) gets one rank-r update per
expert from lora_A (E·r, d_in) and lora_B (d_out, r·E) in HF PEFT's layouts: A's rows are expert-major
(row e·r + j), B's columns rank-major (column j·E + e). Experts stored (E, d_out, d_in) (read with F.linear, as
Mixtral's) have d_in = d2; those with `is_transposed` (E, d_in, d_out) have d_in = d1 and ΔW_e = (B_e A_e)ᵀ.
Several parameters of one module nest one wrapper per parameter, the first matched innermost, as PEFT nests them,
so saved keys are PEFT's: `experts.lora_A.weight` (the outer one) and `experts.base_layer.lora_A.weight`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn

from ...core.layer import AdaptedLayer, Adapter, unwrapped_fully
from ...core.tuner import set_submodule
from ...hf.defaults import LORA_TARGETS

_MISSING = object()


class LoraParameter(Adapter):
    """LoRA on one parameter of a module, applied by patching the parameter while the module runs."""
    mergeable = True
    patches_base = True
    saved_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, param: torch.Tensor, param_name: str, r: int, scale: float, init, transposed: bool):
        super().__init__()
        if param.dim() not in (2, 3):
            raise ValueError(f"target_parameters: {param_name} has {param.dim()} dimensions; LoRA adapts 2-d and 3-d "
                             f"parameters only")
        self.param_name, self.r, self.scale = param_name, r, scale
        self.experts = 1 if param.dim() == 2 else param.shape[0]
        self.transposed = param.dim() == 3 and transposed  # (E, d_in, d_out) storage
        d_out, d_in = param.shape[-2:] if not self.transposed else param.shape[-2:][::-1]
        self.lora_A = nn.Parameter(torch.empty(r * self.experts, d_in, dtype=param.dtype, device=param.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r * self.experts, dtype=param.dtype, device=param.device))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / r)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        if self.experts == 1:
            return self.scale * self.lora_B @ self.lora_A                            # (d_out, d_in)
        a = self.lora_A.reshape(self.experts, self.r, -1)                              # (E, r, d_in)
        b = self.lora_B.reshape(self.lora_B.shape[0], self.r, self.experts)            # (d_out, r, E)
        pattern = "ore,eri->eio" if self.transposed else "ore,eri->eoi"
        return torch.einsum(pattern, b, a) * self.scale

    def merge_into(self, base_layer: nn.Module) -> None:
        param = getattr(unwrapped_fully(base_layer), self.param_name)
        with torch.no_grad():
            param.data += self.delta_weight(base_layer).to(param.dtype)

    def unmerge_from(self, base_layer: nn.Module) -> None:
        param = getattr(unwrapped_fully(base_layer), self.param_name)
        with torch.no_grad():
            param.data -= self.delta_weight(base_layer).to(param.dtype)

    @contextlib.contextmanager
    def patch(self, base_layer: nn.Module) -> Iterator[None]:
        """While active, `owner.<param>` reads W + s·ΔW: an instance attribute shadows the registered Parameter
        (nn.Module looks parameters up only when ordinary attribute lookup fails), and is removed afterwards."""
        owner = unwrapped_fully(base_layer)
        before = owner.__dict__.get(self.param_name, _MISSING)
        current = getattr(owner, self.param_name)
        owner.__dict__[self.param_name] = current + self.delta_weight(base_layer).to(current.dtype)
        try:
            yield
        finally:
            if before is _MISSING:
                del owner.__dict__[self.param_name]
            else:
                owner.__dict__[self.param_name] = before


def targets_modules(model: nn.Module, config) -> bool:
    """Whether target_modules adapts modules too. With target_parameters, HF PEFT targets no module when
    target_modules is [] (or None on an architecture without default targets)."""
    if not config.target_parameters or config.target_modules:
        return True
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return config.target_modules is None and model_type in LORA_TARGETS


def parameter_targets(model: nn.Module, targets: list[str]) -> list[tuple[str, str]]:
    """(module name, parameter name) pairs, in HF PEFT's order: modules in order, each one's own parameters in
    registration order; a target matches `<module>.<param>` exactly or as a dotted suffix."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            continue  # its parameters belong to the module it wraps, reached below
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{_plain_name(name)}.{pname}"
            if any(key == t or key.endswith("." + t) for t in targets):
                if not name:
                    raise ValueError(f"target_parameters: {pname} belongs to the top-level model itself, which "
                                     f"cannot be wrapped; target a parameter of a submodule")
                out.append((_plain_name(name), pname))
    if not out:
        raise ValueError(f"target_parameters={targets} matched no parameter; give '<module>.<parameter>' names "
                         f"such as 'mlp.experts.gate_up_proj'")
    return out


def _plain_name(name: str) -> str:
    return name.replace(".base_layer", "")


def add_parameter_adapters(model: nn.Module, config, adapter_name: str, rank_and_scale) -> None:
    """Wrap every parameter config.target_parameters names, nesting wrappers for several on one module."""
    for module_name, pname in parameter_targets(model, list(config.target_parameters)):
        layer = _layer_for(model, module_name, pname)
        param = getattr(unwrapped_fully(layer.base_layer), pname)
        r, scale = rank_and_scale(config, f"{module_name}.{pname}")
        owner = unwrapped_fully(layer.base_layer)
        layer.add(adapter_name, LoraParameter(param, pname, r, scale, config.init_lora_weights,
                                              transposed=bool(getattr(owner, "is_transposed", False))))


def _layer_for(model: nn.Module, module_name: str, pname: str) -> AdaptedLayer:
    """The wrapper of this parameter from an earlier adapter, else a new outermost wrapper around the module."""
    module = model.get_submodule(module_name)
    probe = module
    while isinstance(probe, AdaptedLayer):
        if any(isinstance(a, LoraParameter) and a.param_name == pname for a in probe.adapters.values()):
            return probe
        if any(not isinstance(a, LoraParameter) for a in probe.adapters.values()):
            raise ValueError(f"target_parameters: {module_name} is also a target_modules target; a module is "
                             f"adapted one way: leave it out of target_modules (target_modules=[] targets none)")
        probe = probe.base_layer
    layer = AdaptedLayer(module)
    set_submodule(model, module_name, layer)
    return layer
