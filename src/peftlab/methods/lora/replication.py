"""LoRA's `layer_replication` (HF PEFT's replicate_layers): a deeper model from repeated decoder layers.

`[[0, 4], [2, 5]]` turns layers 0..4 into [0, 1, 2, 3, 2, 3, 4]: each entry is a clone whose base weights are the
original layer's tensors (shared, no extra memory), so LoRA then gives every position its own adapter. As in PEFT,
the layer list is `<...>.layers` (LLaMA-like), `encoder.layer` (BERT-like) or `h` (Falcon); each clone's
`layer_idx` is set to its new position (the KV cache is indexed by it) and `config.num_hidden_layers` is updated.
The replication happens when the adapter is added, so a saved adapter loads onto a fresh base model.
"""
from __future__ import annotations

import copy

import torch.nn as nn


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    """(owner, attribute) of the block list, found the way HF PEFT finds it."""
    inner = model
    while isinstance(getattr(inner, "model", None), nn.Module):
        inner = inner.model
    if isinstance(getattr(inner, "bert", None), nn.Module):
        inner = inner.bert
    for owner, attr in ((inner, "layers"), (getattr(inner, "encoder", None), "layer"), (inner, "h")):
        if owner is not None and isinstance(getattr(owner, attr, None), nn.ModuleList):
            return owner, attr
    raise ValueError(f"layer_replication: no decoder layer list found in this {type(model).__name__} (looked for "
                     f"LLaMA-style .layers, BERT-style .encoder.layer and Falcon-style .h, as HF PEFT does)")


def _clone_sharing_weights(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module)
    for name, sub in module.named_modules():
        target = clone.get_submodule(name)
        for pname, param in sub.named_parameters(recurse=False):
            target.register_parameter(pname, param)
    return clone


def replicate_layers(model: nn.Module, layer_map: list) -> None:
    owner, attr = _layer_list(model)
    layers = getattr(owner, attr)
    spans = [tuple(span) for span in layer_map]
    bad = [s for s in spans if len(s) != 2 or not 0 <= s[0] < s[1] <= len(layers)]
    if bad:
        raise ValueError(f"layer_replication: each entry is [start, end) with 0 <= start < end <= {len(layers)} "
                         f"(the model's layer count); got {bad[0]}")
    new = []
    for start, end in spans:
        for i in range(start, end):
            clone = _clone_sharing_weights(layers[i])
            for sub in clone.modules():
                if isinstance(getattr(sub, "layer_idx", None), int):
                    sub.layer_idx = len(new)
            new.append(clone)
    setattr(owner, attr, nn.ModuleList(new))
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "num_hidden_layers", None), int):
        config.num_hidden_layers = len(new)
