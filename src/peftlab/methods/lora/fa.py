"""LoRA-FA: LoRA with A frozen at its random init and only B trained (Zhang et al. 2023, "LoRA-FA").

y = W x + s·B(A x). A is a (saved) buffer, so its gradient is never formed and the layer keeps only x·Aᵀ (N×r)
for backward instead of x (N×d_in). Optional gradient projection g_B ← g_B (AAᵀ)⁻¹/s² (`project_gradient`):
the least-squares B step whose s·ΔB·A best matches the full-weight gradient step, given A.

File: LoRA's layout (lora_A.weight, lora_B.weight) under our own peft_type "LORA_FA", so a resumed run keeps A
frozen. The tensors are a plain LoRA adapter: HF PEFT loads them with `config.to_lora_config()` written as the
adapter_config.json (same forward, same merge).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.functional import fused_ok
from ...core.layer import Adapter
from ...core.lowrank import LowRankOperands
from ...core.quantized import base_fusable
from ...core.registry import MethodInfo, register_method, register_tuner
from ...core.tuner import LayerTuner
from .config import LORA_FLAG_FIELDS, LoraConfig
from .layers import LoraLinear, linear_lora_kwargs


@dataclass
class LoraFaConfig(LoraConfig):
    peft_type: str = "LORA_FA"
    project_gradient: bool = False  # g_B ← g_B (AAᵀ)⁻¹ / s²

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ValueError("LoRA-FA does not combine with DoRA (use_dora=True); use method 'dora' instead")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoRA-FA keeps A at its random init; init_lora_weights must be True, False or "
                             f"'gaussian', got {self.init_lora_weights!r}")


class _LoraFaLinear(torch.autograd.Function):
    """out = x Wᵀ + b + s·(x Aᵀ) Bᵀ with A and W frozen: saves x·Aᵀ (N, r), never x (N, d_in)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float, rebuild=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xa = x2 @ lora_A.t()                                # (N, d_in) @ (d_in, r) -> (N, r)
        out = F.linear(x2, weight, bias)
        out.addmm_(xa, lora_B.t(), alpha=scale)              # (N, r) @ (r, d_out)
        # a quantised base's dequantised W is not kept: rebuild() makes it again in backward
        ctx.save_for_backward(xa, None if rebuild is not None else weight, lora_A, lora_B)
        ctx.scale, ctx.has_bias, ctx.x_shape, ctx.rebuild = scale, bias is not None, shape, rebuild
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xa, weight, lora_A, lora_B = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_B = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ (weight if ctx.rebuild is None else ctx.rebuild())  # (N, d_out) @ (d_out, d_in)
            grad_x.addmm_(g @ lora_B, lora_A, alpha=ctx.scale)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[4]:
            grad_B = (g.t() @ xa).mul_(ctx.scale)            # (d_out, N) @ (N, r)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, None, grad_B, None, None


class _ProjectGrad(torch.autograd.Function):
    """Identity forward; backward maps g_B (d_out, r) to g_B @ P with P = (AAᵀ)⁻¹/s² (r, r)."""

    @staticmethod
    def forward(ctx, lora_B, proj):
        ctx.save_for_backward(proj)
        return lora_B.clone()

    @staticmethod
    def backward(ctx, g):
        (proj,) = ctx.saved_tensors
        return g @ proj.to(g.dtype), None


class LoraFaLinear(LoraLinear):
    def __init__(self, project_gradient: bool = False, **lora_kwargs):
        super().__init__(**lora_kwargs)
        a = self.lora_A.data
        del self.lora_A
        self.register_buffer("lora_A", a)  # frozen, persistent: saved as lora_A.weight like LoRA's A
        self.project_gradient = project_gradient
        self.register_buffer("grad_proj", torch.empty(0), persistent=False)
        self.after_load()

    def after_load(self) -> None:
        a = self.lora_A.detach().float()
        proj = torch.linalg.inv(a @ a.t()) / self.scale ** 2 if self.project_gradient else torch.empty(0)
        self.grad_proj = proj.to(device=self.lora_A.device, dtype=self.lora_A.dtype)

    def _trained_B(self) -> torch.Tensor:
        """B as the forward uses it: with project_gradient, its gradient passes through (AAᵀ)⁻¹/s²."""
        return _ProjectGrad.apply(self.lora_B, self.grad_proj) if self.project_gradient else self.lora_B

    # The same function as LoRA (A merely frozen), so mixed batches may compute it from its operands; it keeps
    # its own kernel in training, which saves x·Aᵀ (N, r) instead of the group kernel's x (N, d_in).
    def lowrank_operands(self, base_layer: nn.Module) -> Optional[LowRankOperands]:
        if self._dropout_active():
            return None
        return LowRankOperands(self.base_weight(base_layer), base_layer.bias, self.lora_A, self._trained_B(),
                               self.scale, rebuild_weight=self.weight_rebuild(base_layer))

    def joins_sibling_group(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        return False

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: Optional[torch.Tensor]) -> torch.Tensor:
        B = self._trained_B()
        if result is None:
            if not self._dropout_active() and not base_layer.weight.requires_grad and base_fusable(base_layer, x) \
                    and fused_ok(x, self.lora_A, self.lora_B):
                return _LoraFaLinear.apply(x, self.base_weight(base_layer), base_layer.bias, self.lora_A, B,
                                           self.scale, self.weight_rebuild(base_layer))
            result = base_layer(x)
        h = self.dropout(x.to(self.lora_A.dtype))
        return result + (F.linear(F.linear(h, self.lora_A), B) * self.scale).to(result.dtype)


@register_tuner("LORA_FA", LoraFaConfig)
class LoraFaTuner(LayerTuner):
    def create_adapter(self, base_layer, config: LoraFaConfig, module_name: str, adapter_name: str) -> Adapter:
        return LoraFaLinear(project_gradient=config.project_gradient,
                            **linear_lora_kwargs("LoRA-FA", base_layer, config, module_name))


register_method(MethodInfo(
    "lora-fa", LoraFaConfig, category="reparameterized", kind="delta-weight", mergeable=True,
    hf_peft_compatible=False, default_lr=2e-3, **LORA_FLAG_FIELDS,
    description="LoRA with A frozen at init, only B trained; optional (AAᵀ)⁻¹ gradient projection (Zhang et al. 2023)"))
