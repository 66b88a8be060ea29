"""LoftQ: LoRA initialised so that the quantised base plus the adapter approximates the full-precision W (Li et al.
2023, "LoftQ"; HF PEFT's `init_lora_weights="loftq"` with `LoftQConfig(loftq_bits, loftq_iter)`).

Alternating T = loftq_iter times, from R_0 = W:
    Q_t = deq(quant(R_{t-1}))                       (bitsandbytes NF4, blocksize 64, no double quant; or int8)
    U S Vᵀ = svd(W − Q_t),  B_t = U_r √S_r,  A_t = √S_r V_rᵀ,  R_t = W − B_t A_t
The base weight becomes Q_T (kept in full precision; it lies on the quantiser's grid, so loading the saved base
quantised reproduces it) and the adapter (A_T, B_T) — unscaled, as HF PEFT sets them: the model equals
Q_T + s·B A, which for the usual lora_alpha = r is Q_T + (W − Q_T)'s best rank-r part.
HF PEFT runs this on CUDA/XPU only; here it runs on any device bitsandbytes quantises on, CPU included.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...core.quantized import is_quantized, quantize_round_trip
from .layers import LoraLinear

BITS = {4: "nf4", 8: "int8"}


@torch.no_grad()
def init_loftq(adapter: LoraLinear, base_layer: nn.Module, loftq_config: dict, module_name: str) -> None:
    if is_quantized(base_layer):
        raise ValueError(f"{module_name}: LoftQ starts from the full-precision weights, but this base is already "
                         f"quantised. Load the base unquantised, get_peft_model with init_lora_weights='loftq', save "
                         f"the base (its weights are then LoftQ's Q) and load that quantised (HF PEFT's recipe too)")
    bits, iters = loftq_config.get("loftq_bits", 4), loftq_config.get("loftq_iter", 1)
    w = adapter.base_weight(base_layer)
    dtype, w32 = w.dtype, w.detach().float()
    residual = w32
    for step in range(iters):
        q = quantize_round_trip(residual, BITS[bits], double_quant=False)
        u, s, vh = torch.linalg.svd(w32 - q, full_matrices=False)
        root = s[: adapter.r].sqrt()
        b, a = u[:, : adapter.r] * root, root.unsqueeze(1) * vh[: adapter.r]    # (d_out, r), (r, d_in)
        if step + 1 < iters:
            residual = w32 - b @ a
    adapter.lora_A.copy_(a)
    adapter.lora_B.copy_(b)
    q = q.to(dtype)
    base_layer.weight.data = q.t().contiguous() if adapter.fan_in_fan_out else q
