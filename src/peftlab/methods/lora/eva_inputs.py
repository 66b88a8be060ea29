"""EVA's input handling, with HF PEFT's names and arguments (forward_fn_dict, prepare_model_inputs_fn_*,
prepare_layer_inputs_fn_*), so custom functions written for PEFT fit: which positions of a batch the PCA sees, and
how a target layer's input becomes (N, d) rows."""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn as nn

from .config import EvaConfig


def forward_fn_dict(model: nn.Module, inputs: dict):
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: dict, peft_config) -> torch.Tensor:
    """(N, 2) indices of the positions the SVD uses: attention mask, and labels != label_mask_value."""
    if not isinstance(model_input, dict):
        raise TypeError(f"EVA's language-modeling input function needs batch dicts, got {type(model_input).__name__}; "
                        f"pass prepare_model_inputs_fn=None or your own")
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    opts = EvaConfig.of(peft_config.eva_config)
    if opts.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != opts.label_mask_value)
    return mask.nonzero()


def _first_tensor(layer_input, layer_name: str) -> torch.Tensor:
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"EVA: {layer_name} gets a {type(x).__name__}, not a tensor; pass a prepare_layer_inputs_fn "
                        f"that returns its inputs as a 2-D tensor")
    return x


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input: torch.Tensor, layer_name: str):
    """The layer's input rows at the positions prepare_model_inputs_fn_language_modeling chose."""
    return _first_tensor(layer_input, layer_name)[model_input.T.unbind()]


def prepare_layer_inputs_fn_default(layer_input, model_input, layer_name: str) -> torch.Tensor:
    """Used when prepare_layer_inputs_fn is None: every position, flattened to (N, d)."""
    x = _first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x


def layer_fns(names: list[str], prepare_layer_inputs_fn) -> dict[str, Callable]:
    """Each target's prepare function: one for all, or a dict by module name (PEFT's forms), else the default."""
    if not isinstance(prepare_layer_inputs_fn, Mapping):
        fn = prepare_layer_inputs_fn or prepare_layer_inputs_fn_default
        return {n: fn for n in names}
    unknown = sorted(set(prepare_layer_inputs_fn) - set(names))
    if unknown:
        raise ValueError(f"prepare_layer_inputs_fn names modules EVA does not target: {unknown}")
    return {n: prepare_layer_inputs_fn.get(n) or prepare_layer_inputs_fn_default for n in names}
