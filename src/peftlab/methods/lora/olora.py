"""OLoRA: LoRA initialised from the QR decomposition of W, the residual kept as the frozen base (Büyükakyüz 2024).

W = Q R; B = Q[:, :r] (d_out, r, orthonormal columns), A = R[:r] (r, d_in), and the base weight becomes W − s·B A,
so the adapted model equals the original at step 0. Unlike PiSSA the factors are not divided by s: HF PEFT's
`init_lora_weights="olora"` does not, and files must mean the same thing in both libraries.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import LoraLinear


@torch.no_grad()
def init_olora(adapter: LoraLinear, base_layer: nn.Module, module_name: str) -> None:
    if adapter.fan_in_fan_out:
        # HF PEFT factors the stored (d_in, d_out) matrix of a Conv1D and gets factors of the wrong shapes
        raise ValueError(f"{module_name}: init_lora_weights='olora' is not supported on transformers' Conv1D layers "
                         f"(GPT-2 style, fan_in_fan_out); use 'pissa' or the default init there")
    w = base_layer.weight
    w32 = w.detach().float()
    q, r = torch.linalg.qr(w32)                       # (d_out, k) (k, d_in), k = min(d_out, d_in)
    adapter.lora_A.copy_(r[: adapter.r])
    adapter.lora_B.copy_(q[:, : adapter.r])
    base_layer.weight.data = (w32 - adapter.scale * adapter.lora_B.float() @ adapter.lora_A.float()).to(w.dtype)
