"""MoE-LoRA (MixLoRA's routing): E LoRA experts per target layer behind a softmax top-k router.

  y = W x + b + Σ_{j=1..k} g_j(x) · s · B_{e_j} A_{e_j} x,    g = top-k of softmax(W_r x), renormalised to sum 1

With `zero_expert` the router has one more slot whose output is 0 and which holds no parameters: weight routed
there is weight the LoRA experts do not get, so a token routed mostly to it keeps the base layer's output (the
HMVLM "zero expert" for knowledge retention). The load-balancing loss (core/routing.py) runs over all slots,
the zero expert included, and is added to the training loss as `router_aux_loss_coef` · its mean over layers.
Experts are computed batched (core/grouped.py), never token by token: `expert_compute="grouped"` sorts the tokens by
expert and computes only the routed experts (two batched matmuls); "dense" computes every expert's thin
down-projection and applies the routed ones with one matmul, faster on CPU while E·r is small; "auto" picks
dense on CPU for E·r ≤ 128 and grouped otherwise.
B starts at 0, so the model equals the base at step 0. Not mergeable: the update differs per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn

from ..core.config import PeftConfig
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.grouped import dense_lowrank, grouped_lowrank
from ..core.routing import RoutedAdapter, RoutedLayerTuner, Router, RoutingContext
from ..core.targets import linear_features


COMPUTE = ("auto", "grouped", "dense")
DENSE_MAX_COLUMNS = 128   # "auto": dense while num_experts · r is at most this (on CPU)


@dataclass
class MoeLoraConfig(PeftConfig):
    peft_type: str = "MOE_LORA"
    r: int = 8                       # rank of each expert
    lora_alpha: float = 16.0         # s = lora_alpha / r
    lora_dropout: float = 0.0
    num_experts: int = 8             # LoRA experts per layer (the zero expert is not counted)
    top_k: int = 2                   # slots each token is routed to (MixLoRA: 2)
    zero_expert: bool = False        # one more slot, parameter-free, whose output is 0
    router_aux_loss_coef: float = 0.01   # the balance loss's weight (Switch Transformer's α = 0.01)
    router_init_std: float = 0.02
    expert_compute: str = "auto"     # "grouped" | "dense" | "auto" (see the module docstring)
    target_modules: Optional[Union[list[str], str]] = None   # None: the architecture's LoRA defaults (q, v)
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    @property
    def num_slots(self) -> int:
        return self.num_experts + int(self.zero_expert)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MoeLoraConfig: {name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_slots:
            raise ValueError(f"MoeLoraConfig: top_k={self.top_k} exceeds the {self.num_slots} router slots "
                             f"(num_experts={self.num_experts}" + (" + the zero expert" if self.zero_expert else "")
                             + f"); use top_k <= {self.num_slots}")
        if self.expert_compute not in COMPUTE:
            raise ValueError(f"MoeLoraConfig: expert_compute={self.expert_compute!r} is not one of {COMPUTE}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"MoeLoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"MoeLoraConfig: router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")


class MoeLoraLinear(RoutedAdapter):
    """E LoRA experts (stacked: A (E, r, d_in), B (E, r, d_out), i.e. B_eᵀ) and their router on one linear layer."""

    def __init__(self, d_in: int, d_out: int, cfg: MoeLoraConfig, context: RoutingContext):
        super().__init__(context)
        e, r = cfg.num_experts, cfg.r
        self.lora_A = nn.Parameter(torch.empty(e, r, d_in))
        self.lora_B = nn.Parameter(torch.zeros(e, r, d_out))   # B_eᵀ: the experts' up-projections side by side
        for a in self.lora_A:                                   # each expert: LoRA's Kaiming-uniform(a=√5) A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.router = Router(d_in, cfg.num_slots, context, cfg.router_init_std)
        self.top_k, self.scale = cfg.top_k, cfg.lora_alpha / r
        self.aux = cfg.router_aux_loss_coef > 0
        self.compute = cfg.expert_compute
        self.dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.dropout_p = cfg.lora_dropout   # 0: the router and the experts read the same x (one fused matmul)

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)                  # (N, d_in)
        e, r = self.lora_A.shape[:2]
        with_loss = self.aux and self.training and torch.is_grad_enabled()
        into, slots = result.reshape(-1, result.shape[-1]), self.router.weight.shape[0]
        dense = self.compute == "dense" or (self.compute == "auto" and h.device.type == "cpu"
                                             and e * r <= DENSE_MAX_COLUMNS)
        if not dense:
            weights, idx = self.router(h, self.top_k, with_loss)
            out = grouped_lowrank(self.dropout(h), weights, idx, self.lora_A, self.lora_B, self.scale, into)
        elif self.dropout_p == 0:
            # router logits and every expert's down-projection in one (N, d_in) × (d_in, E·r + S) matmul
            z = h @ torch.cat([self.lora_A.reshape(e * r, -1), self.router.weight.to(h.dtype)]).t()
            u, logits = z.split([e * r, slots], dim=1)
            weights, idx = self.router(h, self.top_k, with_loss, logits=logits)
            out = dense_lowrank(h, weights, idx, self.lora_A, self.lora_B, self.scale, into, slots, u=u)
        else:
            weights, idx = self.router(h, self.top_k, with_loss)
            out = dense_lowrank(self.dropout(h), weights, idx, self.lora_A, self.lora_B, self.scale, into, slots)
        return out.reshape(result.shape)


@register_tuner("MOE_LORA", MoeLoraConfig)
class MoeLoraTuner(RoutedLayerTuner):
    aux_coef_field = "router_aux_loss_coef"

    def inject(self, model, config, adapter_name):
        self._context = RoutingContext()   # shared by this adapter's routers (create_adapter hands it on)
        super().inject(model, config, adapter_name)

    def create_adapter(self, base_layer, config: MoeLoraConfig, module_name: str, adapter_name: str):
        d_in, d_out, _ = linear_features("MoE-LoRA", base_layer, module_name)   # the experts read x: any layout
        return MoeLoraLinear(d_in, d_out, config, self._context).to(base_layer.weight.device)


register_method(MethodInfo(
    "moe-lora", MoeLoraConfig, category="moe", kind="activation", mergeable=False, identity_at_init=True,
    default_lr=2e-3, rank_field="r", alpha_field="lora_alpha", dropout_field="lora_dropout",
    description="E LoRA experts per layer behind a softmax top-k router with a balance loss (MixLoRA); "
                "optional parameter-free zero expert"))
