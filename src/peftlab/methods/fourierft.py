"""FourierFT: ΔW = scale · Re(ifft2(F)), F zero except n trainable coefficients at seeded random positions (Gao et al. 2024).

Positions: the first n of a seeded randperm over d_out·d_in (row = idx // d_in, col = idx % d_in); computed in fp32
(ifft2 has no half-precision kernel). HF PEFT's FourierFTConfig (its default init_weights=False draws the
coefficients from N(0,1); the registered method "fourierft" starts them at zero, as docs/METHODS.md specifies, so the
model is unchanged at step 0) and file layout (`fourierft_spectrum` per layer; positions are not saved).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import PeftConfig
from ..core.layer import Adapter
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.functional import peft_order
from ..core.targets import linear_features
from ..core.tuner import LayerTuner
from ..hf.defaults import LORA_TARGETS

# HF PEFT's FourierFT table differs from LoRA's for GPT-2 style models (the MLP output projection).
FOURIERFT_TARGETS = {**LORA_TARGETS, "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}


@dataclass
class FourierFTConfig(PeftConfig):
    peft_type: str = "FOURIERFT"
    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: Optional[int] = 777
    fan_in_fan_out: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    n_frequency_pattern: dict = field(default_factory=dict)
    init_weights: bool = False  # HF PEFT: False = N(0,1) coefficients, True = zeros

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_frequency <= 0:
            raise ValueError(f"n_frequency must be a positive integer, got {self.n_frequency}")
        if self.bias not in ("none", "all"):
            raise ValueError(f"FourierFTConfig: bias={self.bias!r} is not supported by peftlab; use 'none' or 'all'")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError("layers_to_transform/layers_pattern cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform as well")
        if self.random_loc_seed is None:
            raise ValueError("random_loc_seed must be an integer: the spectral positions are derived from it and "
                             "are not saved")


class FourierFTLinear(Adapter):
    mergeable = True
    # One matmul with W + ΔW: ΔW is dense, so x·ΔWᵀ beside the base would double the layer's cost.
    fuses_base = True
    saved_names = {"fourierft_spectrum": "fourierft_spectrum"}

    def __init__(self, d_in: int, d_out: int, n: int, scaling: float, seed: int, fan_in_fan_out: bool = False,
                 init: bool = False, where: str = ""):
        super().__init__()
        if n > d_in * d_out:
            raise ValueError(f"{where}: n_frequency={n} exceeds the {d_out}×{d_in} = {d_in * d_out} entries of "
                             f"the weight; lower n_frequency (or set n_frequency_pattern for this layer)")
        self.d_in, self.d_out, self.scaling, self.fan_in_fan_out = d_in, d_out, scaling, fan_in_fan_out
        idx = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
        self.register_buffer("indices", torch.stack([idx // d_in, idx % d_in]), persistent=False)  # (2, n)
        self.fourierft_spectrum = nn.Parameter(torch.randn(n))
        if init:
            with torch.no_grad():
                self.fourierft_spectrum.zero_()

    def _delta(self) -> torch.Tensor:
        """ΔW (d_out, d_in) in the (out, in) layout, in the spectrum's dtype."""
        c = self.fourierft_spectrum
        dense = torch.zeros(self.d_out, self.d_in, device=c.device)
        dense[self.indices[0], self.indices[1]] = c.float()
        return (torch.fft.ifft2(dense).real * self.scaling).to(c.dtype)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        delta = self._delta()
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: Optional[torch.Tensor]) -> torch.Tensor:
        delta = self._delta()
        if result is None and (self.training or not peft_order()) and delta.dtype == base_layer.weight.dtype == x.dtype:
            w = base_layer.weight.t() if self.fan_in_fan_out else base_layer.weight
            return F.linear(x, w + delta, base_layer.bias)
        if result is None:
            result = base_layer(x)
        return (result + F.linear(x.to(delta.dtype), delta)).to(result.dtype)


@register_tuner("FOURIERFT", FourierFTConfig)
class FourierFTTuner(LayerTuner):
    default_targets_table = FOURIERFT_TARGETS

    def create_adapter(self, base_layer, config: FourierFTConfig, module_name: str, adapter_name: str) -> Adapter:
        d_in, d_out, conv1d = linear_features("FourierFT", base_layer, module_name)
        # HF PEFT's pattern lookup: the first key k with `.*\.k$` matching the module name.
        key = next((k for k in config.n_frequency_pattern if re.match(rf".*\.{k}$", module_name)), None)
        n = config.n_frequency_pattern.get(key, config.n_frequency)
        return FourierFTLinear(d_in, d_out, n, config.scaling, config.random_loc_seed, fan_in_fan_out=conv1d,
                               init=config.init_weights, where=module_name)


register_method(MethodInfo(
    "fourierft", FourierFTConfig, preset={"init_weights": True}, category="reparameterized", kind="delta-weight",
    mergeable=True, hf_peft_compatible=True,
    default_lr=2e-2,
    description="n trainable Fourier coefficients per layer; ΔW = scale·Re(ifft2) (Gao et al. 2024)"))
