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

import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from safetensors import safe_open

from ...core.quantized import is_quantized, quantize_round_trip
from .dora import DoraLinear
from .layers import LoraLinear

BITS = {4: "nf4", 8: "int8"}


@torch.no_grad()
def init_loftq(adapter: LoraLinear, base_layer: nn.Module, loftq_config: dict, module_name: str) -> None:
    if is_quantized(base_layer):
        raise ValueError(f"{module_name}: LoftQ starts from the full-precision weights, but this base is already "
                         f"quantised. Load the base unquantised, get_peft_model with init_lora_weights='loftq', save "
                         f"the base (its weights are then LoftQ's Q) and load that quantised (HF PEFT's recipe too); or, "
                         f"on this quantised base, get_peft_model with the default init and then "
                         f"replace_lora_weights_loftq(model) (one LoftQ step from the checkpoint's weights)")
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


# -- LoftQ on a base that is already quantised (HF PEFT's replace_lora_weights_loftq) ----------------------------
PEFT_PREFIX = "base_model.model."


class _Checkpoint:
    """Reads single tensors of a safetensors checkpoint (one file or an index of shards) by module name, trying the
    name as the model spells it and without the model's base_model_prefix (a causal LM's "model.")."""

    def __init__(self, model_path: str, base_model_prefix: Optional[str]):
        path = Path(model_path)
        folder = path.parent if path.suffix == ".safetensors" else path
        single = path if path.suffix == ".safetensors" else path / "model.safetensors"
        index = folder / "model.safetensors.index.json"
        if single.is_file():
            self.files = None
            self.single = single
        elif index.is_file():
            self.files = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            raise FileNotFoundError(f"LoftQ needs the unquantised weights: no {single.name} or {index.name} in "
                                    f"{folder} (pass model_path= the directory of the base's safetensors checkpoint)")
        self.prefix = base_model_prefix

    def get(self, name: str) -> torch.Tensor:
        candidates = [name]
        if self.prefix and name.startswith(self.prefix + "."):
            candidates.append(name[len(self.prefix) + 1:])
        for key in candidates:
            file = self.single if self.files is None else self.files.get(key)
            if file is None:
                continue
            with safe_open(str(file), framework="pt", device="cpu") as f:
                if key in f.keys():
                    return f.get_tensor(key)
        raise KeyError(f"LoftQ: the checkpoint has no tensor {' or '.join(candidates)} (is it this base model's?)")


def _model_path(peft_model) -> str:
    name = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", "") or ""
    if Path(name).is_dir():
        return name
    try:  # a hub id: its snapshot in the local cache (never downloaded here)
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - every way of not finding it ends in the same advice
        raise ValueError(f"LoftQ needs the base's unquantised safetensors checkpoint, and the model's "
                         f"config._name_or_path ({name!r}) is not a local directory or cached hub model; pass "
                         f"model_path=") from e


@torch.no_grad()
def replace_lora_weights_loftq(peft_model, model_path: Optional[str] = None, adapter_name: str = "default",
                               callback: Optional[Callable[[nn.Module, str], bool]] = None, *,
                               match_scaling: bool = False) -> None:
    """Set the LoRA weights on every 4-bit (bitsandbytes NF4/FP4) base layer of `peft_model` to one LoftQ step from
    the unquantised weights, which are read from the base's safetensors checkpoint: B A = the best rank-r
    approximation of W − deq(Q), Q the layer's own quantised weight (which stays as it is). HF PEFT's function of
    the same name and arguments; unlike PEFT's it also runs on CPU.

    callback(peft_model, name) → bool, called after each layer: False puts the previous A, B back (e.g. when the
    logits did not get closer to the unquantised model's).

    PEFT leaves the adapter's scaling s out (B A is set to the residual's rank-r part, and the model adds s·B A),
    which reproduces LoftQ only when s = 1 (lora_alpha = r). match_scaling=True divides A and B by √s each, so the
    model starts at Q + the residual's rank-r part whatever lora_alpha is."""
    from ...core.quantized import dequantize, quant_kind
    from ...core.tuner import adapted_layers
    reader = _Checkpoint(model_path or _model_path(peft_model),
                         getattr(peft_model.get_base_model(), "base_model_prefix", None))
    replaced = 0
    for name, layer in adapted_layers(peft_model):
        if quant_kind(layer.base_layer) not in ("nf4", "fp4") or adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        if not isinstance(adapter, LoraLinear) or isinstance(adapter, DoraLinear) or adapter.fan_in_fan_out:
            raise TypeError(f"{name}: LoftQ sets a plain LoRA's A and B; this layer's adapter is "
                            f"{type(adapter).__name__} (DoRA's magnitudes would no longer match its direction)")
        relative = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        w = reader.get(relative + ".weight").float()
        residual = w - dequantize(layer.base_layer, torch.float32).to(w.device)
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = s[: adapter.r].sqrt()
        if match_scaling:
            root = root / math.sqrt(adapter.scale)
        b, a = u[:, : adapter.r] * root, root.unsqueeze(1) * vh[: adapter.r]
        before = adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone()
        adapter.lora_A.copy_(a)
        adapter.lora_B.copy_(b)
        replaced += 1
        if callback is not None and not callback(peft_model, relative):
            adapter.lora_A.copy_(before[0])
            adapter.lora_B.copy_(before[1])
    if not replaced:
        raise ValueError(f"replace_lora_weights_loftq: no LoRA adapter {adapter_name!r} on a 4-bit (nf4/fp4) "
                         f"bitsandbytes layer; load the base with quantize='nf4' (or BitsAndBytesConfig("
                         f"load_in_4bit=True)) before get_peft_model")
