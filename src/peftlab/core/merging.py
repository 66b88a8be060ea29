"""PeftModel's merging API (HF PEFT's names): weighted combinations of adapters, merge/unmerge, merge_and_unload
with safe_merge and re-quantisation, unload. A mixin so core/model.py keeps the container and this file the
merging; the maths of each method's merge lives in its tuner/adapter (Tuner.add_weighted_adapter,
AdaptedLayer.merge)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .adapter_files import tuner_types
from .quantized import clear_quantization_markers
from .registry import get_tuner
from .task_merging import CombineOptions
from .tuner import adapted_layers, set_submodule


class MergeMethods:
    """Mixed into PeftModel: uses its peft_config, _active, model, _tuner() and _modules_to_save()."""

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: Optional[str] = None, svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             svd_driver: Optional[str] = None, density: Optional[float] = None,
                             majority_sign_method: str = "total") -> None:
        """A new adapter combining existing ones: HF PEFT's API and combination types (linear, cat, svd, ties,
        ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd;
        core/task_merging.py; LoRA's default is svd, as PEFT's) or (IA)³'s weighted sum; the tuner of their method
        does the maths."""
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown or len(adapters) != len(weights) or not adapters:
            raise ValueError(f"add_weighted_adapter needs existing adapters and one weight each; unknown: {unknown}, "
                             f"{len(adapters)} adapters, {len(weights)} weights")
        if adapter_name in self.peft_config:
            raise ValueError(f"add_weighted_adapter: an adapter named {adapter_name!r} exists already; choose a new "
                             f"name (or delete_adapter({adapter_name!r}) first)")
        types = sorted({self.peft_config[a].peft_type for a in adapters})
        if len(types) != 1:
            raise ValueError(f"add_weighted_adapter combines adapters of one peft_type; got {types}")
        tuner = self._tuner(adapters[0])
        if not tuner.supports_weighted_combination:
            raise ValueError(f"add_weighted_adapter: {types[0]} adapters cannot be combined (only "
                             f"{', '.join(tuner_types(lambda t: t.supports_weighted_combination))} support weighted "
                             f"combinations)")
        options = CombineOptions(combination_type, svd_rank, svd_clamp, svd_full_matrices, svd_driver, density,
                                 majority_sign_method)
        tuner.add_weighted_adapter(self, adapters, weights, adapter_name, options)

    def _check_mergeable(self, names: list[str]) -> None:
        for n in names:
            if n in self.peft_config and self._tuner(n).is_prompt_learning:
                raise TypeError(f"adapter {n!r} ({self.peft_config[n].peft_type}) adds virtual tokens to the input "
                                f"and cannot be merged into the model's weights; keep it as an adapter")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None) -> None:
        self._check_mergeable(adapter_names if adapter_names is not None else self._active)
        for _, layer in adapted_layers(self.model):
            layer.merge(adapter_names if adapter_names is not None else self._active)

    def unmerge_adapter(self) -> None:
        for _, layer in adapted_layers(self.model):
            layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None, requantize: bool = False) -> nn.Module:
        """Fold the adapters into the base weights and return the plain model. On a quantised (bitsandbytes)
        base the merged layers come back as dense nn.Linear in their compute dtype, or, with requantize=True,
        quantised again with the original settings (as HF PEFT does; that adds the quantiser's rounding, see
        core/quantized.py). safe_merge checks the merged weights for NaN/inf before anything is replaced."""
        names = adapter_names if adapter_names is not None else self._active
        self._check_mergeable(names)
        for _, layer in adapted_layers(self.model):
            if safe_merge:
                self._check_safe_merge(layer, names)
            layer.merge(names, requantize=requantize)
            if safe_merge:  # multiplicative merges (IA3) have no additive delta to check first
                for p in layer.base_layer.parameters():
                    if p.is_floating_point() and not torch.isfinite(p).all():
                        raise ValueError("merging produced NaN/inf in the base weights; the adapter is broken")
        model = self._unload_all(merge=True)
        clear_quantization_markers(model)
        return model

    @staticmethod
    def _check_safe_merge(layer, names: list[str]) -> None:
        """HF PEFT's safe_merge: the merge is tried on a copy of the weights first, so a broken adapter (NaN/inf)
        leaves the model untouched."""
        for name in names:
            adapter = layer.adapters[name] if name in layer.adapters else None
            if adapter is None or not adapter.mergeable or name in layer.merged:
                continue
            try:
                with torch.no_grad():
                    delta = adapter.delta_weight(layer.base_layer)
            except NotImplementedError:
                continue
            if not torch.isfinite(delta).all():
                raise ValueError(f"merging adapter {name!r} would put NaN/inf into the base weights; the adapter is "
                                 f"broken, and the model was left unmerged")

    def unload(self) -> nn.Module:
        """Remove every adapter and return the base model (merged adapters are unmerged first)."""
        self.unmerge_adapter()
        return self._unload_all()

    def _unload_all(self, merge: bool = False) -> nn.Module:
        model = self.model
        for cfg in list(self.peft_config.values()):
            tuner = get_tuner(cfg.peft_type)
            tuner.merge_and_unload(model) if merge else tuner.unload(model)
        for name, wrapper in list(self._modules_to_save()):
            keep = wrapper.copies[wrapper.active] if wrapper.active in wrapper.copies else wrapper.original_module
            set_submodule(model, name, keep)
        self.peft_config = {}
        self._active = []
        return model
