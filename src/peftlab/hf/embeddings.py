"""The embedding matrices HF PEFT stores beside an adapter (`save_embedding_layers`), and how it decides "auto".

PEFT's rule, kept exactly: `True` stores the input and output embeddings (the base matrix of an adapted embedding
layer, or the whole module when it is not adapted: a vocabulary resized for new tokens); `"auto"` means True when
target_modules names an `embed_tokens` / `lm_head` layer (not with trainable_token_indices), or when the model's
vocab_size differs from the one in the base model's config.json (a resized vocabulary), else False.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

# Module names HF PEFT treats as embedding layers (peft.utils.constants.EMBEDDING_LAYER_NAMES).
EMBEDDING_LAYER_NAMES = ["embed_tokens", "lm_head"]
_EMBEDDING_NAME = re.compile(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})")


def is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel
    return isinstance(model, PreTrainedModel)


def base_config_path(name_or_path: Optional[str]) -> Optional[Path]:
    """config.json of the base model named in adapter_config.json: a local directory, or a fetched embedded model;
    None where peftlab cannot read it offline (PEFT asks the Hub then; we assume the vocabulary is unchanged)."""
    if not name_or_path:
        return None
    from ..models import EMBEDDED_MODELS, is_fetched, model_path
    if name_or_path in EMBEDDED_MODELS:
        return model_path(name_or_path, fetch=False) / "config.json" if is_fetched(name_or_path) else None
    path = Path(name_or_path) / "config.json"
    return path if path.is_file() else None


def vocab_resized(model: nn.Module, base_name_or_path: Optional[str]) -> bool:
    """Whether the model's vocabulary differs from its base's (resize_token_embeddings after adding tokens)."""
    vocab = model.config.vocab_size if is_transformers_model(model) else None
    path = base_config_path(base_name_or_path)
    if not vocab or path is None:
        return False
    return json.loads(path.read_text()).get("vocab_size", vocab) != vocab


def embedding_targeted(config, model: nn.Module) -> bool:
    """PEFT's test, on the config as PEFT makes it: does target_modules name an embed_tokens / lm_head layer (a regex
    other than "all-linear" matched against the model's embedding-named modules, or a list holding one of the
    names)? Never with trainable_token_indices, whose point is to store the trained rows only."""
    if getattr(config, "trainable_token_indices", None) is not None:
        return False
    spec = getattr(config, "target_modules", None)
    if isinstance(spec, str):
        return spec != "all-linear" and any(re.fullmatch(spec, n) for n, _ in model.named_modules()
                                            if _EMBEDDING_NAME.fullmatch(n))
    return bool(spec) and any(name in spec for name in EMBEDDING_LAYER_NAMES)


def decide(save: Union[bool, str], targeted: bool, model: nn.Module, base_name_or_path: Optional[str]) -> bool:
    """save_embedding_layers (True, False or "auto") resolved as HF PEFT resolves it, with PEFT's warnings."""
    if save not in (True, False, "auto"):
        raise ValueError(f"save_embedding_layers must be True, False or 'auto', got {save!r}")
    if save != "auto":
        return bool(save)
    if targeted:
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
        return True
    if vocab_resized(model, base_name_or_path):
        warnings.warn("Setting `save_embedding_layers` to `True` as the embedding layer has been resized during "
                      "finetuning.")
        return True
    return False


def embedding_modules(model: nn.Module, targeted: bool, base_of) -> dict[str, nn.Module]:
    """Name (relative to the model) -> module whose tensors are stored: when an embedding is targeted, the base
    layer of each adapted input/output embedding (`base_of(layer)`, None for a layer that is not adapted); else
    the input and output embedding modules themselves. {} for a model that is not a Transformers model."""
    if not is_transformers_model(model):
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        module = base_of(layer) if targeted else layer
        if module is not None and id(module) in names:
            out[names[id(module)]] = module
    return out


def embedding_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
