"""LoRA-Pro: LoRA whose gradients are adjusted before every optimizer step (Wang et al., ICLR 2025, "LoRA-Pro: Are
Low-Rank Adapters Properly Optimized?", github.com/mrflogs/LoRA-Pro).

The forward is LoRA's, y = W x + s·B A x. A step of (g_A, g_B) on A and B moves W + s·BA by the "equivalent
gradient" s·(B g_A + g_B A), which for LoRA's own gradients (g_A = s·Bᵀg, g_B = s·g Aᵀ, g the full gradient of W)
is s²·(BBᵀg + g AᵀA), a poor stand-in for g. LoRA-Pro replaces them, from g_A and g_B alone, by the pair whose
equivalent gradient is closest to g:
    g̃_A = (1/s²)(BᵀB)⁻¹ g_A + X A
    g̃_B = (1/s²)[I − B(BᵀB)⁻¹Bᵀ] g_B (AAᵀ)⁻¹ − B X
so that s·(B g̃_A + g̃_B A) = P_B g + (I − P_B) g P_A, the orthogonal projection of g onto what a rank-r step of
(A, B) can reach (P_B, P_A: projections onto B's columns and A's rows), for any r×r X. The paper's X, used here, is
the one that keeps (g̃_A, g̃_B) closest to (g_A, g_B): the solution of the Sylvester equation
    BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ g_A Aᵀ.
The inverses are pseudo-inverses (the authors' code: pinv), so B = 0 at LoRA's init gives g̃_A = 0 and
g̃_B = g_B (AAᵀ)⁻¹/s², the authors' first step. The r×r algebra runs in float64.

Where: `LoraProTuner.before_optimizer_step` (declared by `adjusts_gradients`), which peftlab's loop calls after
gradient clipping and before `optimizer.step()`, and `peftlab.Trainer` / `method_hooks_callback()` from HF
Trainer's `on_pre_optimizer_step` (also after clipping). A hand-written loop must call
`model.before_optimizer_step(step)` between backward and `optimizer.step()`, or it trains plain LoRA.

What differs from the paper: the optimizer. The adjusted gradients go into the loop's ordinary AdamW (moments of
g̃_A and g̃_B, decoupled weight decay), which is the authors' low-memory variant (peta/optim.py AdamW with its
default mode="efficient", and peta/optim_efficient_adamw_only.py). The paper's results come from their DeepSpeed
integration ("full" mode), which keeps full-size (d_out×d_in) Adam moments of the equivalent gradient per layer,
projects Adam's direction m̂/(√v̂+ε) back onto A and B with the same closed form and applies it by plain SGD.
That needs the method to replace the optimizer and to carry full fine-tuning's optimizer state (outside the
optimizer, so checkpoints would lose it), which a gradient hook cannot do honestly; it is not implemented.

File: LoRA's layout (lora_A.weight, lora_B.weight) under our own peft_type "LORA_PRO"; the tensors are a plain LoRA
adapter (`config.to_lora_config()` gives the HF PEFT config with the same outputs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.layer import Adapter
from ...core.registry import MethodInfo, register_method, register_tuner
from ...core.tuner import LayerTuner
from .config import LORA_FLAG_FIELDS, LoraConfig
from .layers import LoraLinear, linear_lora_kwargs


@dataclass
class LoraProConfig(LoraConfig):
    peft_type: str = "LORA_PRO"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ValueError("LoRA-Pro does not combine with DoRA (use_dora=True): its closed form is for W + s·BA "
                             "without a magnitude; use method 'dora' or leave use_dora=False")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoRA-Pro supports init_lora_weights True, False or 'gaussian', got "
                             f"{self.init_lora_weights!r}")


def _gram_eig(m: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (zero below rtol·max, as torch.linalg.pinv cuts them) and eigenvectors of a PSD Gram matrix."""
    evals, evecs = torch.linalg.eigh(m)
    evals = torch.where(evals > rtol * evals.max().clamp(min=0), evals, torch.zeros_like(evals))
    return evals, evecs


def _pinv(evals: torch.Tensor, evecs: torch.Tensor) -> torch.Tensor:
    inv = torch.where(evals > 0, 1 / evals, torch.zeros_like(evals))
    return (evecs * inv) @ evecs.t()


def pro_gradients(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's (g̃_A, g̃_B) from A (r, d_in), B (d_out, r) and LoRA's gradients (the module docstring)."""
    r = A.shape[0]
    # the cutoff torch.linalg.pinv applies by default to an r×r matrix in the gradients' own precision
    rtol = r * torch.finfo(grad_A.dtype).eps
    A, B, gA, gB = (t.detach().to(torch.float64) for t in (A, B, grad_A, grad_B))
    lam, U = _gram_eig(B.t() @ B, rtol)                       # BᵀB = U diag(λ) Uᵀ, (r, r)
    mu, V = _gram_eig(A @ A.t(), rtol)                        # AAᵀ = V diag(μ) Vᵀ
    btb_inv = _pinv(lam, U)
    base_A = btb_inv @ gA / scale ** 2                        # (r, r) @ (r, d_in)
    gB_perp = gB - B @ (btb_inv @ (B.t() @ gB))               # [I − B(BᵀB)⁻¹Bᵀ] g_B, (d_out, r)
    base_B = gB_perp @ _pinv(mu, V) / scale ** 2
    # BᵀB X + X AAᵀ = C in the two eigenbases: (λ_i + μ_j) Y_ij = (Uᵀ C V)_ij, X = U Y Vᵀ
    rhs = U.t() @ (-(base_A @ A.t())) @ V
    denom = lam[:, None] + mu[None, :]
    X = U @ torch.where(denom > 0, rhs / denom.clamp(min=torch.finfo(denom.dtype).tiny), 0.0) @ V.t()
    return (base_A + X @ A).to(grad_A.dtype), (base_B - B @ X).to(grad_B.dtype)


class LoraProLinear(LoraLinear):
    """LoRA's layer, plus the step that replaces its gradients by LoRA-Pro's (called by the tuner's hook)."""

    def adjust_gradients(self) -> None:
        gA, gB = self.lora_A.grad, self.lora_B.grad
        if gA is None or gB is None:  # not part of this step's graph
            return
        new_A, new_B = pro_gradients(self.lora_A, self.lora_B, gA, gB, self.scale)
        gA.copy_(new_A)
        gB.copy_(new_B)


@register_tuner("LORA_PRO", LoraProConfig)
class LoraProTuner(LayerTuner):
    adjusts_gradients = True

    def create_adapter(self, base_layer, config: LoraProConfig, module_name: str, adapter_name: str) -> Adapter:
        return LoraProLinear(**linear_lora_kwargs("LoRA-Pro", base_layer, config, module_name))

    @torch.no_grad()
    def before_optimizer_step(self, model, adapter_name, config, step):
        for _, layer in self._layers_with(model, adapter_name):
            layer.adapters[adapter_name].adjust_gradients()


register_method(MethodInfo(
    "lora-pro", LoraProConfig, category="reparameterized", kind="delta-weight", mergeable=True,
    hf_peft_compatible=False, default_lr=2e-3, **LORA_FLAG_FIELDS,
    description="LoRA whose A/B gradients are adjusted so s(B·gA + gB·A) best approximates the full gradient "
                "(Wang et al. 2025)"))
