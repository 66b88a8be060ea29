"""Base-model tensors an adapter trains besides its own: trainable head copies (HF PEFT's modules_to_save) and the
biases `bias="all"` / `"lora_only"` trains. PeftModel activates, saves and loads them with the adapter."""
from __future__ import annotations

import re
from typing import Iterator

import torch.nn as nn

from .layer import ModulesToSave, PeftlabModule
from .tuner import set_submodule


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> None:
    """Give every module whose name ends in one of `names` a trainable copy for this adapter (ModulesToSave)."""
    if not names:
        return
    found = False
    wrappers = [w for w, m in model.named_modules() if w and isinstance(m, PeftlabModule)]
    for full, module in list(model.named_modules()):
        if any(full.startswith(w + ".") for w in wrappers):
            continue  # never wrap the insides of an adapted layer or of another head copy
        if any(re.fullmatch(rf"(.*\.)?{re.escape(n)}", full) for n in names):
            wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
            wrapper.add(adapter_name)
            if wrapper is not module:
                set_submodule(model, full, wrapper)
            found = True
    if not found:
        raise ValueError(f"modules_to_save {names} matched no module of this {type(model).__name__}")


def head_copies(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def trained_biases(model: nn.Module, mode: str, adapter_name: str) -> dict[str, nn.Parameter]:
    """Biases trained under `bias="all"` (every bias) or `"lora_only"` (biases of adapted layers), keyed by
    their saved names. HF PEFT names a head copy's bias `<head>.modules_to_save.bias`; we follow it."""
    if mode == "none":
        return {}
    if mode not in ("all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {mode!r}")
    out = {}
    for name, p in model.named_parameters():
        if not name.endswith("bias") or ".adapters." in name:
            continue
        if mode == "lora_only" and ".base_layer." not in name:
            continue
        if ".copies." in name:
            head, _, rest = name.partition(".copies.")
            owner, _, param = rest.partition(".")
            if owner != adapter_name:
                continue
            name = f"{head}.modules_to_save.{param}"
        out[name] = p
    return out
