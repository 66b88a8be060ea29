"""EWC-LoRA: LoRA trained over a sequence of tasks with elastic weight consolidation on the adapter (Kirkpatrick et
al. 2017's EWC, applied to the LoRA parameters as continual-learning LoRA work does, e.g. Xiang et al. 2023).

After task t, with θ the adapter's parameters: the diagonal empirical Fisher F_t = mean over `fisher_batches`
batches of that task of (∂L/∂θ)², then (online EWC) F ← γ·F + F_t and the anchor θ* ← θ. While training later
tasks the loss gains
    (λ/2) · Σ_i F_i (θ_i − θ*_i)²
(added to outputs.loss in forward, so every training loop sees it). Before the first consolidation there is no
penalty: on one task EWC-LoRA is plain LoRA. F and θ* are buffers of each layer's adapter, saved in its file
(`<module>.ewc_fisher.<param>`, `<module>.ewc_anchor.<param>`) with the number of consolidated tasks in the config,
so a later stage can start from a saved adapter. `peftlab continual` runs the task sequence.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...core.layer import Adapter
from ...core.registry import MethodInfo, register_method, register_tuner
from .config import LORA_FLAG_FIELDS, LoraConfig
from .tuner import LoraTuner


@dataclass
class EwcLoraConfig(LoraConfig):
    peft_type: str = "EWC_LORA"
    ewc_lambda: float = 1000.0       # λ: the penalty's weight
    ewc_gamma: float = 1.0           # online EWC's decay of earlier tasks' Fisher (1: their sum)
    fisher_batches: int = 8          # batches of a finished task its Fisher is averaged over
    ewc_tasks: int = 0               # tasks consolidated so far (set by end_task; saved)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ewc_lambda < 0 or not 0 <= self.ewc_gamma <= 1 or self.fisher_batches < 1:
            raise ValueError(f"EwcLoraConfig: ewc_lambda must be >= 0 (got {self.ewc_lambda}), ewc_gamma in [0, 1] "
                             f"(got {self.ewc_gamma}), fisher_batches >= 1 (got {self.fisher_batches})")
        if self.use_dora:
            raise ValueError("EwcLoraConfig: EWC on DoRA adapters is not supported; use use_dora=False")


class EwcState(nn.Module):
    """The Fisher diagonal and the anchor of one adapter's own parameters (buffers named like the parameters)."""

    def __init__(self, adapter: Adapter):
        super().__init__()
        for name, p in adapter.named_parameters(recurse=False):
            self.register_buffer(name, torch.zeros_like(p.detach()))


def _ewc_layers(model, adapter_name, tuner):
    for _, layer in tuner._layers_with(model, adapter_name):
        adapter = layer.adapters[adapter_name]
        yield adapter, adapter.ewc_fisher, adapter.ewc_anchor


@register_tuner("EWC_LORA", EwcLoraConfig)
class EwcLoraTuner(LoraTuner):
    consolidates_tasks = True
    supports_weighted_combination = False
    converts_to_plain = False

    def create_adapter(self, base_layer, config: EwcLoraConfig, module_name: str, adapter_name: str) -> Adapter:
        adapter = super().create_adapter(base_layer, config, module_name, adapter_name)
        adapter.ewc_fisher = EwcState(adapter)
        adapter.ewc_anchor = EwcState(adapter)
        return adapter

    def aux_loss(self, model, adapter_name, config: EwcLoraConfig):
        if not config.ewc_tasks or not config.ewc_lambda:
            return None
        total = None
        for adapter, fisher, anchor in _ewc_layers(model, adapter_name, self):
            for name, p in adapter.named_parameters(recurse=False):
                term = (getattr(fisher, name) * (p - getattr(anchor, name)) ** 2).sum()
                total = term if total is None else total + term
        return None if total is None else 0.5 * config.ewc_lambda * total

    def end_task(self, model, adapter_name, config: EwcLoraConfig, batches) -> None:
        layers = list(_ewc_layers(model, adapter_name, self))
        params = [(a, n, p) for a, _, _ in layers for n, p in a.named_parameters(recurse=False)]
        squares = [torch.zeros_like(p) for _, _, p in params]
        was_training, used = model.training, 0
        model.train()   # the Fisher of the training-mode model (dropout as in training)
        for batch in itertools.islice(batches, config.fisher_batches):
            for _, _, p in params:
                p.grad = None
            out = model(**batch)
            if getattr(out, "loss", None) is None:
                raise ValueError("EWC-LoRA: the task batches need labels (the Fisher is of the task loss)")
            out.loss.backward()
            for sq, (_, _, p) in zip(squares, params):
                if p.grad is not None:
                    sq += p.grad.detach() ** 2
            used += 1
        if not used:
            raise ValueError("EWC-LoRA: end_task got no batches; the Fisher needs some of the finished task's data")
        with torch.no_grad():
            for sq, (adapter, name, p) in zip(squares, params):
                f = getattr(adapter.ewc_fisher, name)
                f.mul_(config.ewc_gamma).add_(sq / used)
                getattr(adapter.ewc_anchor, name).copy_(p.detach())
                p.grad = None
        model.train(was_training)
        config.ewc_tasks += 1


register_method(MethodInfo(
    "ewc-lora", EwcLoraConfig, category="reparameterized", kind="delta-weight", mergeable=True, default_lr=2e-3,
    **LORA_FLAG_FIELDS,
    description="LoRA over a sequence of tasks with elastic weight consolidation: a Fisher-weighted penalty "
                "keeps the adapter near what earlier tasks needed (continual learning)"))
