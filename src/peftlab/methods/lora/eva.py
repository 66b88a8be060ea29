"""EVA (Explained Variance Adaptation, Paischer et al. 2024; HF PEFT's init_lora_weights="eva"): LoRA's A from the
top right-singular vectors of each target layer's inputs on calibration data, ranks redistributed by explained
variance, B zero (the model is unchanged until it trains).

    cfg = peftlab.LoraConfig(r=8, target_modules="all-linear", init_lora_weights="eva", eva_config=EvaConfig())
    model = peftlab.get_peft_model(model, cfg)          # A random, B zero, until:
    peftlab.initialize_lora_eva_weights(model, dataloader)

Per layer, an incremental PCA (ipca.py) of its inputs (the real tokens: attention mask, and labels != -100 with
use_label_mask) runs over the batches, cycling through them, with rho·r components until the components the
layer needs have converged (cosine similarity with the previous batch's >= tau). Layers that read the same input
(q/k/v) share one PCA. The budget Σ r is handed out by explained variance ratio, at most rho·r per layer; a layer
that gets rank 0 loses its adapter. The config then holds the new rank_pattern, alpha_pattern (alpha·r'/r with
adjust_scaling_factors, so the scale stays alpha/r) and target_modules, as PEFT writes them: the adapter file is a
plain LoRA file.
"""
from __future__ import annotations

from contextlib import nullcontext
from copy import deepcopy
from itertools import cycle
from typing import Callable, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from ...core.calibration import InputHook, device_of, gather_rows
from ...core.model import PeftModel
from ...core.targets import pattern_value
from ...core.tuner import adapted_layers
from .config import EvaConfig
from .corda import linear_targets
from .eva_inputs import (forward_fn_dict, layer_fns, prepare_layer_inputs_fn_language_modeling,
                         prepare_model_inputs_fn_language_modeling)
from .eva_load import PEFT_PREFIX, load_eva_state_dict
from .ipca import ConvergingPCA
from .layers import LoraLinear

RHO_LIMIT = 1000                    # above it, rho is capped at the largest parameter dimension / r (PEFT's rule)


def _shared_inputs(names: list[str], first: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, str]]:
    """(the layers that get a PCA, {layer: the layer whose identical input it shares}), in PEFT's order."""
    groups: dict[str, list[str]] = {}
    for n in names:
        rep = next((r for r in groups if first[r].shape == first[n].shape and torch.equal(first[r], first[n])), n)
        groups.setdefault(rep, []).append(n)
    return list(groups), {m: rep for rep, members in groups.items() for m in members[1:]}


def _distribute(states: dict[str, ConvergingPCA], owner: dict[str, str], shared: dict[str, str], budget: int,
                max_components: dict[str, int]) -> dict[str, int]:
    """Ranks per layer: the `budget` largest explained variance ratios, each layer offering its input's first
    max_components; a layer owning a shared PCA takes the largest rank of its group (it needs those components)."""
    layers = list(owner)
    ratios = [states[owner[n]].pca.explained_variance_ratio[: max_components[n]] for n in layers]
    who = torch.cat([torch.full((len(r),), i) for i, r in enumerate(ratios)])
    top = who[torch.cat(ratios).argsort(descending=True)[:budget].cpu()]
    counts = {n: int((top == i).sum()) for i, n in enumerate(layers)}
    for member, rep in shared.items():
        if counts[rep] < counts[member]:
            counts[rep], counts[member] = counts[member], counts[rep]
    return counts


def _effective_rho(model: nn.Module, config) -> float:
    rho = EvaConfig.of(config.eva_config).rho
    if rho > RHO_LIMIT:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    return rho


def _targets(model: nn.Module, config, adapter_name: str) -> dict[str, nn.Module]:
    """Hooked modules by the name eva_state_dict uses: a PeftModel's LoRA-on-Linear layers (PEFT's names), or the
    Linear/Conv1D layers a plain model's config targets."""
    if not isinstance(model, PeftModel):
        return dict(linear_targets(model, config))
    return {PEFT_PREFIX + n: layer for n, layer in adapted_layers(model.model)
            if adapter_name in layer.adapters and isinstance(layer.adapters[adapter_name], LoraLinear)}


class _Run:
    """One EVA pass over the calibration batches (PEFT's procedure, step for step, so the ranks agree)."""

    def __init__(self, model, config, targets: dict[str, nn.Module], forward_fn, prepare_model_inputs_fn,
                 layer_fns: dict[str, Callable], gather: bool):
        self.model, self.config, self.targets, self.forward_fn = model, config, targets, forward_fn
        self.prepare_model_inputs_fn, self.layer_fns, self.gather = prepare_model_inputs_fn, layer_fns, gather
        self.device = device_of(model)
        rho = _effective_rho(model, config)
        ranks = {n: pattern_value(config.rank_pattern, n, config.r) for n in targets}
        self.budget = sum(ranks.values())
        self.max_components = {n: round(r * rho) for n, r in ranks.items()}

    def _inputs(self, batch):
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()} \
            if isinstance(batch, Mapping) else batch
        fn = self.prepare_model_inputs_fn
        return batch, (fn(batch, self.config) if fn is not None else deepcopy(batch))

    def _hook(self, name: str, sink) -> tuple[InputHook, object]:
        hook = InputHook(name, self.layer_fns[name], (lambda x: sink(gather_rows(x))) if self.gather else sink)
        return hook, self.targets[name].register_forward_hook(hook)

    def shared_inputs(self, first_batch) -> tuple[list[str], dict[str, str]]:
        """Which layers read identical inputs, from one forward pass; they share a PCA with the largest k."""
        seen: dict[str, torch.Tensor] = {}
        batch, hook_input = self._inputs(first_batch)
        handles = []
        try:
            for name in self.targets:
                hook, handle = self._hook(name, lambda x, name=name: seen.setdefault(name, x.detach().cpu()))
                hook.context = hook_input
                handles.append(handle)
            self.forward_fn(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.targets if n not in seen]
        if missing:
            raise ValueError(f"EVA: the forward pass never reached {missing[0]}; give batches the model can run on")
        reps, shared = _shared_inputs(list(self.targets), seen)
        for rep, members in _members(reps, shared).items():
            k = max(self.max_components[n] for n in members)
            self.max_components.update({n: k for n in members})
        return reps, shared

    def fit(self, dataloader, progress: bool) -> dict[str, torch.Tensor]:
        reps, shared = self.shared_inputs(next(iter(dataloader)))
        tau = EvaConfig.of(self.config.eva_config).tau
        states = {n: ConvergingPCA(self.max_components[n], tau, n) for n in reps}
        hooks = {n: self._hook(n, states[n].update) for n in reps}
        owner = {**{n: n for n in reps}, **shared}
        ranks, done = dict(self.max_components), {n: False for n in reps}
        bar = _progress(progress, len(owner))
        try:
            for step, batch in enumerate(cycle(dataloader)):
                if step == len(dataloader) and any(s.pca.components is None for s in states.values()):
                    raise ValueError(f"EVA: {_starved(states)} got fewer rows than components in every batch; use "
                                     f"larger batches or a lower r / rho (HF PEFT would wait forever here)")
                batch, hook_input = self._inputs(batch)
                for n in reps:
                    hooks[n] = self._switch(n, hooks[n], bool(states[n].converged[: ranks[n]].all()), done)
                    hooks[n][0].context = hook_input
                bar(sum(done[owner[n]] for n in owner))
                if all(done.values()):
                    break
                self.forward_fn(self.model, batch)
                if all(s.pca.components is not None for s in states.values()):
                    ranks = _distribute(states, owner, shared, self.budget, self.max_components)
        finally:
            for _, handle in hooks.values():
                if handle is not None:
                    handle.remove()
            bar(None)
        return {n: self._components(states[owner[n]], r) for n, r in ranks.items()}

    def _switch(self, name: str, hook, converged: bool, done: dict[str, bool]):
        """Unhook a layer once the components it needs have converged; hook it again if a later redistribution
        asks it for more than have."""
        listener, handle = hook
        if converged and not done[name]:
            handle.remove()
            done[name] = True
            return listener, None
        if done[name] and not converged:
            done[name] = False
            return listener, self.targets[name].register_forward_hook(listener)
        return hook

    def _components(self, state: ConvergingPCA, rank: int) -> torch.Tensor:
        u = state.pca.components[:rank]
        if EvaConfig.of(self.config.eva_config).whiten:
            u = u / state.pca.singular_values[:rank].sqrt().reshape(-1, 1)
        return u.to(self.device)


def _starved(states: dict[str, ConvergingPCA]) -> str:
    name, state = next((n, s) for n, s in states.items() if s.pca.components is None)
    return f"{name} (needs {state.pca.k} rows)"


def _members(reps: list[str], shared: dict[str, str]) -> dict[str, list[str]]:
    out = {r: [r] for r in reps}
    for member, rep in shared.items():
        out[rep].append(member)
    return out


def _progress(show: bool, total: int) -> Callable[[Optional[int]], None]:
    """progress(n_converged) updates a bar of converged layers; progress(None) closes it."""
    if not show or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return lambda n: None
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc="EVA: layers converged", leave=False)

    def update(n: Optional[int]) -> None:
        if n is None:
            bar.close()
        else:
            bar.n = n
            bar.refresh()
    return update


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable, peft_config=None,
                       forward_fn: Optional[Callable] = forward_fn_dict,
                       prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
                       prepare_layer_inputs_fn: Union[Callable, dict, None] = prepare_layer_inputs_fn_language_modeling,
                       adapter_name: str = "default", gather_distributed_inputs: bool = True,
                       show_progress_bar: bool = True) -> dict[str, torch.Tensor]:
    """EVA's A per target layer, {module name: (rank, d_in)}, ranks already redistributed (HF PEFT's function).

    `model`: a PeftModel with an init_lora_weights="eva" adapter (keys are then PEFT's "base_model.model.<name>"),
    or the plain model with `peft_config` (keys are module names). `dataloader`: a sized iterable of batch dicts,
    cycled until the components converge. The other arguments are PEFT's: `forward_fn(model, batch)`,
    `prepare_model_inputs_fn(batch, peft_config)` and `prepare_layer_inputs_fn(layer_input, prepared, name)`
    (one, or one per module name) choose the rows each layer's SVD sees."""
    is_peft = isinstance(model, PeftModel)
    if peft_config is None:
        if not is_peft:
            raise ValueError("get_eva_state_dict needs peft_config when the model is not a PeftModel")
        peft_config = model.peft_config[adapter_name]
    if peft_config.eva_config is None:
        peft_config = peft_config.replace(eva_config=EvaConfig())
    if len(dataloader) == 0:
        raise ValueError("EVA: the dataloader is empty; give it calibration batches")
    targets = _targets(model, peft_config, adapter_name)
    if not targets:
        raise ValueError("EVA: no Linear/Conv1D layer is targeted (EVA initialises LoRA on linear layers only)")
    run = _Run(model, peft_config, targets, forward_fn or forward_fn_dict, prepare_model_inputs_fn,
               layer_fns(list(targets), prepare_layer_inputs_fn), gather_distributed_inputs)
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter() if is_peft else nullcontext():
            return run.fit(dataloader, show_progress_bar)
    finally:
        model.train(was_training)


@torch.no_grad()
def initialize_lora_eva_weights(model: PeftModel, dataloader: Optional[Iterable] = None,
                                eva_state_dict: Optional[dict] = None,
                                forward_fn: Optional[Callable] = forward_fn_dict,
                                prepare_model_inputs_fn: Optional[Callable] = prepare_model_inputs_fn_language_modeling,
                                prepare_layer_inputs_fn: Union[Callable, dict, None] =
                                prepare_layer_inputs_fn_language_modeling,
                                adapter_name: str = "default", gather_distributed_inputs: bool = True,
                                show_progress_bar: bool = True) -> PeftModel:
    """Give a PeftModel's init_lora_weights="eva" adapter EVA's A (from `dataloader`, or a saved `eva_state_dict`
    from get_eva_state_dict), with the redistributed ranks written into its config (HF PEFT's function)."""
    if not isinstance(model, PeftModel):
        raise ValueError("initialize_lora_eva_weights needs a PeftModel: call get_peft_model(model, config) with "
                         "init_lora_weights='eva' first (or get_eva_state_dict for a plain model)")
    if len(model.active_adapters) > 1:
        raise ValueError("initialize_lora_eva_weights works with a single active adapter; set_adapter() one first")
    if adapter_name not in model.peft_config or model.peft_config[adapter_name].init_lora_weights != "eva":
        raise ValueError(f"initialize_lora_eva_weights needs adapter {adapter_name!r} created with "
                         f"init_lora_weights='eva'")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_lora_eva_weights needs a dataloader, or an eva_state_dict to load")
        eva_state_dict = get_eva_state_dict(model, dataloader, None, forward_fn, prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn, adapter_name, gather_distributed_inputs,
                                            show_progress_bar)
    load_eva_state_dict(model, eva_state_dict, adapter_name)
    return model
