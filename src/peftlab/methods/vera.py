"""VeRA: one frozen random pair A, B shared by all adapted layers, per-layer trainable scaling vectors (Kopiczko et al.).

y = W x + λ_b ⊙ B(λ_d ⊙ A x); A (r×d_in_max), B (d_out_max×r) Kaiming-uniform from a seeded generator, sized to
the largest adapted layer and sliced per layer; λ_d (r,) init d_initial, λ_b (d_out,) init 0 (model unchanged).
HF PEFT's VeraConfig and file layout: per layer `vera_lambda_b` / `vera_lambda_d`, and with save_projection the
shared `base_model.vera_A` / `base_model.vera_B` (adapter-level keys, see core.tuner.ABSOLUTE_KEY).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import PeftConfig
from ..core.layer import Adapter
from ..core.loading import check_shape
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.targets import linear_features, resolve_targets
from ..core.tuner import ABSOLUTE_KEY, LayerTuner
from ..hf.defaults import LORA_TARGETS

VERA_TARGETS = {**LORA_TARGETS, "phi": ["q_proj", "v_proj"]}  # HF PEFT's VeRA table differs only for phi
SHARED_KEYS = ("base_model.vera_A", "base_model.vera_B")


@dataclass
class VeraConfig(PeftConfig):
    peft_type: str = "VERA"
    r: int = 256
    target_modules: Optional[Union[list[str], str]] = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if not 0.0 <= self.vera_dropout < 1.0:
            raise ValueError(f"vera_dropout must be in [0, 1), got {self.vera_dropout}")
        if self.bias not in ("none", "all"):
            raise ValueError(f"VeraConfig: bias={self.bias!r} is not supported by peftlab; use 'none' or 'all'")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform as well")
        if not self.save_projection:
            warnings.warn("save_projection=False: vera_A/vera_B are not saved and will be regenerated from "
                          "projection_prng_key on load, which may differ across torch versions/platforms",
                          stacklevel=2)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    # Kaiming-uniform with gain √2 over fan_in = shape[1], drawn from the given generator (reproducible).
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The shared frozen A (r×d_in_max) and B (d_out_max×r). One instance per adapter name, registered as a
    child of each of its layers' adapters: `.to()`/deepcopy keep it a single tensor pair. Non-persistent
    buffers, so per-layer state_dicts never duplicate it; the tuner saves it once at adapter level."""

    def __init__(self, r: int, d_in: int, d_out: int, seed: int):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", _kaiming_uniform((r, d_in), g), persistent=False)  # A first, then B:
        self.register_buffer("vera_B", _kaiming_uniform((d_out, r), g), persistent=False)  # HF PEFT's draw order


class VeraLinear(Adapter):
    mergeable = True
    saved_names = {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}

    def __init__(self, d_in: int, d_out: int, r: int, projections: VeraProjections, d_initial: float,
                 dropout: float = 0.0, fan_in_fan_out: bool = False, init: bool = True):
        super().__init__()
        self.d_in, self.d_out, self.fan_in_fan_out = d_in, d_out, fan_in_fan_out
        self.vera_lambda_b = nn.Parameter(torch.ones(d_out))
        self.vera_lambda_d = nn.Parameter(torch.randn(r))
        if init:
            with torch.no_grad():
                self.vera_lambda_d.fill_(d_initial)
                self.vera_lambda_b.zero_()
        self.projections = projections
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _sliced(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.projections
        return p.vera_A[:, : self.d_in].to(device), p.vera_B[: self.d_out, :].to(device)  # (r, d_in), (d_out, r)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        A, B = self._sliced(self.vera_lambda_d.device)
        delta = (self.vera_lambda_b.float()[:, None] * B.float()) @ (self.vera_lambda_d.float()[:, None] * A.float())
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        A, B = self._sliced(x.device)
        h = self.dropout(x.to(self.vera_lambda_d.dtype))
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(h, A), B)  # (N, r) then (N, d_out)
        return (result + update).to(result.dtype)


@register_tuner("VERA", VeraConfig)
class VeraTuner(LayerTuner):
    default_targets_table = VERA_TARGETS
    _projections: Optional[VeraProjections] = None  # set only during inject()

    def inject(self, model, config: VeraConfig, adapter_name: str) -> None:
        # The shared pair is sized to the largest target, so the targets are resolved once up front.
        names = resolve_targets(model, config, module_filter=self.target_filter, default_table=VERA_TARGETS)
        dims = [linear_features("VeRA", model.get_submodule(n), n)[:2] for n in names]
        if not dims:
            raise ValueError(f"VeRA found no Linear/Conv1D layer among the targets {names}")
        d_in, d_out = max(d for d, _ in dims), max(d for _, d in dims)
        self._projections = VeraProjections(config.r, d_in, d_out, config.projection_prng_key)
        try:
            super().inject(model, config, adapter_name)
        finally:
            self._projections = None

    def create_adapter(self, base_layer, config: VeraConfig, module_name: str, adapter_name: str) -> Adapter:
        d_in, d_out, conv1d = linear_features("VeRA", base_layer, module_name)
        return VeraLinear(d_in, d_out, config.r, self._projections, config.d_initial, config.vera_dropout,
                          fan_in_fan_out=conv1d, init=config.init_weights)

    def _shared(self, model, adapter_name) -> VeraProjections:
        return next(layer.adapters[adapter_name].projections for _, layer in self._layers_with(model, adapter_name))

    def export_state(self, model, adapter_name, config: VeraConfig):
        out = super().export_state(model, adapter_name, config)
        if config.save_projection:
            shared = self._shared(model, adapter_name)
            out[ABSOLUTE_KEY + SHARED_KEYS[0]] = shared.vera_A
            out[ABSOLUTE_KEY + SHARED_KEYS[1]] = shared.vera_B
        return out

    def import_state(self, model, adapter_name, config: VeraConfig, tensors):
        tensors = dict(tensors)
        saved = {k: tensors.pop(k) for k in SHARED_KEYS if k in tensors}
        if config.save_projection:
            if len(saved) != 2:
                raise KeyError(f"the VeRA config says save_projection=True but the adapter file lacks "
                               f"{', '.join(k for k in SHARED_KEYS if k not in saved)}")
            shared = self._shared(model, adapter_name)
            for key, t in saved.items():
                own = getattr(shared, key.rsplit(".", 1)[-1])
                check_shape("base_model", key, t, own, "VeRA's shared projections: r by the largest target layer")
                own.copy_(t.to(own.dtype))
        elif saved:
            warnings.warn("the adapter file holds vera_A/vera_B but its config has save_projection=False; "
                          "using the projections regenerated from projection_prng_key, as HF PEFT does",
                          stacklevel=2)
        super().import_state(model, adapter_name, config, tensors)


register_method(MethodInfo(
    "vera", VeraConfig, category="reparameterized", kind="delta-weight", mergeable=True, hf_peft_compatible=True,
    default_lr=2e-2, rank_field="r", dropout_field="vera_dropout",
    description="shared frozen random A, B; trains per-layer scaling vectors λ_b, λ_d only (Kopiczko et al. 2024)"))
