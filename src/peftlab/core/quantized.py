"""Quantised base layers: bitsandbytes' Linear4bit (NF4 / FP4, with or without double quantisation) and
Linear8bitLt (LLM.int8), as transformers' BitsAndBytesConfig loads them.

peftlab never stores a weight in a format of its own. The base keeps bitsandbytes' packed tensors; an adapter
that needs W as a matrix reads `dense_weight(layer)`, a transient dequantised copy made by bitsandbytes' own
`dequantize_4bit` / `int8_vectorwise_dequant`, released as soon as the caller drops it. The fused kernels
(core/functional.py) are handed `weight_rebuild(layer)` with it, so they keep nothing of W for backward and
dequantise it again there, as bitsandbytes' own autograd does.

Code that writes the base weight (merging, PiSSA/CorDA/OLoRA's residual) runs inside `dense_base(layer)`: the
layer's base is swapped for a dense nn.Linear for the block and quantised back afterwards with the original
settings (the rounding this adds is the quantiser's: up to half a code gap, 0.152·(block absmax) for NF4, half a
row step for int8). bitsandbytes is an optional dependency (`peftlab[quant]`): nothing here imports it
unless a quantised model exists, and a model cannot hold bitsandbytes layers unless it has been imported.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

# bitsandbytes, when imported on a CPU with AVX512-BF16, warns that the optional `kernels` package for its
# bf16-repacked 4-bit layout is missing. peftlab keeps every 4-bit layer in the canonical layout
# (keep_canonical_layout), so that kernel is never used: the warning would only tell users to install it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _bnb():
    return sys.modules.get("bitsandbytes")


def require_bitsandbytes():
    """Import bitsandbytes, or say how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError("quantised bases need bitsandbytes: pip install 'peftlab[quant]' (bitsandbytes>=0.49)"
                          ) from e
    return bitsandbytes


def quant_kind(layer: nn.Module) -> Optional[str]:
    """"nf4", "fp4" or "int8" for a bitsandbytes layer, None for any other module."""
    bnb = _bnb()
    if bnb is None:
        return None
    if isinstance(layer, bnb.nn.Linear4bit):
        return layer.weight.quant_type
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def is_quantized(layer: nn.Module) -> bool:
    return quant_kind(layer) is not None


def _int8_scales(layer: nn.Module) -> torch.Tensor:
    # bitsandbytes moves the row scales from the weight to the layer state on the first forward
    return layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB


def parameter_count(p: torch.Tensor) -> int:
    """Weights a parameter holds: a packed 4-bit tensor stores two (or, in a wider storage dtype, more) per
    element (HF PEFT counts them the same way)."""
    bnb = _bnb()
    if bnb is not None and isinstance(p, bnb.nn.Params4bit):
        return p.numel() * 2 * p.element_size()
    return p.numel()


def quantized_bytes(layer: nn.Module) -> int:
    """Bytes a quantised layer's weight takes: the packed codes and every scale (block absmax, double
    quantisation's second-level scales and code table; int8's row scales)."""
    if quant_kind(layer) == "int8":
        return layer.weight.numel() * layer.weight.element_size() + _int8_scales(layer).numel() * 4
    state = layer.weight.quant_state
    total = layer.weight.numel() * layer.weight.element_size()
    total += state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
    if state.nested:
        s2 = state.state2
        total += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size()
    return total


def weight_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype bitsandbytes multiplies in: a 4-bit layer's compute dtype (its storage dtype if unset); int8
    layers dequantise to float32 here."""
    if quant_kind(layer) == "int8":
        return torch.float32
    if layer.compute_dtype is not None:
        return layer.compute_dtype
    return layer.weight.quant_state.dtype


def quantize_round_trip(w: torch.Tensor, kind: str, blocksize: int = 64, double_quant: bool = False) -> torch.Tensor:
    """deq(quant(w)) by bitsandbytes: what a layer quantised from w holds (4-bit kinds with this block size and
    double quantisation, or int8's row-wise absmax of w in fp16), as float32."""
    bnb = require_bitsandbytes()
    if kind == "int8":
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(w.contiguous().half())
        return bnb.functional.int8_vectorwise_dequant(codes, scales).float()
    packed, state = bnb.functional.quantize_4bit(w.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                                 quant_type=kind)
    return bnb.functional.dequantize_4bit(packed, state).float()


def keep_canonical_layout(model: nn.Module) -> None:
    """Keep every 4-bit layer of `model` in bitsandbytes' canonical layout.

    Why: bitsandbytes (0.49+) on a CPU with AVX512-BF16 repacks a 4-bit layer on its first inference forward into
    a CPU-only layout whose block scales are rounded to bfloat16: from then on the layer computes another function
    than the one it trained with (a silent train/eval skew that depends on the CPU model), and its weight is no
    longer what dequantize_4bit reads. peftlab turns the repack off for the models it adapts, and undoes one that
    already happened with bitsandbytes' own inverse (its scales stay bf16-rounded then)."""
    bnb = _bnb()
    if bnb is None:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            p = module.weight
            if getattr(p.quant_state, "packing_format_for_cpu", False):
                p.data, p.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(p.data, p.quant_state)
                module.quant_state = p.quant_state


def dequantize(layer: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The layer's weight as a dense (out_features, in_features) tensor, by bitsandbytes' own dequantisation."""
    bnb = require_bitsandbytes()
    if quant_kind(layer) == "int8":
        w = bnb.functional.int8_vectorwise_dequant(layer.weight.data, _int8_scales(layer))
    else:
        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return w.to(dtype or weight_dtype(layer))


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """W of a Linear-like layer: its own weight, or a transient dequantised copy of a quantised one."""
    return dequantize(layer) if is_quantized(layer) else layer.weight


def weight_rebuild(layer: nn.Module) -> Optional[Callable[[], torch.Tensor]]:
    """For a quantised layer, how the kernels get W again in backward (dequantise anew) instead of saving the
    dense copy; None for a dense layer, whose weight is saved at no cost (it is alive anyway)."""
    return functools.partial(dequantize, layer) if is_quantized(layer) else None


def kernels_may_dequantize(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether peftlab's fused kernels may compute W x from the dequantised W: where bitsandbytes itself does the
    same, so the function is unchanged. On CPU that is every 4-bit forward, and an int8 layer's training forward
    (its inference forward quantises the activations too: LLM.int8's matmul); on an accelerator bitsandbytes' own
    4-bit / int8 kernels run, so the base is left to bitsandbytes there."""
    if x.device.type != "cpu":
        return False
    return quant_kind(layer) != "int8" or layer.training


def base_fusable(layer: nn.Module, x: torch.Tensor) -> bool:
    """The base layer's part of the fused kernels' conditions for input x: its W (dequantised, for a quantised
    base that kernels_may_dequantize) in x's dtype."""
    if is_quantized(layer):
        return kernels_may_dequantize(layer, x) and weight_dtype(layer) == x.dtype
    return layer.weight.dtype == x.dtype


def refuse_quantized_weight(method: str, module_name: str, layer: nn.Module) -> None:
    """Methods that train a weight in place cannot train a packed one: say so, and what works instead."""
    if is_quantized(layer):
        raise ValueError(f"{method} cannot train {module_name}.weight: it is quantised ({quant_kind(layer)}; "
                         f"bitsandbytes stores it packed, frozen). Leave the module out (exclude_modules), load the "
                         f"base unquantised, or train a delta-weight method (LoRA, DoRA, ...) on the quantised base")


def dequantized_linear(layer: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """A dense nn.Linear computing what the quantised layer computes (its dequantised weight, its bias)."""
    w = dequantize(layer, dtype)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device,
                      dtype=w.dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias.to(w.dtype))
    dense.requires_grad_(False)
    return dense


def quantized_like(dense: nn.Module, like: nn.Module) -> nn.Module:
    """`dense` quantised with the settings of the bitsandbytes layer `like` (kind, block size, double
    quantisation, compute dtype, storage dtype, int8 outlier threshold), on like's device."""
    bnb = require_bitsandbytes()
    device = like.weight.device
    bias = dense.bias is not None
    if quant_kind(like) == "int8":
        out = bnb.nn.Linear8bitLt(like.in_features, like.out_features, bias=bias, has_fp16_weights=False,
                                  threshold=like.state.threshold)
        out.weight = bnb.nn.Int8Params(dense.weight.data.detach().clone(), requires_grad=False,
                                       has_fp16_weights=False).to(device)
    else:
        p = like.weight
        out = bnb.nn.Linear4bit(like.in_features, like.out_features, bias=bias, compute_dtype=like.compute_dtype,
                                compress_statistics=p.compress_statistics, quant_type=p.quant_type,
                                quant_storage=p.quant_storage)
        w = dense.weight.data.detach().to(p.quant_state.dtype).contiguous()
        out.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=p.blocksize,
                                       compress_statistics=p.compress_statistics, quant_type=p.quant_type,
                                       quant_storage=p.quant_storage, module=out).to(device)
    if bias:
        out.bias = nn.Parameter(dense.bias.data.detach().to(like.bias.dtype if like.bias is not None else
                                                            dense.bias.dtype).clone(), requires_grad=False)
    return out.to(device)


@contextlib.contextmanager
def dense_base(adapted, requantize: bool = True) -> Iterator[None]:
    """Inside the block `adapted.base_layer` is a dense nn.Linear (a dequantised copy) that code may write to;
    afterwards it is quantised back with the original settings, or left dense with requantize=False. On an
    error the original quantised layer is put back untouched. A dense base: nothing happens."""
    original = adapted.base_layer
    if not is_quantized(original):
        yield
        return
    adapted.base_layer = dequantized_linear(original)
    try:
        yield
    except BaseException:
        adapted.base_layer = original
        raise
    if requantize:
        adapted.base_layer = quantized_like(adapted.base_layer, original)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_quantized(m)]


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Every bitsandbytes layer of `model` replaced, in place, by its dense equivalent (dequantized_linear)."""
    for name, layer in quantized_layers(model):
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, dequantized_linear(layer, dtype))
    clear_quantization_markers(model)
    return model


def clear_quantization_markers(model: nn.Module) -> None:
    """After every bitsandbytes layer is dense again, drop transformers' markers so the model saves and moves as
    an ordinary one."""
    if quantized_layers(model):
        return
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "quantization_method", None) is not None:
        model.quantization_method = None
