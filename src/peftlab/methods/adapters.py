"""Bottleneck adapters: sequential (Houlsby et al. 2019) and parallel (He et al. 2021), zero-initialised.

  sequential: h ← h + s·up(act(down(h))), h the output of the attention output projection and/or of the last
              feed-forward projection (before the residual add)
  parallel:   FFN(x) + s·up(act(down(x))), x the feed-forward *input*: read where the FFN starts (`ffn_in`),
              added where it ends (`ffn_out`); module names come from the table in hf/modules.py
`up` starts at zero, so the adapted model equals the base model at step 0. Not mergeable: act() sits between
down and up, so there is no weight to fold it into (inference pays for the extra matmuls).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..core.config import PeftConfig
from ..core.layer import AdaptedLayer, Adapter
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.targets import resolve_targets
from ..core.tuner import LayerTuner, adapted_layers, set_submodule
from ..hf.modules import block_modules, layout_of

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh,
               "identity": nn.Identity}


@dataclass
class BottleneckFields(PeftConfig):
    """A bottleneck adapter's size, activation, scale and layers: BottleneckConfig's fields bar the layout
    (adapter_type, placement, target_modules). MAM and UniPELT compose these fields and fix the layout, handing
    `as_bottleneck_config(config, **layout)` to inject_bottlenecks."""
    bottleneck_size: int = 64
    non_linearity: str = "relu"
    scaling: float = 1.0
    adapter_dropout: float = 0.0
    layers_to_transform: Optional[Union[list[int], int]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bottleneck_size <= 0:
            raise ValueError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity {self.non_linearity!r} is not one of {', '.join(ACTIVATIONS)}")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")


@dataclass
class BottleneckConfig(BottleneckFields):
    peft_type: str = "BOTTLENECK"
    adapter_type: str = "sequential"          # "sequential" (Houlsby) or "parallel" (He et al.)
    placement: str = "both"                   # sequential only: after "attention", "ffn" or "both"
    target_modules: Optional[Union[list[str], str]] = None  # sequential only: explicit modules instead of the table

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter_type not in ("sequential", "parallel"):
            raise ValueError(f"adapter_type must be 'sequential' or 'parallel', got {self.adapter_type!r}")
        if self.placement not in ("attention", "ffn", "both"):
            raise ValueError(f"placement must be 'attention', 'ffn' or 'both', got {self.placement!r}")
        if self.adapter_type == "parallel" and self.target_modules is not None:
            raise ValueError("target_modules applies to sequential adapters; a parallel adapter always sits "
                             "beside the feed-forward block (see peftlab.hf.modules)")


def as_bottleneck_config(cfg: BottleneckFields, **layout: Any) -> BottleneckConfig:
    """cfg's bottleneck fields as a BottleneckConfig laid out as `layout` says (adapter_type, placement): the
    adapter part of a hybrid config."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(BottleneckFields) if f.name != "peft_type"}
    return BottleneckConfig(**shared, **layout)


def _not_mergeable(*_):
    raise TypeError("a bottleneck adapter computes up(act(down(h))): the nonlinearity between its projections means "
                    "it cannot be merged into the base weights; keep it unmerged (inference pays for its matmuls)")


class _Slot:
    """Hands the FFN input from the tap at `ffn_in` to the parallel adapter at `ffn_out` (same adapter name,
    so in a mixed batch both see the same rows)."""
    __slots__ = ("value",)

    def __init__(self):
        self.value = None


class InputTap(Adapter):
    """Records the input of its layer for a parallel adapter further on; changes nothing, holds no tensors."""

    merge_into = _not_mergeable

    def __init__(self, slot: _Slot):
        super().__init__()
        self._slot = slot

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        self._slot.value = x
        return result


class Bottleneck(Adapter):
    """result + s·up(act(down(h))), h = the layer output (sequential) or the tapped FFN input (parallel).
    With `gate` (UniPELT) the added term is scaled per token by sigmoid(gate(h))."""
    merge_into = _not_mergeable

    def __init__(self, d: int, r: int, act: str = "relu", dropout: float = 0.0, scaling: float = 1.0,
                 source: Optional[_Slot] = None, gate: bool = False):
        super().__init__()
        self.adapter_down = nn.Linear(d, r)   # nn.Linear's default (Kaiming-uniform) init
        self.adapter_up = nn.Linear(r, d)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.act = ACTIVATIONS[act]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_gate = nn.Linear(d, 1) if gate else None
        self.scaling = scaling
        self._source = source

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        if self._source is None:
            h = result
        else:
            h, self._source.value = self._source.value, None
            if h is None:
                raise RuntimeError("parallel adapter: its feed-forward input was not recorded; the module named "
                                   "as ffn_in in peftlab.hf.modules does not run before ffn_out in this model")
        h = h.to(self.adapter_down.weight.dtype)
        delta = self.adapter_up(self.dropout(self.act(self.adapter_down(h)))) * self.scaling  # (..., d)
        if self.adapter_gate is not None:
            delta = delta * torch.sigmoid(self.adapter_gate(h))                               # (..., 1)
        return result + delta.to(result.dtype)


def out_features(module: nn.Module, model: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":
        return module.nf
    return model.config.hidden_size


def adapted(model: nn.Module, name: str) -> AdaptedLayer:
    """The AdaptedLayer at `name`, wrapping the module there first if needed."""
    module = model.get_submodule(name)
    if not isinstance(module, AdaptedLayer):
        module = AdaptedLayer(module)
        set_submodule(model, name, module)
    return module


def adapter_sites(model: nn.Module, cfg: BottleneckConfig) -> list[tuple[Optional[str], str]]:
    """(module whose input the adapter reads or None for its own output, module whose output it adds to)."""
    layers = cfg.layers_to_transform
    layers = [layers] if isinstance(layers, int) else layers
    if cfg.adapter_type == "parallel":
        lay = layout_of(model)
        reads, writes = block_modules(model, lay.ffn_in, layers), block_modules(model, lay.ffn_out, layers)
        if len(reads) != len(writes):
            raise ValueError(f"module table mismatch: {len(reads)} '{lay.ffn_in}' vs {len(writes)} '{lay.ffn_out}'")
        return list(zip(reads, writes))
    if cfg.target_modules is not None:
        return [(None, n) for n in resolve_targets(model, cfg)]
    lay = layout_of(model)
    suffixes = {"attention": [lay.attn_out], "ffn": [lay.ffn_out], "both": [lay.attn_out, lay.ffn_out]}
    return [(None, n) for s in suffixes[cfg.placement] for n in block_modules(model, s, layers)]


def inject_bottlenecks(model: nn.Module, cfg: BottleneckConfig, adapter_name: str, gate: bool = False) -> None:
    """Add one bottleneck adapter per site (MAM and UniPELT too, with their adapter_config())."""
    for read, write in adapter_sites(model, cfg):
        slot = None
        if read is not None:
            slot = _Slot()
            adapted(model, read).add(adapter_name, InputTap(slot))
        layer = adapted(model, write)
        adapter = Bottleneck(out_features(layer.base_layer, model), cfg.bottleneck_size, cfg.non_linearity,
                             cfg.adapter_dropout, cfg.scaling, source=slot, gate=gate)
        layer.add(adapter_name, adapter.to(LayerTuner._device_of(layer.base_layer)))


@register_tuner("BOTTLENECK", BottleneckConfig)
class BottleneckTuner(LayerTuner):
    def inject(self, model, config, adapter_name):
        inject_bottlenecks(model, config, adapter_name)

    def _layers_with(self, model, adapter_name, taps: bool = False):
        # Taps hold no tensors: leave them out of saving/loading, but not out of removal.
        for name, layer in adapted_layers(model):
            if adapter_name in layer.adapters and (taps or not isinstance(layer.adapters[adapter_name], InputTap)):
                yield name, layer

    def remove(self, model, adapter_name):
        for name, layer in list(self._layers_with(model, adapter_name, taps=True)):
            layer.remove(adapter_name)
            if not len(layer.adapters):
                set_submodule(model, name, layer.base_layer)


_ADAPTER = dict(config_cls=BottleneckConfig, category="additive", kind="activation", mergeable=False,
                hf_peft_compatible=False, identity_at_init=True, default_lr=1e-3, dropout_field="adapter_dropout")
register_method(MethodInfo("adapter-sequential", preset={"adapter_type": "sequential"}, **_ADAPTER,
                           description="Houlsby bottleneck adapters after attention and FFN outputs, zero-init up"))
register_method(MethodInfo("adapter-parallel", preset={"adapter_type": "parallel", "scaling": 4.0}, **_ADAPTER,
                           description="scaled parallel bottleneck adapter beside each FFN (He et al. 2021)"))
