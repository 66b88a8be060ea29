"""HF PEFT's adapter status reports: TunerLayerStatus per adapted layer / head copy, TunerModelStatus for a model.

The dataclasses have PEFT's fields and meanings (peft.peft_model.TunerLayerStatus / TunerModelStatus); layer names
are relative to `PeftModel.base_model`, as PEFT's are (`model.model.layers.0.self_attn.q_proj`). A model-level
value that differs between layers is reported as "irregular", as in PEFT.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Union

import torch.nn as nn

from .layer import AdaptedLayer, ModulesToSave
from .registry import config_class_for, get_tuner
from .targets import is_linear_like

if TYPE_CHECKING:
    from .model import PeftModel

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Optional[str]


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular]


def _same(values, empty=None):
    """The one value all layers share, or "irregular"."""
    distinct = {v if not isinstance(v, list) else tuple(v) for v in values}
    if not distinct:
        return empty
    if len(distinct) > 1:
        return "irregular"
    v = distinct.pop()
    return list(v) if isinstance(v, tuple) else v


def _grad(flags: list) -> Union[bool, Irregular]:
    return True if all(f is True for f in flags) else False if all(f is False for f in flags) else "irregular"


def _per_adapter(modules: dict[str, nn.Module]) -> tuple[dict, dict]:
    """(requires_grad, devices) per adapter name, over each adapter's parameters (devices: buffers too)."""
    grads = {n: _grad([p.requires_grad for p in m.parameters()]) for n, m in modules.items()
             if any(True for _ in m.parameters())}
    devices = {n: sorted({t.device.type for t in [*m.parameters(), *m.buffers()]}) for n, m in modules.items()}
    return grads, {n: d for n, d in devices.items() if d}


def _module_type(pm: "PeftModel", layer: AdaptedLayer) -> str:
    # PEFT's repr names, e.g. "lora.Linear" / "lora.Embedding": the method's module, then the base layer's kind.
    first = next(iter(layer.adapters), None)
    kind = "Linear" if is_linear_like(layer.base_layer) else type(layer.base_layer).__name__
    peft_type = pm.peft_config[first].peft_type if first in pm.peft_config else "adapter"
    return f"{peft_type.lower()}.{kind}"


def _layer(pm: "PeftModel", name: str, module: nn.Module) -> TunerLayerStatus:
    if isinstance(module, AdaptedLayer):
        grads, devices = _per_adapter(dict(module.adapters))
        return TunerLayerStatus(name, _module_type(pm, module), not module.disabled, list(module.active),
                                list(module.merged), grads, sorted(module.adapters), devices, None)
    grads, devices = _per_adapter(dict(module.copies))
    active = [module.active] if module.active in module.copies else []
    return TunerLayerStatus(name, "ModulesToSaveWrapper", not module.disabled, active, [], grads,
                            sorted(module.copies), devices, None)


def _check_layered(pm: "PeftModel", what: str) -> None:
    prompt = sorted(n for n, c in pm.peft_config.items() if get_tuner(c.peft_type).is_prompt_learning)
    if prompt:
        raise TypeError(f"{what}() got a PeftModel with prompt-learning adapters {prompt}: they add virtual tokens "
                        f"instead of adapter layers, so there is no layer status to report (as in HF PEFT)")


def layer_status(pm: "PeftModel", root: Optional[nn.Module] = None) -> list[TunerLayerStatus]:
    """Layer names relative to `root`: PeftModel.base_model (PEFT's), or the model itself when adapted in place."""
    _check_layered(pm, "get_layer_status")
    out = [_layer(pm, name, m) for name, m in (root if root is not None else pm.base_model).named_modules()
           if isinstance(m, (AdaptedLayer, ModulesToSave))]
    if not out:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you "
                         "have PEFT adapters injected in the model. (Selective methods such as BitFit train the "
                         "model's own tensors and have no adapter layers.)")
    return out


def _merged(layers: list[TunerLayerStatus]) -> Union[list[str], Irregular]:
    merged = sorted({a for s in layers for a in s.merged_adapters})
    if any(set(merged) & (set(s.available_adapters) - set(s.merged_adapters)) for s in layers):
        return "irregular"  # merged on some layer, unmerged on another that has it
    return merged


def _adapter_model_type(pm: "PeftModel") -> str:
    # PEFT's tuner class names follow the config's: LoraConfig -> LoraModel, IA3Config -> IA3Model
    name = pm.active_adapter or next(iter(pm.peft_config), None)
    if name is None:
        return "None"
    return config_class_for(pm.peft_config[name].peft_type).__name__.removesuffix("Config") + "Model"


def model_status(pm: "PeftModel", plain: Optional[str] = None, root: Optional[nn.Module] = None) -> TunerModelStatus:
    """PEFT's summary; `plain` is the base-model type to report for a model adapted in place (`root`; PEFT reports
    such a model's adapter_model_type as "None" and its peft_types as {})."""
    layers = layer_status(pm, root)
    trainable, total = pm.get_nb_trainable_parameters()
    grads, devices = collections.defaultdict(list), collections.defaultdict(set)
    for s in layers:
        for k, v in s.requires_grad.items():
            grads[k].append(v)
        for k, v in s.devices.items():
            devices[k].update(v)
    return TunerModelStatus(
        base_model_type=plain or type(pm.model).__name__,
        adapter_model_type="None" if plain else _adapter_model_type(pm),
        peft_types={} if plain else {n: c.peft_type for n, c in pm.peft_config.items()},
        trainable_params=trainable, total_params=total, num_adapter_layers=len(layers),
        enabled=_same(s.enabled for s in layers), active_adapters=_same((s.active_adapters for s in layers), []),
        merged_adapters=_merged(layers), requires_grad={k: _grad(v) for k, v in grads.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={k: sorted(v) for k, v in devices.items()},
        quantization_backend=_same(s.quantization_backend for s in layers))
