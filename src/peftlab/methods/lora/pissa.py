"""PiSSA: LoRA initialised from the top-r singular triplets of W, the residual kept as the frozen base.

W = U S Vᵀ; A = diag(√(S_r/s)) V_rᵀ (r, d_in), B = U_r diag(√(S_r/s)) (d_out, r), and the base weight becomes
W − s·B A, so the adapted model equals the original at step 0 (Meng et al. 2024). `init_lora_weights="pissa"`
takes the exact SVD, "pissa_niter_N" a randomised SVD with N subspace iterations (HF PEFT's options).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import LoraLinear


@torch.no_grad()
def init_pissa(adapter: LoraLinear, base_layer: nn.Module, mode: str) -> None:
    w = adapter.base_weight(base_layer)
    dtype = w.dtype
    w32 = w.detach().float()
    if mode == "pissa":
        u, s, vh = torch.linalg.svd(w32, full_matrices=False)
        u, s, vh = u[:, : adapter.r], s[: adapter.r], vh[: adapter.r]
    else:
        u, s, v = torch.svd_lowrank(w32, adapter.r, niter=int(mode.split("_niter_")[-1]))
        vh = v.t()
    s = s / adapter.scale
    adapter.lora_A.copy_(torch.diag(s.sqrt()) @ vh)   # (r, d_in)
    adapter.lora_B.copy_(u @ torch.diag(s.sqrt()))    # (d_out, r)
    residual = (w32 - adapter.scale * adapter.lora_B @ adapter.lora_A).to(dtype)
    base_layer.weight.data = residual.t().contiguous() if adapter.fan_in_fan_out else residual
