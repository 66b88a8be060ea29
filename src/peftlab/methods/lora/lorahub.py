"""LoraHub (Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition"): the
weights that compose existing LoRA adapters for a new task, found from a few of its examples without gradients.

For weights w (one per source adapter), every layer's composed factors are element-wise sums
    A = Σ_i w_i A_i,   B = Σ_i w_i (s_i / s) B_i          (s_i each source's scale, s the composed adapter's)
so ΔW(w) = s · B A (cross terms included, as LoraHub composes). The search minimises
    L(w) = mean cross-entropy of the few examples' completions under W + ΔW(w)  +  l1 · Σ_i |w_i|
with CMA-ES (the maintained `cma` package, Hansen's pycma) from w = 0 (the base model) within [-bound, bound], for at
most `budget` evaluations of L; the best w seen is kept, so the result is never worse than the start. The
reference (sail-sg/lorahub) uses nevergrad's NGOpt with the same objective, start, bounds (1.5), l1 (0.05) and
budget (40). The composed adapter is an ordinary LoRA adapter (HF PEFT's format).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

BOUND, L1, BUDGET = 1.5, 0.05, 40


@dataclass
class HubResult:
    weights: list[float]            # the best w
    loss: float                     # its objective (cross-entropy + l1 term)
    start_loss: float               # the objective at w = 0: the base model
    evaluations: int
    history: list[float] = field(default_factory=list)   # the objective of each evaluation, in order


def compose_into(peft_model, sources: Sequence[str], target: str, weights: Sequence[float]) -> None:
    """Write A = Σ w_i A_i and B = Σ w_i (s_i/s) B_i into adapter `target`, layer by layer (in place)."""
    from ...core.tuner import adapted_layers
    with torch.no_grad():
        for _, layer in adapted_layers(peft_model.model):
            if target not in layer.adapters:
                continue
            new = layer.adapters[target]
            new.lora_A.zero_()
            new.lora_B.zero_()
            for name, w in zip(sources, weights):
                if name in layer.adapters:
                    src = layer.adapters[name]
                    new.lora_A.add_(src.lora_A, alpha=float(w))
                    new.lora_B.add_(src.lora_B, alpha=float(w) * src.scale / new.scale)


def search(objective: Callable[[list[float]], float], n: int, budget: int = BUDGET, bound: float = BOUND,
           seed: int = 0, sigma0: float = 0.5) -> HubResult:
    """CMA-ES over w ∈ [-bound, bound]^n from w = 0; objective(w) -> loss. w = 0 is evaluated first."""
    with warnings.catch_warnings():   # cma warns that matplotlib (for its plots) is missing
        warnings.simplefilter("ignore")
        import cma
    history = [objective([0.0] * n)]
    best_w, best = [0.0] * n, history[0]
    es = cma.CMAEvolutionStrategy([0.0] * n, sigma0, {"bounds": [-bound, bound], "seed": seed + 1, "verbose": -9,
                                                       "maxfevals": max(budget - 1, 1)})
    while not es.stop() and len(history) < budget:
        candidates = es.ask()
        candidates = candidates[: budget - len(history)]
        values = []
        for w in candidates:
            values.append(objective([float(v) for v in w]))
            history.append(values[-1])
            if values[-1] < best:
                best, best_w = values[-1], [float(v) for v in w]
        if len(values) < es.popsize:   # the budget ran out mid-generation
            break
        es.tell(candidates, values)
    return HubResult(best_w, best, history[0], len(history), history)


def lorahub(peft_model, sources: Sequence[str], target: str, batches: Sequence[dict], budget: int = BUDGET,
            l1: float = L1, bound: float = BOUND, seed: int = 0) -> HubResult:
    """Find the weights for `sources` (adapters of peft_model, equal ranks) on the few-example `batches` (collated,
    with labels) and leave adapter `target` composed with them; returns the search's result."""
    peft_model.set_adapter(target)
    peft_model.eval()
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]   # the positions the loss averages over
    tokens = sum(counts)

    def objective(w: list[float]) -> float:
        compose_into(peft_model, sources, target, w)
        with torch.no_grad():
            nll = sum(float(peft_model(**b).loss) * n for b, n in zip(batches, counts))
        return nll / max(tokens, 1) + l1 * sum(abs(v) for v in w)

    result = search(objective, len(sources), budget, bound, seed)
    compose_into(peft_model, sources, target, result.weights)
    return result
