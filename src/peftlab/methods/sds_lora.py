"""SDS-LoRA: a shared LoRA in W's top singular subspace and one LoRA per domain in its complement (Takama et al.).

Per target layer, W = U Σ Vᵀ (d_out × d_in) and U_top = its k leading left singular vectors (d_out × k, frozen):

  B_shared = U_top C                      C (k × r) trained, so B_shared lies in span(U_top)
  B_j      = (I − U_top U_topᵀ) B̃_j        B̃_j (d_out × r_d) trained, so B_j ⟂ span(U_top), j = 0..K−1
  y = W x + b + s·B_shared A x + [row's domain j] s_d·B_j A_j x        s = lora_alpha / r, s_d = lora_alpha / r_d

The shared LoRA trains on every row, LoRA j only on rows of domain j. A row's domain is the forward's `task_ids`
(records' "expert" key in peftlab's data, batched as task_ids; -1 = unknown). Rows with an unknown domain, and
every row of a forward without task_ids, follow `unknown_domain`: "shared" (the shared LoRA alone) or "mean"
(the shared LoRA plus the mean of the K domain LoRAs, each s_d/K). `generate(..., task_ids=...)` keeps each
row's domain for the whole generation (HF's expansion of rows for beams or several sequences included).

Computation. For a batch whose rows all follow one rule (one domain, or all unknown), the layer is one LoRA
A = [A; A_j], B = [s·B_shared, s_d·B_j] in the low-rank operand protocol (core/lowrank.py): the fused kernels,
sibling fusion and mixed-adapter batches compute it. For rows of several domains, the blocks of the domains
present are concatenated into one LoRA and each row's rank-space activations are masked to its own blocks:
u = (x Aᵀ) ⊙ g_row, y = base + u Bᵀ — two matmuls for the whole batch, no loop over rows, and a row gives
exactly zero gradient to the other domains' blocks. Domains absent from a batch are not in its graph at all (their
gradients stay None, so AdamW's momentum and weight decay leave them untouched). Rows of mixed domains cannot be
combined with mixed-adapter batches (adapter_names; a clear error), rows of one domain can.

Merging (for one domain, `merge_domain`; None = the unknown-domain rule): ΔW = s·B_shared A + s_d·B_j A_j. While
merged, a forward whose rows need another domain is refused (the merged weight holds only that one);
`set_merge_domain(model, j)` picks the domain before `merge_adapter()` / `merge_and_unload()`.

The paper (Takama, Ding, Yokota & Tamaki, "Separating Shared and Domain-Specific LoRAs for Multi-Domain
Learning", CVPR 2025 Workshops, arXiv 2508.02978) puts the shared LoRA in the column space of W and the domain
LoRAs in its left null space, for action recognition on a ViT. Only its abstract could be read here, so these are
our choices, not the paper's stated settings:
- k = `shared_dims`: an int, or a fraction of min(d_out, d_in) (⌊f·min⌋; default 0.5). The exact column / left
  null split is k = rank W, i.e. `shared_dims=1.0` on layers with d_out > d_in; on square or wide layers (every
  attention projection of a LLaMA) the left null space is empty, so the complement there is the directions of
  the smallest singular values. A layer where k < r or d_out − k < r_d is refused (the error names it).
- B_j is kept as (I − U_top U_topᵀ) B̃_j rather than U_rest C_j: the same set of matrices, but only U_top is
  stored — U_rest would be d_out × (d_out − k) per layer, and the left null space has no canonical basis. The
  projection holds B_j in the complement whatever B̃_j holds (Adam's per-coordinate steps, taken in B̃_j's ambient
  coordinates rather than in U_rest's, do move B̃_j partly into span(U_top); those components have no effect).
- Init as LoRA: A, A_j Kaiming-uniform(a=√5), C = 0 and B̃_j = 0 (the model unchanged at step 0);
  `init_lora_weights=False` draws C and B̃_j Kaiming too. Scaling alpha / rank per LoRA.
- Domain unknown: "shared" by default ("mean" as the option); the paper evaluates with the domain known.
- Evaluation in `peftlab train` / `eval` generates without task_ids, so it scores the unknown-domain rule;
  `peftlab continual` passes no task labels either, so there only the shared LoRA trains (sequential fine-tuning).
U_top is computed once (float64 SVD of the dense, for QLoRA dequantised, W) and saved with the adapter, so a
loaded adapter never depends on an SVD's signs or on the basis chosen for repeated singular values.
File: ours, `SDS_LORA`; per layer `sds_U` (d_out × k), `sds_shared_A`, `sds_shared_C`, `sds_domain_A.<j>`,
`sds_domain_B.<j>` (B̃_j).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
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
from ..core.tuner import LayerTuner, adapted_layers

UNKNOWN_RULES = ("shared", "mean")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass
class SdsLoraConfig(PeftConfig):
    peft_type: str = "SDS_LORA"
    r: int = 8                           # the shared LoRA's rank
    domain_r: Optional[int] = None       # each domain LoRA's rank (None: r)
    num_domains: int = 2
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    shared_dims: Union[int, float] = 0.5  # k: top singular directions of W for the shared LoRA (int, or fraction)
    unknown_domain: str = "shared"       # rows without a domain: "shared" or "mean" (shared + mean of domains)
    merge_domain: Optional[int] = None   # the domain merge_adapter folds into W (None: the unknown-domain rule)
    domain_names: Optional[list] = None
    init_lora_weights: bool = True
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.domain_r is None:
            self.domain_r = self.r
        for name in ("r", "domain_r"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"SdsLoraConfig: {name} must be a positive integer (the rank of the "
                                 f"{'shared' if name == 'r' else 'each domain'} LoRA), got {getattr(self, name)!r}")
        if not _positive_int(self.num_domains):
            raise ValueError(f"SdsLoraConfig: num_domains must be a positive integer (one LoRA per domain; rows "
                             f"name theirs by task_ids 0..num_domains-1), got {self.num_domains!r}")
        f = self.shared_dims
        if isinstance(f, bool) or not isinstance(f, (int, float)) or \
                (isinstance(f, int) and f < 1) or (isinstance(f, float) and not 0.0 < f <= 1.0):
            raise ValueError(f"SdsLoraConfig: shared_dims is how many top singular directions of W hold the shared "
                             f"LoRA: an integer >= 1, or a fraction in (0, 1] of min(d_out, d_in); got {f!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or \
                not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"SdsLoraConfig: lora_alpha must be a positive finite number (scaling = lora_alpha / "
                             f"rank), got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"SdsLoraConfig: lora_dropout is a probability in [0, 1), got {self.lora_dropout!r}")
        if self.unknown_domain not in UNKNOWN_RULES:
            raise ValueError(f"SdsLoraConfig: unknown_domain must be 'shared' (rows without a domain use the shared "
                             f"LoRA alone) or 'mean' (shared + the mean of the domain LoRAs), got "
                             f"{self.unknown_domain!r}")
        if self.merge_domain is not None and not (isinstance(self.merge_domain, int) and
                                                  not isinstance(self.merge_domain, bool) and
                                                  0 <= self.merge_domain < self.num_domains):
            raise ValueError(f"SdsLoraConfig: merge_domain must be None (merge the unknown-domain rule) or a domain "
                             f"index 0..{self.num_domains - 1}, got {self.merge_domain!r}")
        if self.domain_names is not None and len(self.domain_names) != self.num_domains:
            raise ValueError(f"SdsLoraConfig: {len(self.domain_names)} domain_names for num_domains="
                             f"{self.num_domains}; give one name per domain")
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"SdsLoraConfig: init_lora_weights must be True (C and B̃ zero: the model unchanged "
                             f"at step 0) or False (random), got {self.init_lora_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("SdsLoraConfig: layers_pattern needs layers_to_transform as well")

    def shared_dims_of(self, d_out: int, d_in: int, module_name: str) -> int:
        """k for one layer, checked: the shared LoRA needs k >= r, the domain LoRAs d_out - k >= domain_r."""
        m = min(d_out, d_in)
        k = self.shared_dims if isinstance(self.shared_dims, int) else max(1, int(self.shared_dims * m))
        if k > m or k < self.r or d_out - k < self.domain_r:
            raise ValueError(f"SDS-LoRA cannot split {module_name} (W {d_out}×{d_in}, rank at most {m}): shared_dims "
                             f"gives k={k} top directions; it needs r={self.r} <= k <= {m} and d_out - k >= "
                             f"domain_r={self.domain_r} directions left for the domain LoRAs. Choose shared_dims in "
                             f"[{self.r}, {min(m, d_out - self.domain_r)}] (or a fraction), lower r / domain_r, or "
                             f"leave this module out of target_modules")
        return k


class DomainRows:
    """The current batch's domains, shared by every layer of one SDS-LoRA adapter; set per forward by the tuner.

    domains, weight: the domain LoRAs the layers use now, each weighted `weight` (1, or 1/K for the "mean" rule);
    gate: None when every row uses all of them, else (rows, r + len(domains)·r_d): 1 on a row's shared columns and
    on its own domain's block (1/K on every block for an unknown row under "mean"), 0 elsewhere."""

    def __init__(self, num_domains: int, r: int, domain_r: int, unknown: str, merge_domain: Optional[int]):
        self.num_domains, self.r, self.domain_r, self.unknown = num_domains, r, domain_r, unknown
        self.merge_domain = merge_domain
        self.set(None, None)

    def blocks_for(self, domain: int) -> tuple[list[int], float]:
        if domain >= 0:
            return [domain], 1.0
        k = self.num_domains
        return ([], 1.0) if self.unknown == "shared" else (list(range(k)), 1.0 / k)

    def set(self, task_ids: Optional[torch.Tensor], device) -> None:
        self.gate, self.uniform = None, -1
        if task_ids is None:
            self.domains, self.weight = self.blocks_for(-1)
            return
        ids = torch.as_tensor(task_ids).long().cpu()         # one host sync per forward, not per layer
        if ids.dim() != 1:
            raise ValueError(f"SDS-LoRA: task_ids must be one domain per row, shape (batch,), got {tuple(ids.shape)}")
        present = ids.unique().tolist()
        bad = [d for d in present if not -1 <= d < self.num_domains]
        if bad:
            raise ValueError(f"SDS-LoRA: task_ids has domain(s) {bad}, but the adapter has num_domains="
                             f"{self.num_domains} (domains 0..{self.num_domains - 1}, -1 = unknown); build it with "
                             f"num_domains = the number of domains in the data")
        if len(present) == 1:
            self.uniform = present[0]
            self.domains, self.weight = self.blocks_for(present[0])
            return
        self.uniform, self.weight = None, 1.0
        mean = -1 in present and self.unknown == "mean"
        self.domains = list(range(self.num_domains)) if mean else [d for d in present if d >= 0]
        unknown = (ids == -1).float() / self.num_domains if mean else torch.zeros(len(ids))
        cols = [torch.ones(len(ids), self.r)]
        for d in self.domains:
            cols.append(((ids == d).float() + unknown).unsqueeze(1).expand(-1, self.domain_r))
        self.gate = torch.cat(cols, dim=1).to(device)        # (rows, r + len(domains)·r_d)

    def gate_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The gate broadcastable over x's rank-space activations (x.shape[:-1] + (R,)), or None."""
        g = self.gate
        if g is None:
            return None
        n, m = g.shape[0], x.shape[0]
        if m != n:
            if m < n or m % n:
                raise ValueError(f"SDS-LoRA: this batch gives domains for {n} rows but a layer sees {m}; rows of "
                                 f"different domains cannot be split further (mixed-adapter batches, adapter_names) "
                                 f"— give every row of such a batch one domain, or run the domains separately")
            g = g.repeat_interleave(m // n, dim=0)            # HF generate's expansion (beams, several sequences)
        return g.view(m, *([1] * (x.dim() - 2)), g.shape[1])


def _kaiming(t: torch.Tensor) -> torch.Tensor:
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))      # nn.Linear's default, LoRA's A


def top_left_singular(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading left singular vectors of W (d_out × d_in) as a (d_out, k) float32 tensor."""
    U, _, _ = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return U[:, :k].to(torch.float32).contiguous()


class SdsLoraLinear(Adapter):
    """y = W x + b + s·(U C) A x + s_d·(I − UUᵀ) B̃_j A_j x for a row of domain j, on a Linear / Conv1D."""
    mergeable = True
    fuses_base = True

    def __init__(self, U: torch.Tensor, d_in: int, r: int, domain_r: int, num_domains: int, scale: float,
                 domain_scale: float, rows: DomainRows, dropout: float = 0.0, fan_in_fan_out: bool = False,
                 init: bool = True):
        super().__init__()
        d_out, k = U.shape
        self.rows, self.scale, self.domain_scale, self.fan_in_fan_out = rows, scale, domain_scale, fan_in_fan_out
        self.register_buffer("sds_U", U)                     # frozen, saved: C's coordinates are in its basis
        self.sds_shared_A = nn.Parameter(_kaiming(torch.empty(r, d_in)))
        self.sds_shared_C = nn.Parameter(torch.zeros(k, r))
        self.sds_domain_A = nn.ParameterList(nn.Parameter(_kaiming(torch.empty(domain_r, d_in)))
                                             for _ in range(num_domains))
        self.sds_domain_B = nn.ParameterList(nn.Parameter(torch.zeros(d_out, domain_r)) for _ in range(num_domains))
        if not init:
            with torch.no_grad():
                _kaiming(self.sds_shared_C)
                for b in self.sds_domain_B:
                    _kaiming(b)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged_domain: Optional[int] = None

    # -- the update's factors ----------------------------------------------------------------------------------
    def shared_B(self) -> torch.Tensor:
        return self.sds_U @ self.sds_shared_C                # (d_out, k) @ (k, r): in span(U_top)

    def domain_B(self, domains: list[int]) -> torch.Tensor:
        """[(I − UUᵀ) B̃_j for j in domains] side by side, (d_out, len·r_d): orthogonal to span(U_top)."""
        B = torch.cat([self.sds_domain_B[j] for j in domains], dim=1)
        return B - self.sds_U @ (self.sds_U.t() @ B)         # (d_out, k) @ (k, len·r_d)

    def factors(self, domains: list[int], weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the one LoRA y = W x + B A x that the shared LoRA plus `domains` (each weighted) make, the
        scales folded into B: A = [A; A_j...] (R, d_in), B = [s·B_s, w·s_d·B_j...] (d_out, R)."""
        A, B = [self.sds_shared_A], [self.shared_B() * self.scale]
        if domains:
            A += [self.sds_domain_A[j] for j in domains]
            B.append(self.domain_B(domains) * (self.domain_scale * weight))
        return torch.cat(A, dim=0), torch.cat(B, dim=1)

    def _weight(self, base_layer: nn.Module) -> torch.Tensor:
        w = dense_weight(base_layer)
        return w.t() if self.fan_in_fan_out else w           # (d_out, d_in)

    def _fused(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        return not dropping and base_fusable(base_layer, x) and fused_ok(x, self.sds_shared_A)

    # -- the low-rank operand protocol (core/lowrank.py): only while every row uses the same blocks -------------
    def lowrank_operands(self, base_layer: nn.Module) -> Optional[LowRankOperands]:
        if self.rows.gate is not None or (self.training and isinstance(self.dropout, nn.Dropout)):
            return None
        A, B = self.factors(self.rows.domains, self.rows.weight)
        return LowRankOperands(self._weight(base_layer), base_layer.bias, A, B, 1.0,
                               rebuild_weight=weight_rebuild(base_layer))

    def joins_sibling_group(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        return self.rows.gate is None and not base_layer.weight.requires_grad and self._fused(x, base_layer) and \
            (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: Optional[torch.Tensor]) -> torch.Tensor:
        gate = self.rows.gate_for(x)
        A, B = self.factors(self.rows.domains, self.rows.weight)
        if result is None:
            if gate is None and self._fused(x, base_layer):
                return lora_linear(x, self._weight(base_layer), base_layer.bias, A, B, 1.0, weight_rebuild(base_layer))
            result = base_layer(x)
        u = F.linear(self.dropout(x.to(A.dtype)), A)          # (..., R)
        if gate is not None:
            u = u * gate.to(u.dtype)                          # each row keeps its shared and its own domain's columns
        return result + F.linear(u, B).to(result.dtype)       # (..., R) @ (R, d_out)

    # -- merging: one domain (or the unknown-domain rule) into W ------------------------------------------------
    def _delta(self, domain: Optional[int]) -> torch.Tensor:
        A, B = self.factors(*self.rows.blocks_for(-1 if domain is None else domain))
        delta = B.float() @ A.float()                         # (d_out, R) @ (R, d_in)
        return delta.t() if self.fan_in_fan_out else delta

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return self._delta(self.rows.merge_domain)

    def merge_into(self, base_layer: nn.Module) -> None:
        super().merge_into(base_layer)
        self.merged_domain = self.rows.merge_domain

    def unmerge_from(self, base_layer: nn.Module) -> None:
        w = base_layer.weight
        with torch.no_grad():
            w.data -= self._delta(self.merged_domain).to(w.dtype)


def set_merge_domain(peft_model, domain: Optional[int], adapter_name: str = "default") -> None:
    """Which domain `merge_adapter()` / `merge_and_unload()` fold into W (None: the unknown-domain rule)."""
    config = peft_model.peft_config[adapter_name]
    dataclasses.replace(config, merge_domain=domain)          # the constructor's checks, before anything changes
    config.merge_domain = domain
    for _, layer in adapted_layers(peft_model.model):
        if adapter_name in layer.adapters:
            layer.adapters[adapter_name].rows.merge_domain = domain


@register_tuner("SDS_LORA", SdsLoraConfig)
class SdsLoraTuner(LayerTuner):
    takes_task_ids = True
    _rows: Optional[DomainRows] = None   # set only during inject()

    def inject(self, model, config: SdsLoraConfig, adapter_name: str) -> None:
        self._rows = DomainRows(config.num_domains, config.r, config.domain_r, config.unknown_domain,
                                config.merge_domain)
        try:
            super().inject(model, config, adapter_name)
        finally:
            self._rows = None

    def create_adapter(self, base_layer, config: SdsLoraConfig, module_name: str, adapter_name: str) -> Adapter:
        d_in, d_out, conv1d = linear_features("SDS-LoRA", base_layer, module_name)
        k = config.shared_dims_of(d_out, d_in, module_name)
        w = dense_weight(base_layer)
        U = top_left_singular(w.t() if conv1d else w, k)
        return SdsLoraLinear(U, d_in, config.r, config.domain_r, config.num_domains, config.lora_alpha / config.r,
                             config.lora_alpha / config.domain_r, self._rows, config.lora_dropout,
                             fan_in_fan_out=conv1d, init=config.init_lora_weights)

    def prepare_inputs(self, model, adapter_name, config, kwargs, generate):
        task_ids = kwargs.pop("task_ids", None)
        layer = next((layer for _, layer in self._layers_with(model, adapter_name)), None)
        if layer is None:
            return kwargs
        adapter = layer.adapters[adapter_name]
        adapter.rows.set(task_ids, adapter.sds_shared_A.device)
        if adapter_name in layer.merged and not layer.disabled and adapter.rows.uniform != \
                (-1 if adapter.merged_domain is None else adapter.merged_domain):
            merged = "the unknown-domain rule" if adapter.merged_domain is None else f"domain {adapter.merged_domain}"
            raise ValueError(f"SDS-LoRA adapter {adapter_name!r} is merged for {merged}, but this batch has rows of "
                             f"other domains (task_ids); call unmerge_adapter() first, or give every row "
                             f"{'no domain' if adapter.merged_domain is None else adapter.merged_domain}")
        return kwargs


register_method(MethodInfo(
    "sds-lora", SdsLoraConfig, category="moe", kind="delta-weight", mergeable=True, hf_peft_compatible=False,
    default_lr=2e-3, rank_field="r", alpha_field="lora_alpha", dropout_field="lora_dropout",
    description="a shared LoRA in W's top-k left singular subspace (trained on every row) plus one LoRA per domain "
                "in its orthogonal complement (trained on its domain's rows, by task_ids); mergeable for one domain "
                "(Takama et al. 2025)"))
