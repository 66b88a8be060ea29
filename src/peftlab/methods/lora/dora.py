"""DoRA: W' = m ⊙ (W + sBA) / ‖W + sBA‖_row, the norm detached (DoRA §4.3); LoRA with a learned magnitude.

The fast path never forms W + sBA: ‖W_i + sB_iA‖² = ‖W_i‖² + 2s·B_i·(A W_iᵀ) + s²·B_i(AAᵀ)B_iᵀ, with ‖W_i‖²
cached (W is frozen), W Aᵀ (d_out×r) and A Aᵀ (r×r). Saved as HF PEFT's `lora_magnitude_vector`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.functional import dora_linear, fused_ok
from ...core.lowrank import LowRankOperands
from ...core.quantized import base_fusable
from .layers import LoraLinear


class DoraLinear(LoraLinear):
    saved_names = {**LoraLinear.saved_names, "magnitude": "lora_magnitude_vector"}
    unsaved = ("weight_sq_norm",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        d_out = self.lora_B.shape[0]
        self.magnitude = nn.Parameter(torch.ones(d_out))
        self.register_buffer("weight_sq_norm", torch.zeros(d_out, dtype=torch.float64), persistent=False)
        self._norm_of = None  # identity of the base weight the cached ‖W‖² belongs to

    def init_magnitude(self, base_layer: nn.Module) -> None:
        with torch.no_grad():
            self.magnitude.copy_(self.weight_norm(base_layer).to(self.magnitude.dtype))

    def on_base_changed(self) -> None:
        self._norm_of = None
        self._peft_norm_key = None

    def _weight_sq_norm(self, w: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        if torch.compiler.is_compiling():  # data_ptr keys cannot be traced; the compiler fuses this reduction
            return w.detach().double().pow(2).sum(1)
        stored = base_layer.weight  # the layer's own tensor (packed, for a quantised base; w is then a copy)
        key = (stored.data_ptr(), stored._version, stored.device, stored.dtype)
        if self._norm_of != key:
            self.weight_sq_norm = w.detach().double().pow(2).sum(1)
            self._norm_of = key
        return self.weight_sq_norm

    @torch.no_grad()
    def merged_sq_norm(self, base_layer: nn.Module, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        """‖W + sBA‖² per output row (float64), from r×r and d_out×r products only:
        ‖W_i + sB_iA‖² = ‖W_i‖² + B_i·(2s·A W_iᵀ + s²·(A Aᵀ) B_iᵀ).

        In float64: the terms can nearly cancel (W + sBA far smaller than W), and fp32 would then lose the
        digits that HF PEFT's direct norm keeps. The one large product, W Aᵀ (d_out×d_in×r flops, ~r/N of the
        layer), runs in the adapter's precision (no float64 copy of W); its rounding error is relative to the
        cross term, not to ‖W‖². Few ops on purpose: each costs ~10 µs of dispatch, on every layer every step.
        w: base_weight(), when the caller has it already (a quantised base is dequantised once per forward)."""
        w = self.base_weight(base_layer) if w is None else w
        A, s = self.lora_A.double(), self.scale
        B = self.lora_B.double()
        wa = (w.to(self.lora_A.dtype) @ self.lora_A.t()).double()            # (d_out, d_in) @ (d_in, r)
        inner = torch.addmm(wa, B, A @ A.t(), beta=2 * s, alpha=s * s)      # (d_out, r)
        return (B * inner).sum(1).add_(self._weight_sq_norm(w, base_layer)).clamp_min_(0)

    def weight_norm(self, base_layer: nn.Module, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        """‖W + sBA‖ per output row, in the magnitude's dtype."""
        return self.merged_sq_norm(base_layer, w).sqrt_().to(self.magnitude.dtype)

    @torch.no_grad()
    def peft_weight_norm(self, base_layer: nn.Module) -> torch.Tensor:
        """‖W + sBA‖ computed exactly as HF PEFT does (B A formed via an identity matrix), cached while W, A and
        B are unchanged. Used outside training so inference outputs match PEFT's to the last bit."""
        stored = base_layer.weight  # the cache key: the layer's own (for a quantised base, packed) tensor

        def norm() -> torch.Tensor:
            w = self.base_weight(base_layer)
            eye = torch.eye(self.lora_A.shape[1], device=w.device, dtype=self.lora_A.dtype)
            lora_weight = F.linear(F.linear(eye, self.lora_A), self.lora_B).T
            return torch.linalg.norm(w + self.scale * lora_weight.to(w.dtype), dim=1).to(w.dtype)

        if torch.compiler.is_compiling():  # data_ptr keys cannot be traced: no cache inside a compiled graph
            return norm()
        key = (stored.data_ptr(), stored._version, self._norm_of, self.lora_A._version, self.lora_B._version,
               self.lora_A.data_ptr(), self.lora_B.data_ptr())
        if getattr(self, "_peft_norm_key", None) != key:
            self._peft_norm = norm()
            self._peft_norm_key = key
        return self._peft_norm

    # -- the low-rank operand protocol (core/lowrank.py): c = m/‖W + sBA‖ ---------------------------------------
    def joins_sibling_group(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        # the fused kernels serve training only; outside it DoRA uses HF PEFT's cached norm (see forward)
        return self.training and fused_ok(x, self.magnitude) and super().joins_sibling_group(x, base_layer)

    def lowrank_operands(self, base_layer: nn.Module) -> Optional[LowRankOperands]:
        if self._dropout_active():
            return None
        w = self.base_weight(base_layer)
        if self.training:
            inv_norm = self.merged_sq_norm(base_layer, w).rsqrt_().to(self.magnitude.dtype)
        else:
            inv_norm = self.peft_weight_norm(base_layer).to(self.magnitude.dtype).reciprocal()
        return LowRankOperands(w, base_layer.bias, self.lora_A, self.lora_B, self.scale, self.magnitude, inv_norm,
                               self.weight_rebuild(base_layer))

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: Optional[torch.Tensor]) -> torch.Tensor:
        w = None  # the base weight, dequantised at most once in this call (a quantised base)
        if not self.training:
            norm = self.peft_weight_norm(base_layer)
        else:
            w = self.base_weight(base_layer)
            norm = self.weight_norm(base_layer, w)
            if result is None and not self._dropout_active() and base_fusable(base_layer, x) and \
                    fused_ok(x, self.lora_A, self.magnitude):
                return dora_linear(x, w, base_layer.bias, self.lora_A, self.lora_B, self.magnitude,
                                   (1.0 / norm).to(x.dtype), self.scale, self.weight_rebuild(base_layer))
        # HF PEFT's formulation: result + (m/‖·‖ − 1)·(W x_d) + (m/‖·‖)·s·B A x_d, x_d = dropout(x).
        mag_scale = (self.magnitude / norm.to(self.magnitude.dtype)).view(1, -1)
        h = self.dropout(x.to(self.lora_A.dtype))
        if result is None:
            result = base_layer(x)
        if self._dropout_active():
            w = self.base_weight(base_layer) if w is None else w
            base_nobias = F.linear(h, w.to(h.dtype))
        else:
            base_nobias = result if base_layer.bias is None else result - base_layer.bias
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B)
        return result + ((mag_scale - 1) * base_nobias + mag_scale * lora * self.scale).to(result.dtype)

    # Merging is multiplicative: W' = (m / ‖W + ΔW‖) ⊙ (W + ΔW); the norm at merge time is kept for unmerge.
    @torch.no_grad()
    def merge_into(self, base_layer: nn.Module) -> None:
        w = self.base_weight(base_layer)
        delta = super().delta_weight(base_layer)
        delta = delta.t() if self.fan_in_fan_out else delta       # (d_out, d_in)
        merged = w.float() + delta
        self._merge_norm = merged.norm(dim=1)
        new = (self.magnitude.float() / self._merge_norm).view(-1, 1) * merged
        self._set_base(base_layer, new)

    @torch.no_grad()
    def unmerge_from(self, base_layer: nn.Module) -> None:
        w = self.base_weight(base_layer)
        delta = super().delta_weight(base_layer)
        delta = delta.t() if self.fan_in_fan_out else delta
        orig = w.float() / (self.magnitude.float() / self._merge_norm).view(-1, 1) - delta
        self._set_base(base_layer, orig)

    def _set_base(self, base_layer: nn.Module, w: torch.Tensor) -> None:
        w = w.to(base_layer.weight.dtype)
        base_layer.weight.data = w.t().contiguous() if self.fan_in_fan_out else w
        self.on_base_changed()

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """W' − W, for code that needs an additive view (e.g. weighted combinations)."""
        w = self.base_weight(base_layer).float()
        delta = super().delta_weight(base_layer)
        delta = delta.t() if self.fan_in_fan_out else delta
        merged = w + delta
        out = (self.magnitude.float() / merged.norm(dim=1)).view(-1, 1) * merged - w
        return out.t() if self.fan_in_fan_out else out

