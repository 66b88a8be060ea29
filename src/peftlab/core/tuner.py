"""Tuners: how one peft_type is put into a model and how its tensors map to saved keys.

`LayerTuner` serves every method that wraps layers (delta-weight and activation kinds): it resolves targets,
wraps each in an AdaptedLayer and asks the method for one Adapter per layer. A method subclasses it and
implements `create_adapter`; input and selective methods implement the small Tuner protocol themselves.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn

from .layer import AdaptedLayer, Adapter
from .loading import copy_checked
from .quantized import dense_base
from .targets import is_linear_like, resolve_targets
from ..hf.defaults import default_targets


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Every adapted layer of `model` computes its base layer alone inside the block (a router's pass over the
    frozen base), and is as it was afterwards."""
    layers = [layer for _, layer in adapted_layers(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, before):
            layer.disabled = flag


def load_into_module(module: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved tensors into a module's parameters, naming the module and both shapes on a mismatch."""
    copy_checked(where, tensors, dict(module.named_parameters()), type(module).__name__, allow_missing=True)


# export_state() keys are relative to the Transformers model; the PeftModel saves them under "base_model.model.".
# State that belongs to an adapter as a whole rather than to a module (VeRA's shared projections, which HF PEFT
# saves as "base_model.vera_A") is returned as ABSOLUTE_KEY + the full saved key and written without the prefix.
# On load, such keys reach import_state() as saved ("base_model.vera_A").
ABSOLUTE_KEY = "/"


class Tuner:
    """The protocol every peft_type implements. Keys are relative to the Transformers model.

    Capabilities are declared here with defaults; a tuner that has one sets the flag and implements the method,
    and the core reads the flag instead of probing for methods."""
    # HF PEFT's prompt-learning layout: saved keys under "base_model." and nothing to merge into weights
    is_prompt_learning = False
    # prepare_inputs rewrites the whole batch's inputs (virtual tokens, key/value prefixes): such adapters
    # cannot take part in mixed-adapter batches, and a KV cache cannot be reused across their calls
    rewrites_inputs = False
    # add_weighted_adapter: new adapters as weighted combinations of existing ones of this type
    supports_weighted_combination = False
    # convert_to_plain: an adapter trained from a decomposed base (PiSSA, CorDA) as a plain one on the original
    converts_to_plain = False
    # routes_tokens: a mixture whose routers record statistics (routing_stats, reset_routing_stats and
    # routing_contexts are implemented; core/routing.py's RoutedLayerTuner does it for layer mixtures)
    routes_tokens = False
    # takes_task_ids: prepare_inputs consumes the forward's `task_ids` (per-row task labels, from data records'
    # "expert" key: TT-LoRA MoE's router targets); for other tuners PeftModel drops them before the base model
    takes_task_ids = False
    # consolidates_tasks: a continual-learning method that records what it must keep after each task
    # (end_task: EWC-LoRA's Fisher information and anchor); PeftModel.end_task(batches) calls it
    consolidates_tasks = False
    # adjusts_gradients: before_optimizer_step rewrites the adapter's gradients after backward (and clipping), before
    # the optimizer reads them (LoRA-Pro); PeftModel.before_optimizer_step(step) calls it, the training loops do
    adjusts_gradients = False

    def inject(self, model: nn.Module, config, adapter_name: str) -> None:
        raise NotImplementedError

    def end_task(self, model: nn.Module, adapter_name: str, config, batches) -> None:
        """After training on a task (continual learning): consolidate it, from some of its batches."""
        raise NotImplementedError  # only reached when consolidates_tasks is True

    def export_state(self, model: nn.Module, adapter_name: str, config) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def import_state(self, model: nn.Module, adapter_name: str, config, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def adapter_parameters(self, model: nn.Module, adapter_name: str) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    def set_active(self, model: nn.Module, names: list[str]) -> None:
        """Make `names` the active adapters of this type (others of this type inactive)."""

    def set_disabled(self, model: nn.Module, disabled: bool) -> None:
        """Turn the adapters of this type off (the base model's output) or back on."""

    def remove(self, model: nn.Module, adapter_name: str) -> None:
        raise NotImplementedError

    def unload(self, model: nn.Module) -> None:
        """Remove every adapter of this type and restore the plain modules."""

    def merge_and_unload(self, model: nn.Module) -> None:
        """Remove every adapter of this type, keeping its effect in the weights. Layer adapters were merged by
        their layers already, so by default this is unload(); selective methods, whose change lives in the
        model's own tensors, keep the tuned values here, while their unload() restores the originals."""
        self.unload(model)

    def add_weighted_adapter(self, peft_model, adapters: list[str], weights: list[float], adapter_name: str,
                             options) -> None:
        """options: core.task_merging.CombineOptions (combination_type, svd_rank, density, ...)."""
        raise NotImplementedError  # only reached when supports_weighted_combination is True

    def convert_to_plain(self, tensors: dict, config, initial: dict) -> tuple[dict, object]:
        """(tensors, config) of the equivalent adapter for the original base, given the adapter's initial tensors."""
        raise NotImplementedError  # only reached when converts_to_plain is True

    # -- hooks for methods that need more than layer wrapping (all optional) -------------------------------
    def prepare_inputs(self, model: nn.Module, adapter_name: str, config, kwargs: dict, generate: bool) -> dict:
        """Rewrite forward/generate kwargs (prompt methods prepend virtual tokens, grow the attention mask)."""
        return kwargs

    def aux_loss(self, model: nn.Module, adapter_name: str, config):
        """An extra training loss (AdaLoRA's orthogonality, MoE load balancing), added to outputs.loss in
        forward so HF Trainer and any loop get it; None for most methods."""
        return None

    def routing_stats(self, model: nn.Module, adapter_name: str) -> dict:
        """Per statistics group and router: expert load and router entropy (only with routes_tokens)."""
        raise NotImplementedError  # only reached when routes_tokens is True

    def routing_contexts(self, model: nn.Module, adapter_name: str) -> list:
        """The core.routing.RoutingContext objects of this adapter's routers (only with routes_tokens)."""
        raise NotImplementedError  # only reached when routes_tokens is True

    def before_optimizer_step(self, model: nn.Module, adapter_name: str, config, step: int) -> None:
        """After backward and gradient clipping, before optimizer.step(): replace the gradients the optimizer will
        read (only with adjusts_gradients). peftlab's loop and Trainer call it through
        PeftModel.before_optimizer_step(step)."""
        raise NotImplementedError  # only reached when adjusts_gradients is True

    def on_step_end(self, model: nn.Module, adapter_name: str, config, step: int) -> None:
        """Called after backward, before the gradients are zeroed (AdaLoRA's budget update, Child-tuning's
        gradient mask). peftlab's trainer calls it through PeftModel.on_step_end(step)."""


class LayerTuner(Tuner):
    """Tuner for methods that wrap target layers; subclasses implement create_adapter()."""
    default_targets_table: Optional[dict] = None  # per-architecture defaults if not LoRA's

    def target_filter(self, module: nn.Module) -> bool:
        """Modules "all-linear"-style matching may pick; explicit names may target more (see create_adapter)."""
        return is_linear_like(module)

    def create_adapter(self, base_layer: nn.Module, config, module_name: str, adapter_name: str) -> Adapter:
        raise NotImplementedError

    def init_writes_base(self, config) -> bool:
        """Whether create_adapter writes the base weight (PiSSA's residual): a quantised base is then handed to it
        dequantised and quantised again afterwards (core.quantized.dense_base), as HF PEFT does."""
        return False

    def inject(self, model: nn.Module, config, adapter_name: str) -> None:
        names = resolve_targets(model, config, module_filter=self.target_filter,
                                default_table=self.default_targets_table)
        if getattr(config, "target_modules", "") is None:
            # Record the architecture defaults in the config, as HF PEFT does, so the saved file is explicit.
            # The table's entries themselves: a dotted default such as GPT-2's "mlp.c_proj" must not widen to
            # its leaf name ("c_proj" would also match attn.c_proj when the file is loaded).
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            table = self.default_targets_table
            config.target_modules = sorted(default_targets(model_type) if table is None
                                           else default_targets(model_type, table))
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, AdaptedLayer):
                module = AdaptedLayer(module)
                set_submodule(model, name, module)
            with dense_base(module) if self.init_writes_base(config) else contextlib.nullcontext():
                adapter = self.create_adapter(module.base_layer, config, name, adapter_name)
            module.add(adapter_name, adapter.to(self._device_of(module.base_layer)))

    @staticmethod
    def _device_of(module: nn.Module) -> torch.device:
        for p in module.parameters():
            return p.device
        return torch.device("cpu")

    def _layers_with(self, model: nn.Module, adapter_name: str):
        for name, layer in adapted_layers(model):
            if adapter_name in layer.adapters:  # an adapter name belongs to exactly one config, so one tuner
                yield name, layer

    def export_state(self, model, adapter_name, config):
        out = {}
        for name, layer in self._layers_with(model, adapter_name):
            for suffix, t in layer.adapters[adapter_name].export_state().items():
                out[f"{name}.{suffix}"] = t
        return out

    def import_state(self, model, adapter_name, config, tensors):
        per_layer: dict[str, dict[str, torch.Tensor]] = {}
        layers = dict(self._layers_with(model, adapter_name))
        # Longest module name first: "a.b.lora_A.weight" belongs to "a.b", not to a module "a".
        for key, t in tensors.items():
            owner = max((n for n in layers if key.startswith(n + ".")), key=len, default=None)
            if owner is None:
                raise KeyError(f"adapter file has {key!r}, but no adapted module of this model owns it "
                               f"(was the adapter saved for another base model or other target_modules?)")
            per_layer.setdefault(owner, {})[key[len(owner) + 1:]] = t
        # a layer whose adapter saves nothing (a view of another layer's tensors, e.g. tied token rows) is not missing
        missing = sorted(n for n in set(layers) - set(per_layer) if layers[n].adapters[adapter_name].export_state())
        if missing:
            raise KeyError(f"adapter file has no tensors for {len(missing)} adapted module(s), e.g. {missing[0]!r}; "
                           f"the file does not match this config's target_modules")
        for name, part in per_layer.items():
            base_part = {k[len("base_layer."):]: part.pop(k) for k in list(part) if k.startswith("base_layer.")}
            if base_part:
                # HF PEFT stores the whole embedding matrix beside an embedding LoRA (save_embedding_layers,
                # for resized vocabularies); it replaces the base weights, so load it into the base layer.
                load_into_module(layers[name].base_layer, base_part, f"{name}.base_layer")
            layers[name].adapters[adapter_name].import_state(part, name)

    def adapter_parameters(self, model, adapter_name):
        for _, layer in self._layers_with(model, adapter_name):
            yield from layer.adapters[adapter_name].parameters()

    def set_active(self, model, names):
        for _, layer in adapted_layers(model):
            layer.set_active(names)

    def set_disabled(self, model, disabled):
        for _, layer in adapted_layers(model):
            layer.disabled = disabled

    def remove(self, model, adapter_name):
        # innermost first: a module with several adapted parameters holds nested AdaptedLayers
        for name, layer in reversed(list(self._layers_with(model, adapter_name))):
            layer.remove(adapter_name)
            if not len(layer.adapters):
                set_submodule(model, name, layer.base_layer)

    def unload(self, model):
        for name, layer in reversed(list(adapted_layers(model))):  # innermost first, as in remove()
            set_submodule(model, name, layer.base_layer)
