"""LoRA-dropout: LoRA with Bernoulli masks on A's input features and B's output features while training (Lin et al. 2024).

ΔW_train = diag(m_B)·B·A·diag(m_A), m_A ∈ {0,1}^{d_in}, m_B ∈ {0,1}^{d_out}, each entry kept with probability
1 − p, fresh masks every forward (one per layer, shared by the batch). Each entry of ΔW is then dropped with
probability 2p − p²: the sparsity regulariser of the paper. (The paper writes A as d_in×r and B as r×d_out, so its
"rows of A / columns of B" are the input/output features masked here.) No rescaling, as in the paper's
Â = A·diag(m_A); evaluation uses the full A and B (the paper's test-time mask ensemble is not implemented).
PEFT's `lora_dropout` (dropout on the adapter input) stays available beside it.
File: LoRA's layout under our peft_type "LORA_DROPOUT"; the tensors are a plain LoRA adapter
(`config.to_lora_config()` gives the HF PEFT config with the same inference outputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.layer import Adapter
from ...core.lowrank import LowRankOperands
from ...core.registry import MethodInfo, register_method, register_tuner
from ...core.tuner import LayerTuner
from .config import LORA_FLAG_FIELDS, LoraConfig
from .layers import LoraLinear, linear_lora_kwargs


@dataclass
class LoraDropoutConfig(LoraConfig):
    peft_type: str = "LORA_DROPOUT"
    sparsity_dropout: float = 0.1  # p: drop probability of each input feature of A and output feature of B

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.sparsity_dropout < 1.0:
            raise ValueError(f"sparsity_dropout must be in [0, 1), got {self.sparsity_dropout}")
        if self.use_dora:
            raise ValueError("LoRA-dropout does not combine with DoRA (use_dora=True) in peftlab")


class LoraDropoutLinear(LoraLinear):
    def __init__(self, sparsity_dropout: float, **lora_kwargs):
        super().__init__(**lora_kwargs)
        self.p = sparsity_dropout

    def _masking(self) -> bool:
        return self.training and self.p > 0

    # Plain LoRA whenever no masks are drawn; while they are, the update changes every forward and has no fixed
    # low-rank operands. It stays out of sibling groups (the masked path is its own forward).
    def lowrank_operands(self, base_layer: nn.Module) -> Optional[LowRankOperands]:
        return None if self._masking() else super().lowrank_operands(base_layer)

    def joins_sibling_group(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        return False

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: Optional[torch.Tensor]) -> torch.Tensor:
        if not self._masking():
            return super().forward(x, base_layer, result)
        if result is None:
            result = base_layer(x)
        A, B = self.lora_A, self.lora_B
        keep = 1.0 - self.p
        m_A = torch.bernoulli(torch.full((A.shape[1],), keep, device=A.device, dtype=A.dtype))  # (d_in,)
        m_B = torch.bernoulli(torch.full((B.shape[0],), keep, device=B.device, dtype=B.dtype))  # (d_out,)
        # x·(A diag(m_A))ᵀ·(diag(m_B) B)ᵀ = ((x ⊙ m_A) Aᵀ) Bᵀ ⊙ m_B: masks on activations, no masked copies of A, B.
        h = self.dropout(x.to(A.dtype)) * m_A
        update = F.linear(F.linear(h, A), B) * (m_B * self.scale)
        return result + update.to(result.dtype)


@register_tuner("LORA_DROPOUT", LoraDropoutConfig)
class LoraDropoutTuner(LayerTuner):
    def create_adapter(self, base_layer, config: LoraDropoutConfig, module_name: str, adapter_name: str) -> Adapter:
        if isinstance(config.init_lora_weights, str) and config.init_lora_weights != "gaussian":
            raise ValueError(f"LoRA-dropout supports init_lora_weights True/False/'gaussian', got "
                             f"{config.init_lora_weights!r}")
        return LoraDropoutLinear(config.sparsity_dropout,
                                 **linear_lora_kwargs("LoRA-dropout", base_layer, config, module_name))


register_method(MethodInfo(
    "lora-dropout", LoraDropoutConfig, category="reparameterized", kind="delta-weight", mergeable=True,
    hf_peft_compatible=False, default_lr=2e-3, **LORA_FLAG_FIELDS,
    description="LoRA with Bernoulli masks on A's input and B's output features in training (Lin et al. 2024)"))
