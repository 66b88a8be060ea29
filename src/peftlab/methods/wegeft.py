"""WeGeFT: the update generated from the pretrained weight, ΔW = s·(W φᵀ) ψ (Savadikar, Song & Wu, ICML 2025).

y = W x + b + s·(W φᵀ)(ψ x), the paper's default "input perspective": φ, ψ ∈ R^{r×d_in} trainable, ψ
Kaiming-uniform (a=√5, as LoRA's A) and φ zero (the model is unchanged at step 0), s = wegeft_alpha / r. In the
low-rank operand protocol (core/lowrank.py) this is LoRA with A = ψ and B = W φᵀ (d_out × r), generated from W in
every forward, so the fused kernels, sibling fusion and mixed batches compute it and φ gets its gradient through B.

Sharing (`share_across_layers`, default True: the authors' language-model setting, one pair per target module
type over all blocks). One φ/ψ pair serves every adapted layer whose module name is the same once each numeric
component (a block index) is replaced by `*` and whose weight has the same shape (d_out, d_in):
`model.layers.0.self_attn.q_proj` and `model.layers.1.self_attn.q_proj` share, q_proj and k_proj do not. The first
such layer (in module order) owns the pair: the file holds `<that module>.wegeft_phi` / `.wegeft_psi` and nothing
for the other layers of its group; gradients from every layer of the group accumulate in the one pair.

`wegeft_dropout` drops entries of W in B = dropout(W) φᵀ during training, as the reference does (it keeps a
dropped copy of W per layer for φ's gradient); W x itself is never dropped. Not implemented: the "output
perspective" (ΔW = s·φᵀψ W), non-linear weight generators, and quantised bases (refused: B needs W densely every
forward). The update is generated from the layer's current weight: with another adapter merged into the same
layer, that weight includes it.
File: ours, `WEGEFT` (HF PEFT has no WeGeFT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import PeftConfig
from ..core.functional import fused_ok, lora_linear
from ..core.layer import Adapter, unwrapped_fully
from ..core.loading import copy_checked
from ..core.lowrank import LowRankOperands
from ..core.quantized import base_fusable, quant_kind
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.targets import linear_features, resolve_targets
from ..core.tuner import LayerTuner


@dataclass
class WeGeFTConfig(PeftConfig):
    peft_type: str = "WEGEFT"
    r: int = 64                  # the authors' language-model runs: rank 64, alpha 128 (s = 2)
    wegeft_alpha: float = 128.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    share_across_layers: bool = True
    wegeft_dropout: float = 0.0
    init_wegeft_weights: bool = True  # False: φ random too, so ΔW ≠ 0 from the start
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"WeGeFTConfig: r must be a positive integer (the rank of φ and ψ), got {self.r!r}")
        if isinstance(self.wegeft_alpha, bool) or not isinstance(self.wegeft_alpha, (int, float)) or \
                not math.isfinite(self.wegeft_alpha) or self.wegeft_alpha <= 0:
            raise ValueError(f"WeGeFTConfig: wegeft_alpha must be a positive finite number (scaling = "
                             f"wegeft_alpha / r), got {self.wegeft_alpha!r}")
        if not 0.0 <= self.wegeft_dropout < 1.0:
            raise ValueError(f"WeGeFTConfig: wegeft_dropout is a probability in [0, 1), got {self.wegeft_dropout!r}")
        if not isinstance(self.init_wegeft_weights, bool):
            raise ValueError(f"WeGeFTConfig: init_wegeft_weights must be True (φ = 0, the model unchanged at "
                             f"step 0) or False (φ random), got {self.init_wegeft_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("WeGeFTConfig: layers_pattern needs layers_to_transform as well")


def _kaiming(t: torch.Tensor) -> torch.Tensor:
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # nn.Linear's default, LoRA's A


class WeGeFTFactors(nn.Module):
    """φ and ψ (r × d_in) of one group of layers, registered in each of its layers' adapters (one tensor pair)."""

    def __init__(self, r: int, d_in: int, zero_phi: bool = True):
        super().__init__()
        self.wegeft_phi = nn.Parameter(torch.zeros(r, d_in))
        self.wegeft_psi = nn.Parameter(torch.empty(r, d_in))
        with torch.no_grad():
            _kaiming(self.wegeft_psi)
            if not zero_phi:
                _kaiming(self.wegeft_phi)


class WeGeFTLinear(Adapter):
    """y = W x + b + s·(W φᵀ)(ψ x) on a Linear or Conv1D (`fan_in_fan_out`: W stored as d_in × d_out)."""
    mergeable = True
    fuses_base = True

    def __init__(self, factors: WeGeFTFactors, owns_factors: bool, scale: float, dropout: float = 0.0,
                 fan_in_fan_out: bool = False):
        super().__init__()
        self.factors, self.owns_factors = factors, owns_factors
        self.scale, self.dropout, self.fan_in_fan_out = scale, dropout, fan_in_fan_out

    def _weight(self, base_layer: nn.Module) -> torch.Tensor:
        w = base_layer.weight
        return w.t() if self.fan_in_fan_out else w  # (d_out, d_in)

    def _generated_B(self, weight: torch.Tensor) -> torch.Tensor:
        """B = dropout(W) φᵀ, (d_out, d_in) @ (d_in, r) -> (d_out, r); φ's gradient flows through it."""
        phi = self.factors.wegeft_phi
        if self.training and self.dropout > 0:
            weight = F.dropout(weight, self.dropout)
        return F.linear(weight.to(phi.dtype), phi)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        w, psi = self._weight(base_layer).float(), self.factors.wegeft_psi.float()
        delta = (w @ self.factors.wegeft_phi.float().t()) @ psi * self.scale  # (d_out, r) @ (r, d_in)
        return delta.t() if self.fan_in_fan_out else delta

    def unmerge_from(self, base_layer: nn.Module) -> None:
        # The delta was generated from the weight before the merge, W; the layer now holds W' = W (I + s φᵀψ).
        # Then W' φᵀ = W φᵀ (I_r + s ψ φᵀ), so W φᵀ comes back from an r × r solve (float64: the factor may be
        # ill-conditioned), without keeping a copy of W.
        merged = self._weight(base_layer).double()
        phi, psi = self.factors.wegeft_phi.double(), self.factors.wegeft_psi.double()
        core = torch.eye(phi.shape[0], dtype=torch.float64, device=phi.device) + self.scale * psi @ phi.t()
        try:
            w_phi = torch.linalg.solve(core, merged @ phi.t(), left=False)  # X core = W' φᵀ, (d_out, r)
        except torch.linalg.LinAlgError as e:
            raise RuntimeError("cannot unmerge this WeGeFT adapter: I + s·ψφᵀ is singular, so the merged weight "
                               "does not determine the original one; reload the base model instead") from e
        delta = (w_phi @ psi * self.scale).to(base_layer.weight.dtype)
        with torch.no_grad():
            base_layer.weight.data -= delta.t() if self.fan_in_fan_out else delta

    def _takes_fused_kernel(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        return base_fusable(base_layer, x) and fused_ok(x, self.factors.wegeft_phi, self.factors.wegeft_psi)

    # -- the low-rank operand protocol (core/lowrank.py): A = ψ, B = dropout(W) φᵀ ---------------------------
    def lowrank_operands(self, base_layer: nn.Module) -> Optional[LowRankOperands]:
        w = self._weight(base_layer)
        return LowRankOperands(w, base_layer.bias, self.factors.wegeft_psi, self._generated_B(w), self.scale)

    def joins_sibling_group(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        # the group kernel differentiates B and ψ, not W (a W that trains takes autograd's path)
        return not base_layer.weight.requires_grad and self._takes_fused_kernel(x, base_layer) and \
            (x.requires_grad or self.factors.wegeft_phi.requires_grad or self.factors.wegeft_psi.requires_grad)

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: Optional[torch.Tensor]) -> torch.Tensor:
        w = self._weight(base_layer)
        B, psi = self._generated_B(w), self.factors.wegeft_psi
        if result is None:
            if self._takes_fused_kernel(x, base_layer):
                return lora_linear(x, w, base_layer.bias, psi, B, self.scale)
            result = base_layer(x)
        # other dtypes or autocast: x in the factors' dtype, the sum back in the output's
        update = F.linear(F.linear(x.to(psi.dtype), psi), B)  # (N, r) then (N, d_out)
        return result + (update * self.scale).to(result.dtype)

    # -- saving: a group's pair is saved once, by the layer that owns it ------------------------------------------
    def _saved(self) -> dict[str, torch.Tensor]:
        if not self.owns_factors:
            return {}
        return {"wegeft_phi": self.factors.wegeft_phi, "wegeft_psi": self.factors.wegeft_psi}

    def export_state(self) -> dict[str, torch.Tensor]:
        return {k: t.detach() for k, t in self._saved().items()}

    def import_state(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        owner = "WeGeFT layer" if self.owns_factors else "WeGeFT layer (its group's φ, ψ are saved by the first layer)"
        copy_checked(where, tensors, self._saved(), owner, "φ and ψ are r × d_in: saved with another r or base model?")


def sharing_group(module_name: str, d_out: int, d_in: int) -> tuple[str, int, int]:
    """The key of the layers that share one φ/ψ pair: the module name with block indices as `*`, and W's shape."""
    return ".".join("*" if part.isdigit() else part for part in module_name.split(".")), d_out, d_in


@register_tuner("WEGEFT", WeGeFTConfig)
class WeGeFTTuner(LayerTuner):
    _groups: Optional[dict] = None  # sharing group -> WeGeFTFactors; set only during inject()

    def inject(self, model, config: WeGeFTConfig, adapter_name: str) -> None:
        # Refused before any layer is wrapped, so a refusal leaves the model as it was.
        for name in resolve_targets(model, config, module_filter=self.target_filter):
            kind = quant_kind(unwrapped_fully(model.get_submodule(name)))  # under another adapter's wrapper too
            if kind is not None:
                raise ValueError(f"WeGeFT cannot adapt {name}: its weight is quantised ({kind}), and WeGeFT generates "
                                 f"its update from the dense weight in every forward (B = W φᵀ). Load the base "
                                 f"unquantised, or use LoRA or DoRA on the quantised base")
        self._groups = {}
        try:
            super().inject(model, config, adapter_name)
        finally:
            self._groups = None

    def create_adapter(self, base_layer, config: WeGeFTConfig, module_name: str, adapter_name: str) -> Adapter:
        d_in, d_out, conv1d = linear_features("WeGeFT", base_layer, module_name)
        group = sharing_group(module_name, d_out, d_in) if config.share_across_layers else module_name
        factors = self._groups.get(group)
        owns = factors is None
        if owns:
            factors = self._groups[group] = WeGeFTFactors(config.r, d_in, zero_phi=config.init_wegeft_weights)
        return WeGeFTLinear(factors, owns, config.wegeft_alpha / config.r, config.wegeft_dropout,
                            fan_in_fan_out=conv1d)


register_method(MethodInfo(
    "wegeft", WeGeFTConfig, category="reparameterized", kind="delta-weight", mergeable=True, hf_peft_compatible=False,
    default_lr=2e-3, rank_field="r", alpha_field="wegeft_alpha", dropout_field="wegeft_dropout",
    description="ΔW = s·(W φᵀ)ψ generated from the pretrained weight; φ, ψ (r×d_in) shared by a module's copies in "
                "every block (Savadikar et al. 2025)"))
