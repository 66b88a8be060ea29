"""TT-LoRA: the update ΔW as a tensor train, y = W x + alpha · TT(x), applied by contraction (ΔW never formed).

d_in = Π m_k and d_out = Π n_l are factorised (automatically, or by `factorization`); the chain of cores is
G_1..G_p (input factors) then G_{p+1}..G_{p+q} (output factors), G_k ∈ R^{r_{k-1}×f_k×r_k}, r_0 = r_end = 1.
Index convention (the reference's): x is viewed as [N, m_p, …, m_1], so core k contracts the least significant
remaining input factor; each output core appends its factor, so n_1 is the most significant output digit.
Reference init: each core Kaiming-uniform(a=√8) divided by its Frobenius norm (ΔW ≠ 0 at step 0);
`init_weights="zero"` zeroes the last core instead (ΔW = 0 at step 0, like LoRA's B).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn

from ..core.config import PeftConfig
from ..core.layer import Adapter
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.targets import linear_features
from ..core.tuner import LayerTuner

INITS = ("normalized_kaiming", "zero")


@dataclass
class TTLoraConfig(PeftConfig):
    peft_type: str = "TT_LORA"
    r: int = 5                      # inner TT rank (reference default)
    alpha: float = 16.0             # y = W x + alpha · TT(x) (reference default)
    target_modules: Optional[Union[list[str], str]] = None   # None: the architecture's LoRA defaults (q, v)
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    # dimension -> its factors, e.g. {"768": [64, 4, 3]}; dimensions not listed are factorised automatically
    factorization: dict = field(default_factory=dict)
    max_factor: int = 16            # automatic factorisation: about ceil(log_max_factor(d)) balanced factors
    init_weights: str = "normalized_kaiming"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise ValueError(f"TTLoraConfig: r (the TT rank) must be a positive integer, got {self.r}")
        if self.max_factor < 2:
            raise ValueError(f"TTLoraConfig: max_factor must be >= 2, got {self.max_factor}")
        if self.init_weights not in INITS:
            raise ValueError(f"TTLoraConfig: init_weights={self.init_weights!r} is not one of {INITS} "
                             f"('normalized_kaiming' is the reference's init, 'zero' starts from ΔW = 0)")
        # JSON turns int keys into strings; keep strings so saved and in-memory configs compare equal.
        fact = {}
        for dim, factors in (self.factorization or {}).items():
            factors = [int(f) for f in factors]
            if math.prod(factors) != int(dim) or any(f < 1 for f in factors):
                raise ValueError(f"TTLoraConfig: factorization[{dim}] = {factors} multiplies to "
                                 f"{math.prod(factors)}, not {dim}")
            fact[str(int(dim))] = factors
        self.factorization = fact


def factorize(d: int, max_factor: int = 16) -> list[int]:
    """Split d into about ceil(log(d)/log(max_factor)) factors of balanced size (largest first).

    576 -> [12, 8, 6], 768 -> [12, 8, 8], 1536 -> [16, 12, 8]; a prime d stays one factor. Fewer, larger factors
    mean fewer sequential contractions; more, smaller ones fewer parameters (each core is r·f·r).
    """
    primes, n, p = [], d, 2
    while p * p <= n:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    if n > 1:
        primes.append(n)
    count = min(max(1, math.ceil(math.log(d) / math.log(max_factor) - 1e-9)), len(primes)) if d > 1 else 1
    groups = [1] * count
    for q in sorted(primes, reverse=True):   # greedy: largest prime to the smallest group
        groups[groups.index(min(groups))] *= q
    return sorted(groups, reverse=True)


def tt_contract(x: torch.Tensor, cores, in_factors: list[int], out_factors: list[int]) -> torch.Tensor:
    """x (N, d_in) -> (N, d_out) through the train, one core at a time (never forming ΔW)."""
    n = x.shape[0]
    state = x.reshape(n, 1, -1)                                        # (N, r_0 = 1, d_in)
    for k, m in enumerate(in_factors):
        core = cores[k]                                                # (r, m, r')
        state = state.reshape(n, core.shape[0], -1, m)                 # least significant input factor last
        state = torch.einsum("nrsm,rmp->nps", state, core)             # (N, r', rest of d_in)
    for k, _ in enumerate(out_factors):
        core = cores[len(in_factors) + k]                              # (r, f, r')
        state = torch.einsum("nrs,rfp->npsf", state, core)             # append the output factor
        state = state.reshape(n, core.shape[2], -1)
    return state.reshape(n, -1)                                        # (N, r_end = 1 · d_out)


def tt_dense(cores, in_factors: list[int], out_factors: list[int]) -> torch.Tensor:
    """ΔW (d_out, d_in) reconstructed from the cores: contract the whole chain, then order the indices."""
    full = cores[0]
    for core in cores[1:]:
        full = torch.einsum("...a,abc->...bc", full, core)            # (1, f_1, ..., f_k, r_k)
    p, q = len(in_factors), len(out_factors)
    full = full.reshape(*in_factors, *out_factors)                     # (m_1..m_p, n_1..n_q)
    # Input digits in row-major order are (m_p, …, m_1); output digits (n_1, …, n_q).
    full = full.permute(*reversed(range(p)), *range(p, p + q))
    return full.reshape(math.prod(in_factors), math.prod(out_factors)).t()


class TTLoraLinear(Adapter):
    mergeable = True

    def __init__(self, d_in: int, d_out: int, in_factors: list[int], out_factors: list[int], r: int,
                 alpha: float, init: str = "normalized_kaiming", fan_in_fan_out: bool = False):
        super().__init__()
        self.in_factors, self.out_factors = list(in_factors), list(out_factors)
        self.alpha, self.fan_in_fan_out = alpha, fan_in_fan_out
        dims = self.in_factors + self.out_factors
        ranks = [1] + [r] * (len(dims) - 1) + [1]
        self.tt_cores = nn.ParameterList(
            [nn.Parameter(torch.empty(ranks[k], f, ranks[k + 1])) for k, f in enumerate(dims)])
        with torch.no_grad():
            for core in self.tt_cores:
                nn.init.kaiming_uniform_(core, a=math.sqrt(8))
                core.div_(core.norm() + 1e-6)
            if init == "zero":
                self.tt_cores[-1].zero_()

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        delta = self.alpha * tt_dense([c.float() for c in self.tt_cores], self.in_factors, self.out_factors)
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        dtype = self.tt_cores[0].dtype
        h = x.to(dtype).reshape(-1, x.shape[-1])
        out = tt_contract(h, self.tt_cores, self.in_factors, self.out_factors) * self.alpha
        return result + out.reshape(*x.shape[:-1], -1).to(result.dtype)


@register_tuner("TT_LORA", TTLoraConfig)
class TTLoraTuner(LayerTuner):
    def factors(self, d: int, config: TTLoraConfig) -> list[int]:
        return list(config.factorization.get(str(d)) or factorize(d, config.max_factor))

    def create_adapter(self, base_layer, config: TTLoraConfig, module_name: str, adapter_name: str) -> Adapter:
        d_in, d_out, conv1d = linear_features("TT-LoRA", base_layer, module_name)
        adapter = TTLoraLinear(d_in, d_out, self.factors(d_in, config), self.factors(d_out, config), config.r,
                               config.alpha, config.init_weights, config.fan_in_fan_out or conv1d)
        return adapter.to(base_layer.weight.device)


register_method(MethodInfo(
    "tt-lora", TTLoraConfig, category="reparameterized", kind="delta-weight", mergeable=True,
    identity_at_init=False,  # the reference init gives ΔW ≠ 0; init_weights="zero" starts from the base model
    default_lr=5e-3, rank_field="r", alpha_field="alpha",
    description="ΔW as a tensor train of small cores over factorised d_in/d_out, applied by contraction"))
