"""SMILE (Tang et al. 2024, "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From Pre-Trained
Foundation Models"): a sparse mixture built with no training from K adapters (LoRA) or fine-tuned models of one
base, e.g. one per task. Per target layer, with ΔW_i source i's update and ΔW_i = U_i Σ_i V_iᵀ its SVD:

  expert i     E_i(x) = U_i,k Σ_i,k V_i,kᵀ x                (its top k singular directions)
  gate         r_i(x) = ‖V_i,gᵀ x‖₂                         (x's energy in its top g = gate_k input directions)
  routing      p = softmax(r); keep the top_k, renormalise them to sum 1
  y = W x + b + Σ_{i ∈ top-k} p_i E_i(x)                    per token

(the reference, tanganke/fusion_bench's SmileMoELinear, computes the same). A LoRA source's ΔW = s B A is
decomposed through QR of B and Aᵀ (an r × r SVD), never as a d_out × d_in matrix; a fine-tuned model's ΔW = W_i − W
by a thin SVD. k defaults to the largest source rank (a LoRA source then is reproduced exactly when it alone is
routed). Extra parameters per layer: K·(g·d_in + k·(d_in + d_out)). Nothing needs training (`peftlab compose smile`
builds and saves it); like any adapter its tensors are trainable, for a user who fine-tunes the mixture further
(the gate's norm is differentiable). Not mergeable (per-token routing).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..core.adapter_files import source_name
from ..core.config import CONFIG_NAME, PeftConfig
from ..core.grouped import dense_lowrank
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.routing import RoutedAdapter, RoutedLayerTuner, RoutingContext, RoutingRecorder, topk_route
from ..core.targets import linear_features, pattern_value

PREFIX = "base_model.model."


@dataclass
class SmileConfig(PeftConfig):
    peft_type: str = "SMILE"
    # The sources, one expert each: LoRA adapter directories (adapter_dirs) and/or fine-tuned model directories
    # of the same base (model_dirs). Read when the adapter is created; the saved adapter holds the experts.
    adapter_dirs: Optional[list] = None
    model_dirs: Optional[list] = None
    k: Optional[int] = None           # expert rank; None: the largest rank of the LoRA sources (models: 32)
    gate_k: int = 4                   # g: right singular vectors per expert in its gate (reference: 1-16)
    top_k: int = 1                    # experts per token (reference default 1)
    num_experts: Optional[int] = None
    expert_names: Optional[list] = None
    target_modules: Optional[list] = None   # filled in: every linear layer some source changes

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("gate_k", "top_k"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"SmileConfig: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.k is not None and self.k <= 0:
            raise ValueError(f"SmileConfig: k must be a positive integer (or None: the sources' largest rank)")
        sources = list(self.adapter_dirs or []) + list(self.model_dirs or [])
        if sources:
            self.num_experts = len(sources)
        if self.num_experts is not None and self.top_k > self.num_experts:
            raise ValueError(f"SmileConfig: top_k={self.top_k} exceeds the {self.num_experts} experts")


MODEL_DEFAULT_K = 32


def lora_deltas(directory) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], int]:
    """{module: (B, A, scale)} of a LoRA adapter directory (HF PEFT's file) and its largest rank."""
    from ..core.adapter_files import adapter_dir, read_weights
    path = adapter_dir(directory)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        kind = "DoRA" if cfg.get("use_dora") else cfg.get("peft_type")
        raise ValueError(f"SMILE: {path} holds a {kind} adapter; SMILE builds its experts from LoRA adapters "
                         f"(additive ΔW = s·B A) or from fine-tuned models (model_dirs)")
    tensors = read_weights(path)
    out, top = {}, 0
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PREFIX):-len(".lora_A.weight")] if key.startswith(PREFIX) else key[:-len(".lora_A.weight")]
        b = tensors[key.replace(".lora_A.weight", ".lora_B.weight")]
        r = a.shape[0]
        alpha = pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
        scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
        out[module], top = (b.float(), a.float(), float(scale)), max(top, r)
    if not out:
        raise ValueError(f"SMILE: {path} has no LoRA factors of linear layers (lora_A/lora_B)")
    return out, top


def lowrank_svd(b: torch.Tensor, a: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V (thin, rank r) of s·B A via QR of B (d_out, r) and Aᵀ (d_in, r): s·B A = Q_B (s R_B R_Aᵀ) Q_Aᵀ."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.t())
    u, s, vh = torch.linalg.svd(scale * rb @ ra.t())
    return qb @ u, s, qa @ vh.t()


class SmileGate(RoutingRecorder):
    """r_i(x) = ‖V_i,gᵀ x‖₂ over the experts; softmax, top-k, renormalised (core/routing.topk_route)."""

    def __init__(self, experts: int, gate_k: int, d_in: int, context: RoutingContext):
        super().__init__(experts, context)
        self.weight = nn.Parameter(torch.zeros(experts * gate_k, d_in))   # V_i,gᵀ stacked
        self.experts, self.gate_k = experts, gate_k

    def forward(self, x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = (x @ self.weight.t()).view(-1, self.experts, self.gate_k).norm(dim=-1)      # (N, K)
        probs, weights, idx = topk_route(logits, top_k)
        self.record_topk(probs, idx)
        return weights, idx


class SmileLinear(RoutedAdapter):
    """K rank-k experts (A = Σ_k V_kᵀ: (K, k, d_in); B = U_kᵀ: (K, k, d_out)) and their SVD gate on one layer."""

    def __init__(self, d_in: int, d_out: int, cfg: SmileConfig, k: int, context: RoutingContext):
        super().__init__(context)
        e = cfg.num_experts
        self.lora_A = nn.Parameter(torch.zeros(e, k, d_in))
        self.lora_B = nn.Parameter(torch.zeros(e, k, d_out))
        self.gate = SmileGate(e, cfg.gate_k, d_in, context)   # independent of k, as in the reference
        self.top_k = cfg.top_k

    @torch.no_grad()
    def set_expert(self, e: int, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> None:
        """Expert e from ΔW = U diag(S) Vᵀ (columns by decreasing S; fewer than k columns leave zeros)."""
        k, g = min(self.lora_A.shape[1], s.shape[0]), self.gate.gate_k
        self.lora_A[e, :k] = (s[:k, None] * v[:, :k].t()).to(self.lora_A.dtype)
        self.lora_B[e, :k] = u[:, :k].t().to(self.lora_B.dtype)
        rows = v[:, :g].t()
        self.gate.weight[e * g: e * g + rows.shape[0]] = rows.to(self.gate.weight.dtype)

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
        weights, idx = self.gate(h, self.top_k)
        into = result.reshape(-1, result.shape[-1])
        return dense_lowrank(h, weights, idx, self.lora_A, self.lora_B, 1.0, into, self.gate.experts
                             ).reshape(result.shape)


@register_tuner("SMILE", SmileConfig)
class SmileTuner(RoutedLayerTuner):
    def inject(self, model, config: SmileConfig, adapter_name):
        self._context = RoutingContext()
        self._pending: dict[str, list] = {}
        sources = [("adapter", d) for d in config.adapter_dirs or []] + [("model", d) for d in config.model_dirs or []]
        if not sources and config.expert_names is None:
            raise ValueError("SMILE needs its sources: adapter_dirs (LoRA adapters of this base, one per task) and/or "
                             "model_dirs (fine-tuned models of it); e.g. `peftlab compose smile --model M "
                             "--adapters runs/a,runs/b,runs/c --output DIR`")
        if sources:
            self._decompose(model, config, sources)
        super().inject(model, config, adapter_name)
        if sources:
            config.adapter_dirs = config.model_dirs = None   # the experts now live in this adapter's own file
            config.expert_names = config.expert_names or [source_name(d) for _, d in sources]

    def _decompose(self, model, config: SmileConfig, sources) -> None:
        """Every source's (U, S, V) per module, into self._pending; fixes k and target_modules in the config."""
        per_source, ranks = [], []
        for kind, directory in sources:
            if kind == "adapter":
                factors, r = lora_deltas(directory)
                per_source.append({m: lowrank_svd(*f) for m, f in factors.items()})
                ranks.append(r)
            else:
                per_source.append(model_deltas(model, directory))
        config.k = config.k or (max(ranks) if ranks else MODEL_DEFAULT_K)
        modules = sorted(set().union(*per_source))
        for m in modules:
            self._pending[m] = [src.get(m) for src in per_source]
        config.target_modules = modules

    def create_adapter(self, base_layer, config: SmileConfig, module_name: str, adapter_name: str):
        d_in, d_out, _ = linear_features("SMILE", base_layer, module_name)
        adapter = SmileLinear(d_in, d_out, config, config.k, self._context).to(base_layer.weight.device)
        for e, usv in enumerate(self._pending.pop(module_name, None) or []):
            if usv is not None:   # a source that leaves this layer unchanged: a zero expert with a zero gate
                adapter.set_expert(e, *usv)
        return adapter


def model_deltas(model, directory) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(U, S, V) of W_i − W for every linear weight of the fine-tuned model in `directory` that differs from the
    base's (thin SVD)."""
    from safetensors.torch import load_file
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"SMILE: {directory} has no *.safetensors (a fine-tuned Transformers model "
                                f"directory, saved with save_pretrained)")
    tuned = {}
    for f in files:
        tuned.update(load_file(str(f)))
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or f"{name}.weight" not in tuned:
            continue
        delta = tuned[f"{name}.weight"].float() - module.weight.detach().float()
        if delta.shape != module.weight.shape:
            raise ValueError(f"SMILE: {directory}: {name}.weight has shape {tuple(delta.shape)}, the base's "
                             f"{tuple(module.weight.shape)}; the fine-tuned model must share the base's architecture")
        if delta.abs().max() > 0:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            out[name] = (u, s, vh.t())
    if not out:
        raise ValueError(f"SMILE: {directory} changes no linear weight of this base")
    return out


register_method(MethodInfo(
    "smile", SmileConfig, category="moe", kind="activation", mergeable=False, identity_at_init=False,
    trains_on="lora",
    description="a training-free sparse mixture of low-rank experts from several LoRA adapters or fine-tuned "
                "models: SVD experts, gates from their top right singular vectors, top-k routing (Tang et al. 2024)"))
