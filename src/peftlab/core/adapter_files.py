"""HF PEFT's adapter files: one adapter's tensors under PEFT's saved names, and its directory on disk.

A directory holds adapter_config.json + adapter_model.safetensors; an adapter not named "default" goes in a
subfolder of its name. Saved keys are `base_model.model.<module>.<tensor>` with the adapter name removed
(prompt-learning methods: the bare `prompt_embeddings`, heads under `base_model.<head>`); adapter-level tensors
(VeRA's shared projections) are written without the module prefix (tuner.ABSOLUTE_KEY). PeftModel's
save_pretrained / from_pretrained / load_adapter / adapter_state_dict are these functions. Beside an adapter, the
input/output embedding matrices are stored when `save_embedding_layers` says so (HF PEFT's rule, hf/embeddings.py).
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn as nn

from .config import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, PeftConfig
from .io import load_tensors, save_tensors
from .layer import AdaptedLayer
from .loading import check_keys, check_shape, copy_checked
from .registry import get_tuner, registered_peft_types
from .tuner import ABSOLUTE_KEY
from ..hf import embeddings

if TYPE_CHECKING:
    from .model import PeftModel

PREFIX = "base_model.model."
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_adapter_name(name: str) -> str:
    """Adapter names become folder names on save: refuse anything that could escape the save directory."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in {".", ".."}:
        raise ValueError(f"invalid adapter name {name!r}: use letters, digits, '_' and '-' only "
                         f"(no path separators, dots or '..'; the name becomes a folder name when saving)")
    return name


def tuner_types(declares) -> list[str]:
    """The peft_types whose tuner declares a capability (`declares(tuner)` is True), for error messages."""
    return [t for t in registered_peft_types() if declares(get_tuner(t))]


def key_prefix(tuner) -> str:
    # HF PEFT keeps the Transformers model itself at `base_model` for prompt methods, so their heads are saved
    # as base_model.<head>.<param>; every other method has it at base_model.model.
    return "base_model." if tuner.is_prompt_learning else PREFIX


def adapter_state_dict(pm: "PeftModel", adapter_name: str,
                       save_embedding_layers: Union[bool, str] = False) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under HF PEFT's saved key names: the tuner's, trained heads', trained biases',
    and the embedding matrices where save_embedding_layers (True, False, "auto") says so."""
    cfg = pm.peft_config[adapter_name]
    tuner = pm._tuner(adapter_name)
    state = tuner.export_state(pm.model, adapter_name, cfg)
    prefix = key_prefix(tuner)
    if tuner.is_prompt_learning:
        out = dict(state)  # HF PEFT: the bare `prompt_embeddings`
    else:
        out = {k[len(ABSOLUTE_KEY):] if k.startswith(ABSOLUTE_KEY) else PREFIX + k: v for k, v in state.items()}
    for name, wrapper in pm._modules_to_save():
        if adapter_name in wrapper.copies:
            for k, v in wrapper.copies[adapter_name].state_dict().items():
                out[f"{prefix}{name}.{k}"] = v
    for k, p in pm._bias_parameters(cfg, adapter_name).items():
        out[prefix + k] = p
    return {**embedding_state_dict(pm, adapter_name, save_embedding_layers), **out}  # the method's keys win


def _base_of_adapted(layer: nn.Module) -> Optional[nn.Module]:
    return layer.base_layer if isinstance(layer, AdaptedLayer) else None


def embedding_state_dict(pm: "PeftModel", adapter_name: str, save: Union[bool, str]) -> dict[str, torch.Tensor]:
    """The input/output embedding tensors HF PEFT stores beside the adapter (hf/embeddings.py), saved keys."""
    cfg, model = pm.peft_config[adapter_name], pm.model
    targeted = embeddings.embedding_targeted(cfg, model)
    if not embeddings.decide(save, targeted, model, cfg.base_model_name_or_path):
        return {}
    if not embeddings.is_transformers_model(model):
        warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.")
        return {}
    modules = embeddings.embedding_modules(model, targeted, _base_of_adapted)
    prefix = key_prefix(pm._tuner(adapter_name))
    return {prefix + k: v for k, v in embeddings.embedding_state(modules).items()}


def _load_embeddings(pm: "PeftModel", adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Stored embedding matrices of layers that are not adapted (a resized vocabulary) go into the model's own
    embedding modules; a size mismatch says to resize first. (Adapted ones arrive as `<layer>.base_layer.*`, and a
    key the method itself saves, e.g. a selective method's tuned embedding, stays the method's.)"""
    modules = embeddings.embedding_modules(pm.model, False, _base_of_adapted) if tensors else {}
    wanted = {name: {k: v for k, v in m.state_dict(keep_vars=True).items() if f"{name}.{k}" in tensors}
              for name, m in modules.items() if not isinstance(m, AdaptedLayer)}
    if not any(wanted.values()):
        return
    cfg = pm.peft_config[adapter_name]
    claimed = set(pm._tuner(adapter_name).export_state(pm.model, adapter_name, cfg))
    for name, own in wanted.items():
        part = {k: tensors.pop(f"{name}.{k}") for k in own if f"{name}.{k}" not in claimed}
        if part:
            copy_checked(name, part, own, type(modules[name]).__name__, allow_missing=True,
                         hint="the adapter was saved with a resized vocabulary: call "
                              "model.resize_token_embeddings(len(tokenizer)) on the base first")


def load_adapter_state(pm: "PeftModel", adapter_name: str, saved: dict[str, torch.Tensor]) -> None:
    """Put an adapter's saved tensors (keys as in the file) into the model: biases and heads first, the rest is the
    tuner's. Every key and shape is checked (core/loading.py)."""
    cfg = pm.peft_config[adapter_name]
    tuner = pm._tuner(adapter_name)
    prefix = key_prefix(tuner)
    tensors = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in saved.items()}
    biases = pm._bias_parameters(cfg, adapter_name)
    for k in list(tensors):
        if k in biases:
            copy_checked(k.rsplit(".", 1)[0], {k: tensors.pop(k)}, {k: biases[k]})
    for name, wrapper in pm._modules_to_save():
        if adapter_name not in wrapper.copies:
            continue
        own = wrapper.copies[adapter_name].state_dict()
        part = {k[len(name) + 1:]: tensors.pop(k) for k in list(tensors) if k.startswith(name + ".")}
        check_keys(name, part, own)
        for k, t in part.items():
            check_shape(name, k, t, own[k])
        wrapper.copies[adapter_name].load_state_dict(part)
    _load_embeddings(pm, adapter_name, tensors)
    tuner.import_state(pm.model, adapter_name, cfg, tensors)


def save_adapters(pm: "PeftModel", root: Path, names: list[str], initial_dir: Optional[str | os.PathLike],
                  save_embedding_layers: Union[bool, str] = "auto") -> None:
    """Write each named adapter (atomically, file by file); with initial_dir, PiSSA/CorDA converted to plain;
    the embedding matrices beside it as save_embedding_layers decides (HF PEFT's rule)."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"save_directory {root} exists and is a file")
    for name in names:
        check_adapter_name(name)
        if name not in pm.peft_config:
            raise ValueError(f"no adapter named {name!r} to save; this model has {list(pm.peft_config)}")
        cfg = pm.peft_config[name]
        tensors = adapter_state_dict(pm, name)
        if initial_dir is not None:
            tensors, cfg = _convert_to_plain(pm, name, tensors, Path(initial_dir))
        tensors = {**embedding_state_dict(pm, name, save_embedding_layers), **tensors}
        out = root if name == "default" else root / name
        out.mkdir(parents=True, exist_ok=True)
        save_tensors(out / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        cfg.save_pretrained(out)


def _convert_to_plain(pm: "PeftModel", name: str, tensors: dict, initial_dir: Path) -> tuple[dict, PeftConfig]:
    """PiSSA/CorDA adapters as plain adapters for the original base (save_pretrained's conversion)."""
    cfg, tuner = pm.peft_config[name], pm._tuner(name)
    if not tuner.converts_to_plain:
        raise ValueError(
            f"save_pretrained(path_initial_model_for_weight_conversion=...): adapter {name!r} is "
            f"{cfg.peft_type}, which has no conversion to a plain adapter (it trains against the unchanged "
            f"base, so save it without that argument); conversion exists for "
            f"{', '.join(tuner_types(lambda t: t.converts_to_plain))} adapters initialised by PiSSA or CorDA")
    return tuner.convert_to_plain(tensors, cfg, load_tensors(initial_dir / WEIGHTS_NAME))


def source_name(directory: str | os.PathLike) -> str:
    """The name a composed adapter gives one of its source adapters: the train run's directory for a run's
    adapter/ (runs/antonyms/adapter -> "antonyms"), else the directory's own name."""
    directory = Path(directory)
    return directory.parent.name if directory.name == "adapter" else directory.name


def adapter_dir(model_id: str | os.PathLike, subfolder: Optional[str] = None) -> Path:
    """The local directory holding the adapter files: model_id, or its `subfolder` (HF PEFT's argument)."""
    directory = Path(model_id) / subfolder if subfolder else Path(model_id)
    if not directory.is_dir():
        where = f"subfolder {subfolder!r} of {model_id}" if subfolder else f"adapter directory {directory}"
        raise FileNotFoundError(f"{where} does not exist (peftlab loads adapters from local directories holding "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    return directory


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors, or a legacy adapter_model.bin (read with weights_only=True: no code runs)."""
    path = directory / WEIGHTS_NAME
    if not path.is_file() and (directory / LEGACY_WEIGHTS_NAME).is_file():
        path = directory / LEGACY_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}: the adapter weights are "
                                f"missing")
    return load_tensors(path)
