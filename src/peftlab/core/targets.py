"""Which modules an adapter targets, with HF PEFT's matching semantics.

target_modules: a list (exact name or '.'-suffix match), a regex string (full match), or "all-linear"
(every Linear/Conv1D except the output head, and the classifier of SEQ_CLS models). exclude_modules works
the same way. layers_to_transform/layers_pattern restrict to numbered layers. rank_pattern/alpha_pattern
keys match as `(.*\\.)?(key)$`.
"""
from __future__ import annotations

import difflib
import re
from typing import Iterable, Optional, Sequence

import torch.nn as nn

from .layer import PeftlabModule, innermost, unwrapped
from ..hf.defaults import SEQ_CLS_HEAD_NAMES, default_targets

ALL_LINEAR = "all-linear"


def _conv1d_cls():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # noqa: BLE001 - transformers is optional for plain torch models
        return None


def is_linear_like(module: nn.Module) -> bool:
    module = unwrapped(module)
    conv1d = _conv1d_cls()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_features(method: str, layer: nn.Module, module_name: str) -> tuple[int, int, bool]:
    """(d_in, d_out, is_conv1d) of a layer a weight-adapting method wraps; a clear error for any other layer type.
    transformers' Conv1D stores its weight as (d_in, d_out), nn.Linear as (d_out, d_in)."""
    if not is_linear_like(layer):
        raise ValueError(f"{method} cannot adapt {module_name} ({type(layer).__name__}); it supports nn.Linear "
                         f"and transformers' Conv1D. Leave it out of target_modules (or use exclude_modules)")
    layer = unwrapped(layer)
    if isinstance(layer, nn.Linear):  # its declared sizes: a quantised (bitsandbytes) weight is stored packed
        return layer.in_features, layer.out_features, False
    w = layer.weight
    return w.shape[0], w.shape[1], True


def _name_matches(spec, key: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith(f".{t}") for t in spec)


def _layer_index(key: str, layers_pattern) -> Optional[int]:
    if not layers_pattern:
        # Lazy .*? picks the first numbered segment (the layer), not a nested one (an expert index).
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if m:
                break
    return int(m.group("idx")) if m else None


def output_head_names(model: nn.Module, task_type: Optional[str]) -> set[str]:
    """Names of heads "all-linear" must skip: the LM head, or the classifier of a SEQ_CLS model."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None and task_type == "SEQ_CLS":
        for n in SEQ_CLS_HEAD_NAMES:
            head = getattr(model, n, None)
            if head is not None:
                break
    if head is not None:
        names.update(n for n, m in model.named_modules() if m is head)
    return names


def resolve_targets(model: nn.Module, config, *, module_filter=is_linear_like,
                    default_table: Optional[dict] = None, skip: Iterable[str] = ()) -> list[str]:
    """Module names in `model` that `config` targets. Raises a clear error (with near matches) if none match."""
    spec = config.target_modules
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        spec = default_targets(model_type) if default_table is None else default_targets(model_type, default_table)
    skip = set(skip)
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        heads = output_head_names(model, getattr(config, "task_type", None))
        candidates = [n for n, m in model.named_modules() if module_filter(m) and n not in heads
                      and not any(h and n.startswith(h + ".") for h in heads)]
        spec_set: Sequence[str] | str = set(candidates)
        # HF PEFT writes the expanded module list into the config (and so into adapter_config.json); so do we,
        # which also makes a saved "all-linear" adapter load onto exactly the same modules later.
        config.target_modules = sorted(candidates)
    else:
        spec_set = spec if isinstance(spec, str) else list(spec)

    exclude = getattr(config, "exclude_modules", None)
    to_save = getattr(config, "modules_to_save", None) or []
    layers = getattr(config, "layers_to_transform", None)
    if isinstance(layers, list) and not layers:
        layers = None
    # Never target the insides of our own wrappers (an adapter's base_layer, its lora_A, a saved head copy).
    wrappers = [n for n, m in model.named_modules() if isinstance(m, PeftlabModule)]
    matched = []
    for name, module in model.named_modules():
        if not name or name in skip or any(name.startswith(w + ".") for w in wrappers):
            continue
        if exclude and _name_matches(exclude, name):
            continue
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in to_save):
            continue
        if not _name_matches(spec_set, name):
            continue
        if layers is not None and not isinstance(spec_set, str):
            idx = _layer_index(name, getattr(config, "layers_pattern", None))
            if idx is None or (idx != layers if isinstance(layers, int) else idx not in layers):
                continue
        matched.append(name)
    if not matched:
        raise ValueError(no_match_message(model, spec))
    return matched


def no_match_message(model: nn.Module, spec) -> str:
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_linear_like(m)})
    wanted = [spec] if isinstance(spec, str) else list(spec)
    near: list[str] = []
    for w in wanted:
        near += difflib.get_close_matches(w.rsplit(".", 1)[-1], sorted({n.rsplit(".", 1)[-1] for n in names}),
                                          n=3, cutoff=0.6)
    msg = f"target_modules {spec!r} matched no module of this {type(model).__name__}."
    if near:
        msg += f" Near matches: {', '.join(sorted(set(near)))}."
    if leaves:
        msg += f" Linear layers in this model are named: {', '.join(leaves)} (or use 'all-linear')."
    return msg


def pattern_value(patterns: dict, module_name: str, default):
    """rank_pattern/alpha_pattern lookup with HF PEFT's semantics: first key matching `(.*\\.)?(key)$` wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def minimal_suffixes(targets: Iterable[str], others: Iterable[str]) -> set[str]:
    """Few dotted suffixes that match every name in `targets` and no name in `others` (HF PEFT condenses long
    module lists this way, e.g. 200 q_proj/v_proj paths to {"q_proj", "v_proj"}); greedy, shortest first."""
    def suffixes(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]

    taken = {s for name in others for s in suffixes(name)}
    chosen: set[str] = set()
    for name, candidates in sorted(((t, suffixes(t)) for t in set(targets)), key=lambda item: item[1]):
        if any(name == s or name.endswith("." + s) for s in chosen):
            continue
        free = next((s for s in candidates if s not in taken), None)
        if free is None:
            raise ValueError(f"{name} cannot be told apart from the other modules by a suffix")
        chosen.add(free)
    return chosen


def linear_targets(model: nn.Module, config, method: str, what: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of every target of `config` (its innermost real module), refusing any that is not an
    nn.Linear or Conv1D with "<method>: <name> is a <type>; it selects <what> of nn.Linear or Conv1D weights only"."""
    out = []
    for name in resolve_targets(model, config):
        name, module = innermost(model, name)
        if not is_linear_like(module):
            raise ValueError(f"{method}: {name} is a {type(module).__name__}; it selects {what} of nn.Linear or "
                             f"Conv1D weights only")
        out.append((name, module))
    return out
