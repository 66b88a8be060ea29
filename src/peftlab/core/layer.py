"""The adapted-layer wrapper: a frozen base module plus named adapters, with merge/unmerge and mixed batches.

Composition, not inheritance: AdaptedLayer wraps any module (nn.Linear, Conv1D, nn.Embedding, an MLP) and
owns an `adapters` ModuleDict; each method contributes an `Adapter` that knows how to add itself to the
base output. The core owns everything methods share: which adapters are active, merged state, disabling,
per-row adapter groups for mixed batches, and saving/loading keys.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn

from .loading import check_keys, check_shape
from .lowrank import LowRankOperands
from .quantized import dense_base


class PeftlabModule:
    """Marks a module peftlab put into the model (an adapted layer, a head's per-adapter copies, the prompt
    encoders): target matching and the selective methods never look inside one."""


def unwrapped(module: nn.Module) -> nn.Module:
    """The module an AdaptedLayer wraps (an already adapted linear still counts as that linear), else itself."""
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def unwrapped_fully(module: nn.Module) -> nn.Module:
    """The model's own module under any number of nested AdaptedLayers (one per adapted parameter of it)."""
    while isinstance(module, AdaptedLayer):
        module = module.base_layer
    return module


def innermost(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """(name, module) of the model's own module at `name`, under any peftlab wrappers (their names extended by
    `.base_layer`): what selective methods act on, never a wrapper."""
    module = model.get_submodule(name)
    while isinstance(module, AdaptedLayer):
        name, module = f"{name}.base_layer", module.base_layer
    return name, module


class Adapter(nn.Module):
    """One method's adapter on one layer.

    forward(x, base_layer, result) returns the layer output with this adapter applied; `result` is the output
    computed so far, or None when `fuses_base` is True and the adapter should compute the base itself (the
    fast paths fold the adapter into the base matmul). Frozen tensors are buffers, trainable ones Parameters.
    """
    mergeable: bool = False
    fuses_base: bool = False
    # patches_base: the adapter changes a parameter of the base module while it runs (`patch`), instead of
    # computing from the base's output; the base is then called with its own arguments, whatever they are
    patches_base: bool = False
    # why this adapter instance may not be merged although its class can (e.g. its base weights are shared)
    merge_refused: Optional[str] = None
    # state_dict key -> key suffix in the saved file (HF PEFT's names), e.g. {"lora_A": "lora_A.weight"}
    saved_names: dict[str, str] = {}
    # buffers that are derived at init and must not be saved (e.g. cached norms)
    unsaved: tuple[str, ...] = ()

    # -- the low-rank operand protocol (core/lowrank.py); the defaults say "no low-rank form" ---------------
    def lowrank_operands(self, base_layer: nn.Module) -> Optional[LowRankOperands]:
        return None

    def joins_sibling_group(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        return False

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no delta weight")

    def patch(self, base_layer: nn.Module) -> contextlib.AbstractContextManager:
        """With patches_base: a context inside which the base module computes with this adapter applied."""
        raise NotImplementedError(f"{type(self).__name__} does not patch its base module (patches_base is False)")

    def merge_into(self, base_layer: nn.Module) -> None:
        """Fold this adapter into the base weight; the default adds delta_weight() in the base's layout."""
        if not self.mergeable:
            raise TypeError(f"{type(self).__name__} adds computation beside the base layer and cannot be merged "
                            f"into its weights; keep it unmerged (or use a delta-weight method such as LoRA)")
        w = base_layer.weight
        with torch.no_grad():
            w.data += self.delta_weight(base_layer).to(w.dtype)

    def unmerge_from(self, base_layer: nn.Module) -> None:
        w = base_layer.weight
        with torch.no_grad():
            w.data -= self.delta_weight(base_layer).to(w.dtype)

    # -- saving: names in HF PEFT's layout ---------------------------------------------------------------
    def export_state(self) -> dict[str, torch.Tensor]:
        return {self.saved_names.get(k, k): v for k, v in self.state_dict().items() if k not in self.unsaved}

    def import_state(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Load saved tensors (suffix -> tensor); errors name the module and both shapes on a mismatch."""
        own = {self.saved_names.get(k, k): k for k in self.state_dict() if k not in self.unsaved}
        current = self.state_dict()
        check_keys(where, tensors, own, type(self).__name__)
        for saved, local in own.items():
            check_shape(where, saved, tensors[saved], current[local],
                        "was the adapter saved for another base model, or with another r?")
        self.load_state_dict({local: tensors[saved].to(current[local].dtype) for saved, local in own.items()},
                             strict=False)
        self.after_load()

    def after_load(self) -> None:
        """Hook for adapters with caches derived from their weights."""

    def on_base_changed(self) -> None:
        """Hook: the base weight was modified (a merge/unmerge); drop caches derived from it."""


class AdaptedLayer(PeftlabModule, nn.Module):
    """A base module and its adapters. Attribute lookups fall through to the base (weight, in_features, ...)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        # Set by PeftModel for a mixed batch: [(adapter_name or None, row index tensor), ...]
        self.batch_groups: Optional[list[tuple[Optional[str], torch.Tensor]]] = None
        # Set by PeftModel: the core.siblings.SiblingFusion that groups layers reading the same input
        self.siblings = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self._modules["base_layer"], name)

    # -- adapters --------------------------------------------------------------------------------------
    def add(self, name: str, adapter: Adapter) -> None:
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        del self.adapters[name]
        self.active = [a for a in self.active if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.adapters]

    # -- merging ---------------------------------------------------------------------------------------
    def merge(self, names: Optional[list[str]] = None, requantize: bool = True) -> None:
        """Fold adapters into the base weight. A quantised base is quantised again afterwards (HF PEFT's merge on
        bitsandbytes layers; it adds the quantiser's rounding), or with requantize=False left dense in its
        compute dtype (what merge_and_unload does by default)."""
        for name in names if names is not None else self.active:
            if name in self.adapters and name not in self.merged:
                if self.adapters[name].merge_refused:
                    raise TypeError(f"adapter {name!r} cannot be merged: {self.adapters[name].merge_refused}")
                with dense_base(self, requantize=requantize):  # a quantised base: dequantised, merged, requantised
                    self.adapters[name].merge_into(self.base_layer)
                self.merged.append(name)
                self._base_changed()

    def unmerge(self, names: Optional[list[str]] = None) -> None:
        # Undo in reverse order: multiplicative merges (DoRA, IA3) do not commute with additive ones.
        for name in reversed(list(self.merged)):
            if names is None or name in names:
                with dense_base(self):
                    self.adapters[name].unmerge_from(self.base_layer)
                self.merged.remove(name)
                self._base_changed()

    def _base_changed(self) -> None:
        for adapter in self.adapters.values():
            adapter.on_base_changed()

    # -- forward ---------------------------------------------------------------------------------------
    def _apply_adapter(self, name: str, x: torch.Tensor, result: Optional[torch.Tensor], args, kwargs) -> torch.Tensor:
        adapter = self.adapters[name]
        if result is None and (args or kwargs or not adapter.fuses_base):
            result = self.base_layer(x, *args, **kwargs)
        return adapter(x, self.base_layer, result)

    def sibling_adapter(self, x: torch.Tensor) -> Optional[Adapter]:
        """The one active adapter, if this layer's output for x can be computed in a sibling group now
        (core/siblings.py): unmerged, enabled, no mixed batch, and the adapter says it may."""
        if self.disabled or self.merged or self.batch_groups is not None or len(self.active) != 1:
            return None
        adapter = self.adapters[self.active[0]]
        return adapter if adapter.fuses_base and adapter.joins_sibling_group(x, self.base_layer) else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.batch_groups is not None:
            return self._forward_groups(x, args, kwargs)
        patching = [self.adapters[n] for n in self.active if n not in self.merged and self.adapters[n].patches_base]
        if patching:
            with self._patched(patching):
                return self.base_layer(x, *args, **kwargs)
        if self.siblings is not None and not args and not kwargs:
            out = self.siblings.forward(self, x)
            if out is not None:
                return out
        result = None
        for name in self.active:
            if name not in self.merged:
                result = self._apply_adapter(name, x, result, args, kwargs)
        return self.base_layer(x, *args, **kwargs) if result is None else result

    @contextlib.contextmanager
    def _patched(self, adapters: list[Adapter]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for adapter in adapters:
                stack.enter_context(adapter.patch(self.base_layer))
            yield

    def _forward_groups(self, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        """Mixed batch (batch_groups: core.mixed.RowGroups): the base runs once on all rows, then every adapter
        on its own rows — all at once by batched matmuls for low-rank adapters, else once per adapter."""
        from .mixed import forward_generic, forward_lowrank, lowrank_operands
        groups = self.batch_groups
        if self.merged:
            raise RuntimeError("mixed-adapter batches need unmerged adapters; call unmerge_adapter() first")
        if any(self.adapters[n].patches_base for n, _ in groups if n in self.adapters):
            raise ValueError("mixed-adapter batches are not supported for adapters that change a parameter of the "
                             "module (LoRA's target_parameters; nor in HF PEFT); run one adapter per batch")
        if x.shape[0] != groups.n_rows:
            raise ValueError(f"adapter_names has {groups.n_rows} entries but this layer sees a batch of {x.shape[0]} "
                             f"rows; give one adapter name per row of the batch")
        used = [n for n, _ in groups if n is not None and n in self.adapters]
        if not used:
            return self.base_layer(x, *args, **kwargs)
        if len(groups) == 1 and not args and not kwargs:  # one adapter for every row: the ordinary path
            adapter = self.adapters[used[0]]
            return adapter(x, self.base_layer, None if adapter.fuses_base else self.base_layer(x))
        base = self.base_layer(x, *args, **kwargs)
        operands = None if (args or kwargs or base.shape[:-1] != x.shape[:-1]) else \
            lowrank_operands(self.adapters, groups, self.base_layer, x)
        if operands is not None and x[0].numel() // x.shape[-1] >= max(op.rank for op in operands.values()):
            return forward_lowrank(x, base, operands, groups)
        return forward_generic(self.adapters, self.base_layer, x, base, groups)


class ModulesToSave(PeftlabModule, nn.Module):
    """A trainable copy of a module per adapter (HF PEFT's modules_to_save, e.g. a classification head)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active: Optional[str] = None
        self.disabled = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self._modules["original_module"], name)

    def add(self, name: str) -> None:
        import copy
        self.copies[name] = copy.deepcopy(self.original_module)
        for p in self.copies[name].parameters():
            p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        if self.disabled or self.active not in self.copies:
            return self.original_module(*args, **kwargs)
        return self.copies[self.active](*args, **kwargs)
