"""LoRA's layers: y = W x + s·B A dropout(x) on a Linear / Conv1D (LoraLinear) and on an nn.Embedding.

HF PEFT's file layout: lora_A.weight r×d_in, lora_B.weight d_out×r; embeddings as lora_embedding_A r×num and
lora_embedding_B dim×r. LoraLinear implements the low-rank operand protocol (core/lowrank.py), so sibling
fusion and mixed batches compute it with the shared kernels; DoRA (dora.py), LoRA-FA (fa.py) and LoRA-dropout
(dropout.py) subclass it.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.functional import fused_ok, lora_linear, peft_order
from ...core.layer import Adapter
from ...core.lowrank import LowRankOperands
from ...core.quantized import base_fusable, dense_weight, weight_rebuild
from ...core.targets import linear_features, pattern_value
from .config import LoraConfig


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _kaiming(t: torch.Tensor) -> torch.Tensor:
    # nn.Linear's default init; LoRA's A uses it (Microsoft loralib, HF PEFT).
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoraLinear(Adapter):
    """LoRA on a Linear (or GPT-2 Conv1D, whose weight is stored d_in×d_out: `fan_in_fan_out`)."""
    mergeable = True
    fuses_base = True
    # lora_B_bias: HF PEFT's `lora_bias=True`, a bias on B (its nn.Linear's bias), scaled with it: + s·b_B
    saved_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_B_bias": "lora_B.bias"}

    def __init_subclass__(cls, **kwargs) -> None:
        # The shared kernels compute what lowrank_operands() describes, not what forward() does: a subclass that
        # computes something else must say what its low-rank form is (or that it has none), or it would be
        # silently computed as plain LoRA in sibling groups and mixed batches.
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__ and not {"lowrank_operands", "joins_sibling_group"} <= set(cls.__dict__):
            raise TypeError(f"{cls.__name__} overrides LoraLinear.forward, so it must also define lowrank_operands "
                            f"and joins_sibling_group (core/lowrank.py)")

    def __init__(self, d_in: int, d_out: int, r: int, scale: float, dropout: float = 0.0,
                 fan_in_fan_out: bool = False, init: Union[bool, str] = True, lora_bias: bool = False):
        super().__init__()
        self.r, self.scale, self.fan_in_fan_out = r, scale, fan_in_fan_out
        self.lora_A = nn.Parameter(torch.empty(r, d_in))
        self.lora_B = nn.Parameter(torch.empty(d_out, r))
        self.register_parameter("lora_B_bias", nn.Parameter(torch.zeros(d_out)) if lora_bias else None)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            if init is False:
                _kaiming(self.lora_A), _kaiming(self.lora_B)  # both random: a non-zero delta from the start
                if lora_bias:  # nn.Linear(r, d_out)'s default bias, as HF PEFT's lora_B keeps it
                    nn.init.uniform_(self.lora_B_bias, -1 / math.sqrt(r), 1 / math.sqrt(r))
            else:
                if init == "gaussian":
                    nn.init.normal_(self.lora_A, std=1 / r)
                else:
                    _kaiming(self.lora_A)
                nn.init.zeros_(self.lora_B)

    def base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The base weight as (d_out, d_in), whatever its storage layout; for a quantised base a transient
        dequantised copy (core/quantized.py), which the caller should use once and drop."""
        w = dense_weight(base_layer)
        return w.t() if self.fan_in_fan_out else w

    @staticmethod
    def weight_rebuild(base_layer: nn.Module):
        """What the fused kernels call in backward instead of keeping base_weight() (a quantised base, never
        fan_in_fan_out: bitsandbytes layers are nn.Linear), or None."""
        return weight_rebuild(base_layer)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale  # (d_out, r) @ (r, d_in)
        return delta.t() if self.fan_in_fan_out else delta

    def merge_into(self, base_layer: nn.Module) -> None:
        if self.lora_B_bias is not None and base_layer.bias is None:  # checked first: never half-merged
            raise RuntimeError("cannot merge a LoRA with lora_bias=True into a layer without a bias (HF PEFT refuses "
                               "it too); keep the adapter unmerged")
        super().merge_into(base_layer)
        self._merge_bias(base_layer, 1)

    def unmerge_from(self, base_layer: nn.Module) -> None:
        super().unmerge_from(base_layer)
        self._merge_bias(base_layer, -1)

    def _merge_bias(self, base_layer: nn.Module, sign: int) -> None:
        if self.lora_B_bias is None:
            return
        with torch.no_grad():
            base_layer.bias.data += sign * self.scale * self.lora_B_bias.to(base_layer.bias.dtype)

    def _output_bias(self, base_layer: nn.Module) -> Optional[torch.Tensor]:
        """The bias of the layer's whole output: the base's, plus s·b_B with lora_bias."""
        if self.lora_B_bias is None:
            return base_layer.bias
        extra = self.lora_B_bias * self.scale
        return extra if base_layer.bias is None else base_layer.bias + extra

    def _dropout_active(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def _takes_fused_kernel(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        """Whether this layer runs core.functional's fused kernels (alone or in a sibling group) for x."""
        return (self.training or not peft_order()) and not self._dropout_active() and \
            base_fusable(base_layer, x) and fused_ok(x, self.lora_A)

    # -- the low-rank operand protocol (core/lowrank.py) ---------------------------------------------------------
    def lowrank_operands(self, base_layer: nn.Module) -> Optional[LowRankOperands]:
        # With lora_bias the output bias is b + s·b_B, not the base's b that mixed batches add once for every row.
        if self._dropout_active() or self.lora_B_bias is not None:
            return None
        return LowRankOperands(self.base_weight(base_layer), base_layer.bias, self.lora_A, self.lora_B, self.scale,
                               rebuild_weight=self.weight_rebuild(base_layer))

    def joins_sibling_group(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        if base_layer.weight.requires_grad or self.lora_B_bias is not None or \
                not self._takes_fused_kernel(x, base_layer):
            return False
        # with nothing to differentiate the inference kernel is faster than the group's autograd node
        return x.requires_grad or any(p.requires_grad for p in self.parameters()) or \
            (base_layer.bias is not None and base_layer.bias.requires_grad)

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: Optional[torch.Tensor]) -> torch.Tensor:
        if result is None:
            # The fused kernels by default (training and inference); `peftlab.hf_peft_numerics()` outside
            # training sums in HF PEFT's order instead, for outputs bit-identical to a PEFT-loaded adapter.
            if self._takes_fused_kernel(x, base_layer):
                return lora_linear(x, self.base_weight(base_layer), self._output_bias(base_layer), self.lora_A,
                                   self.lora_B, self.scale, self.weight_rebuild(base_layer))
            result = base_layer(x)
        # The unfused path, with HF PEFT's numerics: x cast to the adapter dtype, the sum back to the output's.
        h = self.dropout(x.to(self.lora_A.dtype))
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B, self.lora_B_bias)
        return result + (delta * self.scale).to(result.dtype)


class LoraEmbedding(Adapter):
    """LoRA on an nn.Embedding: delta rows looked up from A (r×num) then projected by B (dim×r)."""
    mergeable = True
    saved_names = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}

    def __init__(self, num: int, dim: int, r: int, scale: float, init: Union[bool, str] = True):
        super().__init__()
        self.r, self.scale = r, scale
        self.lora_A = nn.Parameter(torch.randn(r, num))
        self.lora_B = nn.Parameter(torch.randn(dim, r))
        if init is not False:  # HF PEFT: A zeros, B normal, for every init mode of embeddings
            with torch.no_grad():
                self.lora_A.zero_()
                nn.init.normal_(self.lora_B)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()).t() * self.scale  # (num, dim)

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(x, self.lora_A.t(), padding_idx=base_layer.padding_idx, max_norm=base_layer.max_norm,
                           norm_type=base_layer.norm_type, scale_grad_by_freq=base_layer.scale_grad_by_freq,
                           sparse=base_layer.sparse)                 # (..., r)
        return result + (rows @ self.lora_B.t() * self.scale).to(result.dtype)


def rank_and_scale(config: LoraConfig, module_name: str) -> tuple[int, float]:
    """(r, s) of one module, rank_pattern/alpha_pattern applied."""
    r = pattern_value(config.rank_pattern, module_name, config.r)
    alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
    return r, lora_scale(alpha, r, config.use_rslora)


def linear_lora_kwargs(method: str, base_layer: nn.Module, config: LoraConfig, module_name: str) -> dict:
    """LoraLinear's constructor arguments for a Linear/Conv1D layer, for LoRA, DoRA and the variants that subclass
    LoraLinear. Conv1D stores W as (d_in, d_out): fan_in_fan_out is set for it (config's own flag otherwise)."""
    d_in, d_out, conv1d = linear_features(method, base_layer, module_name)
    r, scale = rank_and_scale(config, module_name)
    return dict(d_in=d_in, d_out=d_out, r=r, scale=scale, dropout=config.lora_dropout,
                fan_in_fan_out=config.fan_in_fan_out or conv1d, init=config.init_lora_weights)
