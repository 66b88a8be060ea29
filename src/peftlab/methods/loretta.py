"""LoRETTA (Yang, Zhou, Wong & Zhang, NAACL 2024): bottleneck adapters, or LoRA's factors, stored as tensor trains.

Tensorised matrix (the authors' TensorizedLinear). A matrix M (rows × cols, applied as x M) is the row-major
reshape of a tensor train over modes k_1 × … × k_d with Π k_j = rows·cols:
  M[i, o] = G_1[:, j_1, :] G_2[:, j_2, :] ⋯ G_d[:, j_d, :],   G_j ∈ R^{r_{j−1}×k_j×r_j}, r_0 = r_d = 1,
(j_1, …, j_d) the digits of i·cols + o in the radices (k_1, …, k_d), j_1 the most significant; inner ranks
`tensor_rank`. As in the authors' code the cores are contracted into M every forward (rows·cols·tensor_rank²
flops: M is one small factor here) and x M follows. Modes: factorize(rows) + factorize(cols) (TT-LoRA's balanced factors, `max_factor` 16:
576 → [12, 8, 6], 64 → [8, 8], 8 → [8]) or `factorization` per dimension; the contraction is TT-LoRA's
`tt_dense` with every mode an output digit (row-major). Init `"gaussian"` (the authors' code): core j ~
N(0, 1)/√r_j · σ^{1/d}, σ = √(1/(rows + cols)), so M's entries have standard deviation σ; biases (adp only)
U(±1/√cols). Neither variant is the base model at step 0 then; `init_weights="zero"` zeroes the last core of
the up projection and its bias (adp) or of B (rep), and the model starts unchanged.

LoRETTA_adp (`loretta-adp`): h ← h + s·(act(dropout(h) M_down + b_down) M_up + b_up), M_down d × bottleneck and
M_up bottleneck × d tensorised, h the output of the attention output projection and of the last feed-forward
projection (the paper's sites, placed by adapters.py's sequential-adapter table, `placement` both; or explicit
`target_modules`). Not mergeable (act between the projections). Defaults are the authors' LLM scripts':
bottleneck 64, relu, s 1, tensor_rank 8.
LoRETTA_rep (`loretta-rep`): y = W x + b + s·B A dropout(x), s = lora_alpha / r, A = M_Aᵀ (r × d_in), B = M_Bᵀ
(d_out × r), M_A (d_in × r) and M_B (r × d_out) tensorised. It is LoRA with A and B generated from the cores every
forward, so the fused kernels, sibling fusion and mixed batches compute it (core/lowrank.py); mergeable.
Defaults: r 8, lora_alpha 16, lora_dropout 0.05, tensor_rank 8, LoRA's targets (q, v).

Not implemented: the authors' LLaMA adapter sites (their code puts adapters on the inputs of gate_proj and
up_proj and on the output of down_proj, LLM-Adapters' table, not the paper's after-attention/after-FFN
sites); their per-hidden-size mode tables whose modes straddle the row/column split (e.g. 4096 × 8 as
[16, 16, 8, 4, 4]); a learned scaling; training the layer norms (their LLaMA rep script does, their marking code
does not: `modules_to_save` does it here); the tensorised classifier head for SEQ_CLS.
Files: ours, `LORETTA_ADP` (`<site>.adapter_down.cores.<j>`, `.adapter_down.bias`, same for adapter_up) and
`LORETTA_REP` (`<module>.loretta_A.cores.<j>`, `<module>.loretta_B.cores.<j>`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import PeftConfig
from ..core.functional import fused_ok, lora_linear
from ..core.layer import Adapter
from ..core.lowrank import LowRankOperands
from ..core.quantized import base_fusable, dense_weight, weight_rebuild
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.targets import linear_features
from ..core.tuner import LayerTuner
from .adapters import ACTIVATIONS, BottleneckFields, adapted, adapter_sites, as_bottleneck_config, out_features
from .tt_lora import factorize, tt_dense

INITS = ("gaussian", "zero")


@dataclass
class LorettaFields(PeftConfig):
    """The tensor-train settings both variants share."""
    tensor_rank: int = 8            # the authors' LLM and BERT scripts (their config classes default to 5)
    # dimension -> its factors, e.g. {"768": [8, 8, 12]}; dimensions not listed are factorised automatically
    factorization: dict = field(default_factory=dict)
    max_factor: int = 16
    init_weights: str = "gaussian"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if isinstance(self.tensor_rank, bool) or not isinstance(self.tensor_rank, int) or self.tensor_rank <= 0:
            raise ValueError(f"{name}: tensor_rank (the inner TT rank) must be a positive integer, "
                             f"got {self.tensor_rank!r}")
        if isinstance(self.max_factor, bool) or not isinstance(self.max_factor, int) or self.max_factor < 2:
            raise ValueError(f"{name}: max_factor must be an integer >= 2, got {self.max_factor!r}")
        if self.init_weights not in INITS:
            raise ValueError(f"{name}: init_weights={self.init_weights!r} is not one of {INITS} ('gaussian' is "
                             f"the authors' init, 'zero' starts from the base model)")
        fact = {}
        for dim, factors in (self.factorization or {}).items():
            factors = [int(f) for f in factors]
            if any(f < 1 for f in factors) or math.prod(factors) != int(dim):
                raise ValueError(f"{name}: factorization[{dim}] = {factors} multiplies to {math.prod(factors)}, "
                                 f"not {dim}; give positive factors whose product is the dimension")
            fact[str(int(dim))] = factors  # JSON keys are strings: saved and in-memory configs compare equal
        self.factorization = fact

    def factors(self, d: int) -> list[int]:
        return list(self.factorization.get(str(d)) or factorize(d, self.max_factor))

    def modes(self, rows: int, cols: int) -> list[int]:
        """The TT modes of a rows × cols factor matrix: the row factors, then the column factors."""
        return self.factors(rows) + self.factors(cols)


class TensorizedLinear(nn.Module):
    """x M (+ b), M (rows × cols) the row-major reshape of a tensor train over `modes` (module docstring)."""

    def __init__(self, rows: int, cols: int, modes: list[int], tensor_rank: int, bias: bool = False,
                 zero: bool = False):
        super().__init__()
        if math.prod(modes) != rows * cols:
            raise ValueError(f"TT modes {modes} multiply to {math.prod(modes)}, not {rows} × {cols} = {rows * cols}")
        self.rows, self.cols, self.modes = rows, cols, list(modes)
        ranks = [1] + [tensor_rank] * (len(modes) - 1) + [1]
        sigma = math.sqrt(1.0 / (rows + cols))  # each core carries σ^{1/d}: M's entries have std σ
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.randn(ranks[j], k, ranks[j + 1]) / math.sqrt(ranks[j + 1]) * sigma ** (1 / len(modes)))
             for j, k in enumerate(modes)])
        self.bias = nn.Parameter(torch.empty(cols).uniform_(-1 / math.sqrt(cols), 1 / math.sqrt(cols))) if bias \
            else None
        if zero:
            with torch.no_grad():
                self.cores[-1].zero_()
                if self.bias is not None:
                    self.bias.zero_()

    def matrix(self) -> torch.Tensor:
        """M (rows, cols): a train with only output digits is the row-major vector of M."""
        return tt_dense(list(self.cores), [], self.modes).reshape(self.rows, self.cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.matrix().t(), self.bias)  # (..., rows) @ (rows, cols)


# -- LoRETTA_rep ---------------------------------------------------------------------------------------------


@dataclass
class LorettaRepConfig(LorettaFields):
    peft_type: str = "LORETTA_REP"
    r: int = 8                       # LoRA's rank (the authors' rep_bottleneck)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: Optional[Union[list[str], str]] = None   # None: the architecture's LoRA defaults (q, v)
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LorettaRepConfig: r must be a positive integer (the rank of A and B), got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or \
                not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"LorettaRepConfig: lora_alpha must be a positive finite number (scaling = "
                             f"lora_alpha / r), got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LorettaRepConfig: lora_dropout is a probability in [0, 1), got {self.lora_dropout!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LorettaRepConfig: layers_pattern needs layers_to_transform as well")


class LorettaRepLinear(Adapter):
    """y = W x + b + s·B A dropout(x), A = M_Aᵀ and B = M_Bᵀ contracted from their cores (module docstring)."""
    mergeable = True
    fuses_base = True

    def __init__(self, d_in: int, d_out: int, r: int, scale: float, tensor_rank: int, modes_A: list[int],
                 modes_B: list[int], dropout: float = 0.0, fan_in_fan_out: bool = False, init: str = "gaussian"):
        super().__init__()
        self.scale, self.fan_in_fan_out = scale, fan_in_fan_out
        self.loretta_A = TensorizedLinear(d_in, r, modes_A, tensor_rank)                        # x ↦ x M_A
        self.loretta_B = TensorizedLinear(r, d_out, modes_B, tensor_rank, zero=init == "zero")  # u ↦ u M_B
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, d_in), B (d_out, r)) in LoRA's layout, with gradients to the cores."""
        return self.loretta_A.matrix().t(), self.loretta_B.matrix().t()

    def _base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        w = dense_weight(base_layer)  # a quantised base: a transient dequantised copy
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        A, B = self.factors()
        delta = (B.float() @ A.float()) * self.scale  # (d_out, r) @ (r, d_in)
        return delta.t() if self.fan_in_fan_out else delta

    def _dropout_active(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def _takes_fused_kernel(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        return not self._dropout_active() and base_fusable(base_layer, x) and fused_ok(x, self.loretta_A.cores[0])

    # -- the low-rank operand protocol (core/lowrank.py) ----------------------------------------------------
    def lowrank_operands(self, base_layer: nn.Module) -> Optional[LowRankOperands]:
        if self._dropout_active():  # dropout on A's input: not of the protocol's form
            return None
        A, B = self.factors()
        return LowRankOperands(self._base_weight(base_layer), base_layer.bias, A, B, self.scale,
                               rebuild_weight=weight_rebuild(base_layer))

    def joins_sibling_group(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        # the group kernel differentiates A and B (and through them the cores), not W
        return not base_layer.weight.requires_grad and self._takes_fused_kernel(x, base_layer) and \
            (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: Optional[torch.Tensor]) -> torch.Tensor:
        A, B = self.factors()
        if result is None:
            if self._takes_fused_kernel(x, base_layer):
                return lora_linear(x, self._base_weight(base_layer), base_layer.bias, A, B, self.scale,
                                   weight_rebuild(base_layer))
            result = base_layer(x)
        h = self.dropout(x.to(A.dtype))
        update = F.linear(F.linear(h, A), B)  # (N, r) then (N, d_out)
        return result + (update * self.scale).to(result.dtype)


@register_tuner("LORETTA_REP", LorettaRepConfig)
class LorettaRepTuner(LayerTuner):
    def create_adapter(self, base_layer, config: LorettaRepConfig, module_name: str, adapter_name: str) -> Adapter:
        d_in, d_out, conv1d = linear_features("LoRETTA_rep", base_layer, module_name)
        return LorettaRepLinear(d_in, d_out, config.r, config.lora_alpha / config.r, config.tensor_rank,
                                config.modes(d_in, config.r), config.modes(config.r, d_out), config.lora_dropout,
                                fan_in_fan_out=config.fan_in_fan_out or conv1d, init=config.init_weights)


# -- LoRETTA_adp ---------------------------------------------------------------------------------------------


@dataclass
class LorettaAdpConfig(LorettaFields, BottleneckFields):
    peft_type: str = "LORETTA_ADP"
    placement: str = "both"         # after "attention", "ffn" or "both" (the paper: both)
    target_modules: Optional[Union[list[str], str]] = None  # explicit sites instead of the module table

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.placement not in ("attention", "ffn", "both"):
            raise ValueError(f"LorettaAdpConfig: placement must be 'attention', 'ffn' or 'both', "
                             f"got {self.placement!r}")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"LorettaAdpConfig: scaling must be a number (s in h + s·adapter(h)), "
                             f"got {self.scaling!r}")


class TensorizedBottleneck(Adapter):
    """h ← h + s·(act(dropout(h) M_down + b_down) M_up + b_up), h the wrapped layer's output."""

    def __init__(self, d: int, bottleneck: int, tensor_rank: int, modes_down: list[int], modes_up: list[int],
                 act: str = "relu", dropout: float = 0.0, scaling: float = 1.0, init: str = "gaussian"):
        super().__init__()
        self.adapter_down = TensorizedLinear(d, bottleneck, modes_down, tensor_rank, bias=True)
        self.adapter_up = TensorizedLinear(bottleneck, d, modes_up, tensor_rank, bias=True, zero=init == "zero")
        self.act = ACTIVATIONS[act]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def merge_into(self, base_layer: nn.Module) -> None:
        raise TypeError("a LoRETTA_adp adapter computes up(act(down(h))): the nonlinearity between its projections "
                        "means it cannot be merged into the base weights; keep it unmerged, or train loretta-rep, "
                        "the mergeable variant")

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        h = self.dropout(result.to(self.adapter_down.cores[0].dtype))
        delta = self.adapter_up(self.act(self.adapter_down(h))) * self.scaling  # (..., b) then (..., d)
        return result + delta.to(result.dtype)


@register_tuner("LORETTA_ADP", LorettaAdpConfig)
class LorettaAdpTuner(LayerTuner):
    def inject(self, model, config: LorettaAdpConfig, adapter_name: str) -> None:
        # the sites of adapters.py's sequential adapters: after the attention output and the FFN output
        layout = as_bottleneck_config(config, adapter_type="sequential", placement=config.placement,
                                      target_modules=config.target_modules)
        b = config.bottleneck_size
        for _, name in adapter_sites(model, layout):
            layer = adapted(model, name)
            d = out_features(layer.base_layer, model)
            adapter = TensorizedBottleneck(d, b, config.tensor_rank, config.modes(d, b), config.modes(b, d),
                                           config.non_linearity, config.adapter_dropout, config.scaling,
                                           config.init_weights)
            layer.add(adapter_name, adapter.to(self._device_of(layer.base_layer)))


_PAPER = "(Yang et al. 2024, LoRETTA)"
register_method(MethodInfo(
    "loretta-rep", LorettaRepConfig, category="reparameterized", kind="delta-weight", mergeable=True,
    identity_at_init=False,  # the authors' Gaussian cores give ΔW ≠ 0; init_weights="zero" starts from the base
    default_lr=2e-3, rank_field="r", alpha_field="lora_alpha", dropout_field="lora_dropout",
    description=f"LoRA whose A and B are each the reshape of a tensor train of small cores {_PAPER}"))
register_method(MethodInfo(
    "loretta-adp", LorettaAdpConfig, category="additive", kind="activation", mergeable=False,
    identity_at_init=False, default_lr=5e-3, dropout_field="adapter_dropout",
    description=f"bottleneck adapters after attention and FFN outputs whose down/up matrices are tensor trains "
                f"{_PAPER}"))
