"""MultiLoRA: n parallel LoRA modules per layer with learnable scalings (Wang, Lin, Zeng & Zhang 2023, "MultiLoRA").

y = W x + b + c·Σ_i s_i B_i A_i x,  i = 1..n,  A_i ∈ R^{r×d_in},  B_i ∈ R^{d_out×r},  c = lora_alpha / r.

The paper's two changes to LoRA: horizontal scaling (n modules side by side, summed) and a new initialisation,
so that the modules do not share LoRA's few dominant singular directions: A_i and B_i both Kaiming-uniform
(a=√5, nn.Linear's default, fan-in r for B_i) and the learnable scalings s_i zero, which keeps the model unchanged
at step 0 (ΔW = Σ s_i B_i A_i = 0) while every module starts from its own random subspace. At step 0 only the s_i
receive gradient (∂L/∂B_i and ∂L/∂A_i are proportional to s_i); after the first step all train.
`scaling="module"` (default) is one scalar s_i per module, the paper's "learnable scaling factors";
`scaling="feature"` is one d_out vector per module (s_i ⊙ rows of B_i), as a third-party reimplementation
(the SAMoRA authors' MultiLoRA baseline) does. c = lora_alpha/r is LoRA's constant, kept so --alpha means what it
means for LoRA; with the defaults (alpha = r) it is 1.

In the low-rank operand protocol (core/lowrank.py) the n modules are one LoRA of rank n·r:
A = [A_1; …; A_n] (n·r × d_in) and B = [s_1 B_1, …, s_n B_n] (d_out × n·r), the latter formed from the trained
tensors in every forward with autograd ops, so the fused kernels, sibling fusion, mixed batches, merging and a
quantised (QLoRA) base serve it unchanged, and s_i gets its gradient through B (∂L/∂s_i = Σ ∂L/∂B ⊙ B_i).
The parameters are stored that way too: `lora_A` is the stacked A, `lora_B` the unscaled [B_1, …, B_n]
(module i is rows / columns i·r … (i+1)·r − 1), `multilora_scaling` is (n,) or (n, d_out).

Defaults: n 3 and r 8 per module. Not read in the paper itself (only its abstract and third-party summaries
could be reached): n = 3 is the `lora_num` default of the reimplementation above, r = 8 and the target modules are
LoRA's. The paper's multi-task data mixture is not part of the method. Linear and Conv1D layers only; LoRA's
lora_bias, DoRA and the data-driven inits are refused.
File: ours, `MULTILORA` (HF PEFT has no MultiLoRA); keys `lora_A.weight`, `lora_B.weight`, `multilora_scaling`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.functional import lora_linear
from ...core.layer import Adapter
from ...core.lowrank import LowRankOperands
from ...core.registry import MethodInfo, register_method, register_tuner
from ...core.tuner import LayerTuner
from .config import LORA_FLAG_FIELDS, LoraConfig
from .layers import LoraLinear, _kaiming, linear_lora_kwargs

SCALINGS = ("module", "feature")


@dataclass
class MultiLoraConfig(LoraConfig):
    peft_type: str = "MULTILORA"
    n_modules: int = 3          # parallel LoRA modules per layer, each of rank r
    scaling: str = "module"     # "module": one learnable s_i per module; "feature": a d_out vector per module

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"MultiLoraConfig: r must be a positive integer (the rank of each of the n_modules "
                             f"LoRA modules), got {self.r!r}")
        super().__post_init__()
        n = self.n_modules
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"MultiLoraConfig: n_modules must be a positive integer (how many parallel LoRA modules "
                             f"each layer gets; the default is 3, 1 is LoRA with a learnable scale), got {n!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"MultiLoraConfig: scaling must be 'module' (one learnable scalar per module) or "
                             f"'feature' (one learnable d_out vector per module), got {self.scaling!r}")
        if self.use_dora:
            raise ValueError("MultiLoraConfig: MultiLoRA does not combine with DoRA (use_dora=True); use method "
                             "'dora' for DoRA, or leave use_dora False")
        if self.init_lora_weights not in (True, False):
            raise ValueError(f"MultiLoraConfig: init_lora_weights must be True (the paper's init: A_i, B_i "
                             f"Kaiming-uniform, scalings 0, the model unchanged at step 0) or False (scalings 1, "
                             f"ΔW ≠ 0 from the start), got {self.init_lora_weights!r}")


class MultiLoraLinear(LoraLinear):
    """y = W x + b + c·Σ_i s_i B_i A_i x on a Linear / Conv1D, computed as one rank-n·r LoRA with B = [s_i B_i]."""
    saved_names = {**LoraLinear.saved_names, "multilora_scaling": "multilora_scaling"}

    def __init__(self, n_modules: int, scaling: str = "module", *, r: int, d_out: int,
                 init: bool = True, **lora_kwargs):
        super().__init__(r=n_modules * r, d_out=d_out, init=init, **lora_kwargs)
        self.n_modules, self.module_rank = n_modules, r
        shape = (n_modules,) if scaling == "module" else (n_modules, d_out)
        self.multilora_scaling = nn.Parameter(torch.zeros(shape) if init else torch.ones(shape))
        with torch.no_grad():
            for B_i in self.lora_B.split(r, dim=1):  # each (d_out, r): Kaiming with fan-in r, module by module
                _kaiming(B_i)
        # A = [A_1; …; A_n] is already Kaiming-uniform (LoRA's A init, fan-in d_in for every A_i)

    def scaled_B(self) -> torch.Tensor:
        """[s_1 B_1, …, s_n B_n] (d_out, n·r), built with autograd ops so s and B get their gradients from it."""
        r = self.module_rank
        s = self.multilora_scaling
        if s.dim() == 1:
            return self.lora_B * s.repeat_interleave(r)          # (d_out, n·r) * (n·r,)
        return self.lora_B * s.t().repeat_interleave(r, dim=1)   # (d_out, n·r) * (d_out, n·r)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        delta = (self.scaled_B().float() @ self.lora_A.float()) * self.scale  # (d_out, n·r) @ (n·r, d_in)
        return delta.t() if self.fan_in_fan_out else delta

    # -- the low-rank operand protocol (core/lowrank.py): A = [A_i], B = [s_i B_i] --------------------------
    def lowrank_operands(self, base_layer: nn.Module) -> Optional[LowRankOperands]:
        if self._dropout_active():
            return None
        return LowRankOperands(self.base_weight(base_layer), base_layer.bias, self.lora_A, self.scaled_B(),
                               self.scale, rebuild_weight=self.weight_rebuild(base_layer))

    def joins_sibling_group(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        return super().joins_sibling_group(x, base_layer)  # LoRA's conditions; the operands above carry s

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: Optional[torch.Tensor]) -> torch.Tensor:
        B = self.scaled_B()
        if result is None:
            if self._takes_fused_kernel(x, base_layer):
                return lora_linear(x, self.base_weight(base_layer), base_layer.bias, self.lora_A, B, self.scale,
                                   self.weight_rebuild(base_layer))
            result = base_layer(x)
        h = self.dropout(x.to(self.lora_A.dtype))
        return result + (F.linear(F.linear(h, self.lora_A), B) * self.scale).to(result.dtype)  # (N, n·r), (N, d_out)


@register_tuner("MULTILORA", MultiLoraConfig)
class MultiLoraTuner(LayerTuner):
    def create_adapter(self, base_layer, config: MultiLoraConfig, module_name: str, adapter_name: str) -> Adapter:
        kwargs = linear_lora_kwargs("MultiLoRA", base_layer, config, module_name)
        return MultiLoraLinear(config.n_modules, config.scaling, **kwargs)


# The scalings start at 0 and move about lr per Adam step, so the update grows more slowly than LoRA's at the same
# rate: on SmolLM2-135M's demo task (40 steps × 8) exact match 41% at 2e-3, 44% at 5e-3, 53% at 1e-2, 48% at 2e-2.
register_method(MethodInfo(
    "multilora", MultiLoraConfig, category="reparameterized", kind="delta-weight", mergeable=True,
    hf_peft_compatible=False, default_lr=1e-2, **LORA_FLAG_FIELDS,
    description="n parallel LoRA modules per layer, ΔW = Σ s_i·B_i A_i with learnable scalings s_i (init 0) and "
                "Kaiming-init B_i (Wang et al. 2023)"))
