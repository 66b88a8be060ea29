"""HF PEFT's helper functions that training scripts import, with PEFT's signatures, semantics and return values.

get_peft_model_state_dict / set_peft_model_state_dict (one adapter's tensors under the saved key names, in and
out), inject_adapter_in_model (adapter layers put into a plain model, which keeps `peft_config`),
prepare_model_for_kbit_training, and get_layer_status / get_model_status. Deliberate differences from PEFT are
listed in README.md ("PEFT drop-in"): loading is strict (a key that fits nowhere is an error, not an entry of
`unexpected_keys`), and `ignore_mismatched_sizes=True` is refused.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Optional, Union

import torch
import torch.nn as nn
from torch.nn.modules.module import _IncompatibleKeys

from .core import adapter_files as files
from .core.config import PeftConfig
from .core.model import PeftModel
from .core.registry import get_tuner
from .core.status import TunerLayerStatus, TunerModelStatus, layer_status, model_status

__all__ = ["get_peft_model_state_dict", "set_peft_model_state_dict", "inject_adapter_in_model",
           "prepare_model_for_kbit_training", "get_layer_status", "get_model_status", "TunerLayerStatus",
           "TunerModelStatus"]

# Models adapted in place by inject_adapter_in_model -> their adapters' configs (also set as `model.peft_config`,
# PEFT's attribute). Weak keys: the entry goes with the model.
_INJECTED: "weakref.WeakKeyDictionary[nn.Module, dict[str, PeftConfig]]" = weakref.WeakKeyDictionary()


def _as_peft_model(model: nn.Module, what: str) -> PeftModel:
    if isinstance(model, PeftModel):
        return model
    if model in _INJECTED:
        return PeftModel.over_injected(model, _INJECTED[model])
    raise TypeError(f"{what} needs a peftlab PeftModel (get_peft_model) or a model adapted by "
                    f"peftlab.inject_adapter_in_model; got a plain {type(model).__name__}")


def _check_adapter(pm: PeftModel, adapter_name: str) -> None:
    if adapter_name not in pm.peft_config:
        raise ValueError(f"no adapter named {adapter_name!r}; this model has: {', '.join(pm.peft_config)}")


def _unprefixed(model: nn.Module, tensors: dict) -> dict:
    """A model adapted in place has no `base_model.model.` in its names, so PEFT's keys for it have none either."""
    if isinstance(model, PeftModel):
        return tensors
    return {k.removeprefix(files.PREFIX): v for k, v in tensors.items()}


def _identity(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


def _names_by_tensor(model: nn.Module) -> dict[tuple, list[str]]:
    """The model's state_dict names of each tensor (by storage, shape and layout: one tensor may have several)."""
    out: dict[tuple, list[str]] = {}
    for name, t in model.state_dict().items():
        out.setdefault(_identity(t), []).append(name)
    return out


def _values_from(saved: dict, model: nn.Module, state_dict: dict) -> dict:
    """PEFT's `state_dict=` argument: each saved tensor's value taken from the given state dict (e.g. one gathered
    under DeepSpeed), by the model's own name for it; a tensor the export derives keeps its computed value."""
    names = _names_by_tensor(model)
    out = {}
    for key, t in saved.items():
        own = names.get(_identity(t))
        if own is None:
            out[key] = t
            continue
        given = next((state_dict[n] for n in own if n in state_dict), None)
        if given is not None:
            out[key] = given
    return out


def get_peft_model_state_dict(model: nn.Module, state_dict: Optional[dict] = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False,
                              save_embedding_layers: Union[bool, str] = "auto") -> dict[str, torch.Tensor]:
    """One adapter's tensors under HF PEFT's saved names (the adapter name removed); the embedding matrices too
    where save_embedding_layers (True, False, "auto": PEFT's rule) says so."""
    if unwrap_compiled and isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    pm = _as_peft_model(model, "get_peft_model_state_dict")
    _check_adapter(pm, adapter_name)
    saved = files.adapter_state_dict(pm, adapter_name, save_embedding_layers)
    if state_dict is not None:
        saved = _values_from(saved, model, state_dict)
    return _unprefixed(model, saved)


def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict, adapter_name: str = "default",
                              ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False):
    """Load tensors saved by get_peft_model_state_dict (or read from an adapter file) into the adapter
    `adapter_name`; returns PEFT's `_IncompatibleKeys(missing_keys, unexpected_keys)`: missing_keys are the
    model's state_dict entries that were not loaded (the base model's), unexpected_keys is empty, because a key
    that fits nowhere is an error here. low_cpu_mem_usage changes nothing: peftlab's adapters are never on meta."""
    if ignore_mismatched_sizes:
        raise ValueError("set_peft_model_state_dict(ignore_mismatched_sizes=True) is not supported: peftlab loads "
                         "an adapter whole or not at all; fix the shapes (an adapter for another base model or r?)")
    pm = _as_peft_model(model, "set_peft_model_state_dict")
    _check_adapter(pm, adapter_name)
    files.load_adapter_state(pm, adapter_name, dict(peft_model_state_dict))
    own = files.adapter_state_dict(pm, adapter_name)
    names = _names_by_tensor(model)
    loaded = {n for t in own.values() for n in names.get(_identity(t), [])}
    prefix = files.PREFIX if isinstance(model, PeftModel) else ""
    plain = {k.removeprefix(files.PREFIX) for k in own}
    # the rest were embedding matrices (saved under the module's own name, the same in memory)
    loaded |= {prefix + k.removeprefix(files.PREFIX) for k in peft_model_state_dict
               if k.removeprefix(files.PREFIX) not in plain}
    return _IncompatibleKeys([n for n in model.state_dict() if n not in loaded], [])


def _targets_from_state_dict(cfg: PeftConfig, model: nn.Module, state_dict: dict) -> PeftConfig:
    """PEFT's inject_adapter_in_model(state_dict=...): the modules that own adapter tensors in the state dict are
    the targets (a key's owner is its longest prefix naming a module; a key for the module's own tensor, such as
    a stored embedding matrix or a head, names no target)."""
    if "target_modules" not in {f.name for f in dataclasses.fields(cfg)}:
        raise ValueError(f"inject_adapter_in_model(state_dict=...): {type(cfg).__name__} has no target_modules")
    modules = dict(model.named_modules())
    targets = set()
    for key in state_dict:
        parts = key.removeprefix(files.PREFIX).removeprefix("_orig_mod.").split(".")
        i = max((i for i in range(1, len(parts)) if ".".join(parts[:i]) in modules), default=None)
        if i is None:
            continue
        owner = modules[".".join(parts[:i])]
        own = {n for n, _ in owner.named_parameters(recurse=False)} | {n for n, _ in owner.named_buffers(recurse=False)}
        if parts[i] not in own and parts[i] != "modules_to_save":
            targets.add(".".join(parts[:i]))
    if not targets:
        raise ValueError("inject_adapter_in_model(state_dict=...): no key of the state dict names an adapter "
                         "tensor of a module of this model (keys look like '<module>.lora_A.weight')")
    return cfg.replace(target_modules=sorted(targets))


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> nn.Module:
    """Put the adapter's layers into `model` in place and return it (not a PeftModel), as HF PEFT does: the base
    is frozen, the adapter trainable, and `model.peft_config` holds the config. low_cpu_mem_usage changes
    nothing (adapters are created in memory)."""
    if isinstance(model, PeftModel):
        raise TypeError("inject_adapter_in_model: the model is already a PeftModel; use "
                        "model.add_adapter(adapter_name, peft_config)")
    if get_tuner(peft_config.peft_type).rewrites_inputs:
        raise ValueError(f"inject_adapter_in_model does not support {peft_config.peft_type}: it rewrites the "
                         f"model's inputs (virtual tokens or key/value prefixes), which PeftModel's forward does; "
                         f"use get_peft_model")
    if state_dict is not None:
        peft_config = _targets_from_state_dict(peft_config, model, state_dict)
    if model in _INJECTED:
        pm = PeftModel.over_injected(model, _INJECTED[model])
        pm.add_adapter(adapter_name, peft_config)
        pm.set_adapter(adapter_name)
    else:
        pm = PeftModel(model, peft_config, adapter_name)
    _INJECTED[model] = pm.peft_config
    model.peft_config = pm.peft_config
    return model


# Quantisation backends whose weights PEFT leaves in their own dtype (it upcasts everything else to fp32).
_KEEP_DTYPE = ("gptq", "aqlm", "eetq", "hqq", "torchao")


def _quantization(model: nn.Module) -> Optional[str]:
    """Transformers' own markers on a quantised model: "kbit" (bitsandbytes 8/4-bit), a backend name, or None."""
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return "kbit"
    if getattr(model, "hqq_quantized", False):
        return "hqq"
    method = getattr(model, "quantization_method", None)
    return str(getattr(method, "value", method)) if method is not None else None


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """HF PEFT's preparation of a (quantised) Transformers model for adapter training: every parameter frozen;
    fp16/bf16 parameters upcast to fp32 (not 4-bit ones, nor those of backends that keep their dtype); and, for a
    quantised model with use_gradient_checkpointing, input gradients (unless use_reentrant=False) and gradient
    checkpointing. On a model that is not quantised PEFT does the first two only, and so does this."""
    quant = _quantization(model)
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for p in model.parameters():
        p.requires_grad_(False)
    if quant not in _KEEP_DTYPE:
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
                p.data = p.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the fp16 copies' memory goes back (shared host/accelerator memory)
    if quant is not None and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            # reentrant checkpointing needs an input that requires grad, or the frozen layers get no gradient
            model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """HF PEFT's get_layer_status for a PeftModel or a model adapted by inject_adapter_in_model."""
    pm = _as_peft_model(model, "get_layer_status")
    return layer_status(pm, root=None if model is pm else model)


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """HF PEFT's get_model_status; a model adapted in place reports adapter_model_type "None", as in PEFT."""
    if isinstance(model, PeftModel):
        return model_status(model)
    from transformers import PreTrainedModel
    kind = type(model).__name__ if isinstance(model, PreTrainedModel) else "other"
    return model_status(_as_peft_model(model, "get_model_status"), plain=kind, root=model)

