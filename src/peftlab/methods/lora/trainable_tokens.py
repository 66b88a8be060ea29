"""LoRA's `trainable_token_indices` (HF PEFT's TrainableTokens): only the given rows of an embedding matrix train.

The layer computes with W' = W with rows `idx` replaced by a trained (k, dim) tensor that starts as W[idx] (the
model is unchanged at step 0); the rest of W stays frozen and is not saved. Saved as HF PEFT saves it:
`<embedding>.token_adapter.trainable_tokens_delta` (k, dim) — despite the name, the new rows, not a difference.
A layer whose weight is tied to the input embedding (GPT-2's and SmolLM2's lm_head) uses the same rows and saves
nothing, as in PEFT. A list of indices means the input embedding; a dict maps module names to their indices.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.layer import AdaptedLayer, Adapter, PeftlabModule, unwrapped
from ...core.tuner import set_submodule


class TrainableTokens(Adapter):
    """Rows `token_indices` of an Embedding's (or a Linear's output) weight replaced by trained values."""
    mergeable = True
    fuses_base = True
    saved_names = {"delta": "token_adapter.trainable_tokens_delta"}
    unsaved = ("index", "original")

    def __init__(self, base_layer: nn.Module, token_indices: list[int], tied_to: Optional["TrainableTokens"] = None):
        super().__init__()
        w = base_layer.weight
        bad = [i for i in token_indices if not 0 <= i < w.shape[0]]
        if bad or not token_indices:
            raise ValueError(f"trainable_token_indices must be a non-empty list of rows in [0, {w.shape[0]}), got "
                             f"{token_indices if not bad else bad}")
        self._tied = [tied_to] if tied_to is not None else []  # a list: the source is not a submodule of this one
        if tied_to is None:
            self.register_buffer("index", torch.tensor(token_indices, dtype=torch.long, device=w.device))
            self.register_buffer("original", w.detach()[self.index].clone())
            self.delta = nn.Parameter(self.original.clone())

    @property
    def source(self) -> "TrainableTokens":
        return self._tied[0] if self._tied else self

    def merged_weight(self, base_layer: nn.Module) -> torch.Tensor:
        src = self.source
        return base_layer.weight.index_copy(0, src.index, src.delta.to(base_layer.weight.dtype))

    def merge_into(self, base_layer: nn.Module) -> None:
        # Replacing rows is idempotent, so a tied layer (same weight tensor) may merge again harmlessly.
        src = self.source
        with torch.no_grad():
            base_layer.weight.data.index_copy_(0, src.index, src.delta.to(base_layer.weight.dtype))

    def unmerge_from(self, base_layer: nn.Module) -> None:
        src = self.source
        with torch.no_grad():
            base_layer.weight.data.index_copy_(0, src.index, src.original.to(base_layer.weight.dtype))

    def _apply(self, x: torch.Tensor, base_layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        if isinstance(base_layer, nn.Embedding):
            return F.embedding(x, weight, base_layer.padding_idx, base_layer.max_norm, base_layer.norm_type,
                               base_layer.scale_grad_by_freq, base_layer.sparse)
        return F.linear(x, weight, base_layer.bias)  # a tied lm_head has no bias

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: Optional[torch.Tensor]) -> torch.Tensor:
        if result is None:
            return self._apply(x, base_layer, self.merged_weight(base_layer))
        # after another adapter of this layer: add what the replaced rows change, (new − old) at those rows
        src = self.source
        change = torch.zeros_like(base_layer.weight).index_copy(0, src.index, src.delta - src.original)
        return result + self._apply(x, base_layer, change).to(result.dtype)


def token_targets(model: nn.Module, indices) -> dict[str, list[int]]:
    """Module name -> row indices: a list means the input embedding, a dict names the modules (regex suffixes)."""
    if not isinstance(indices, dict):
        embedding = model.get_input_embeddings()
        return {next(n for n, m in model.named_modules() if m is embedding): list(indices)}
    out = {}
    for key, rows in indices.items():
        found = [n for n, _ in model.named_modules() if re.fullmatch(rf"(.*\.)?{re.escape(key)}", n)]
        if not found:
            raise ValueError(f"trainable_token_indices names {key!r}, which matches no module of this "
                             f"{type(model).__name__}; name an embedding (e.g. 'embed_tokens') or a Linear")
        out.update({n: list(rows) for n in found})
    return out


def add_trainable_tokens(model: nn.Module, config, adapter_name: str) -> None:
    """Wrap the modules config.trainable_token_indices names, and the layers tied to them, for one adapter."""
    targets = token_targets(model, config.trainable_token_indices)
    clash = [n for n in targets if any(re.fullmatch(rf"(.*\.)?{re.escape(m)}", n)
                                       for m in config.modules_to_save or [])]
    if clash:
        raise ValueError(f"{clash[0]} is in modules_to_save (trained fully) and in trainable_token_indices; "
                         f"use one of the two")
    sources: dict[int, tuple[list[int], TrainableTokens]] = {}
    for name, rows in targets.items():
        layer = _wrapped(model, name, adapter_name)
        adapter = TrainableTokens(layer.base_layer, rows)
        layer.add(adapter_name, adapter)
        sources[id(layer.base_layer.weight)] = (rows, adapter)
    wrappers = [n for n, m in model.named_modules() if isinstance(m, PeftlabModule)]
    for name, module in list(model.named_modules()):
        if name in targets or any(name.startswith(w + ".") for w in wrappers):
            continue  # a target itself, or the inside of a wrapper (the embedding's own base layer)
        base = unwrapped(module)
        tied = sources.get(id(getattr(base, "weight", None)))
        if tied is None or not isinstance(base, (nn.Linear, nn.Embedding)):
            continue
        layer = _wrapped(model, name, adapter_name)
        layer.add(adapter_name, TrainableTokens(layer.base_layer, tied[0], tied_to=tied[1]))


def _wrapped(model: nn.Module, name: str, adapter_name: str) -> AdaptedLayer:
    module = model.get_submodule(name)
    if isinstance(module, AdaptedLayer) and adapter_name in module.adapters:
        raise ValueError(f"{name} is both a LoRA target and in trainable_token_indices; the two cannot share one "
                         f"layer: remove it from target_modules (or from trainable_token_indices)")
    if not isinstance(module, (AdaptedLayer, nn.Embedding, nn.Linear)):
        raise ValueError(f"trainable_token_indices: {name} is a {type(module).__name__}; only nn.Embedding and "
                         f"nn.Linear rows can be trained")
    if not isinstance(module, AdaptedLayer):
        module = AdaptedLayer(module)
        set_submodule(model, name, module)
    return module
