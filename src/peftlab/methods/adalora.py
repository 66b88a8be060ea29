"""AdaLoRA: ΔW = P Λ Q in SVD form, with a rank budget reallocated during training by importance (Zhang et al. 2023).

Per layer `lora_B` = P (d_out×r), `lora_E` = Λ (r×1), `lora_A` = Q (r×d_in); y = W x + s·B((A⊙E) x)/(r_init+1e-5),
s = lora_alpha. HF PEFT's AdaLoraConfig and file layout (keys lora_A / lora_B / lora_E, no ".weight"; `ranknum`
is not saved; `rank_pattern` in the config, tensors pruned to it on save). Training needs two hooks, both reached
through the Tuner interface so the core knows nothing about AdaLoRA: the orthogonality regulariser (`aux_loss`)
and the budget update (`on_step_end`, also callable as HF PEFT's `model.base_model.update_and_allocate(step)`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.layer import Adapter
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.targets import linear_features
from ..core.tuner import LayerTuner, adapted_layers
from ..hf.defaults import LORA_TARGETS
from .lora.config import LoraConfig

# HF PEFT's AdaLoRA defaults differ from LoRA's for a few encoder-decoder and encoder models.
ADALORA_TARGETS = {**LORA_TARGETS, "t5": ["q", "k", "v", "o", "wi", "wo"],
                   "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
                   "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                   "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                   "roberta": ["query", "key", "value", "dense"],
                   "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"]}


@dataclass
class AdaLoraConfig(LoraConfig):
    peft_type: str = "ADALORA"
    target_r: int = 8            # average rank per layer at the end of the budget schedule
    init_r: int = 12             # rank each layer starts with
    tinit: int = 0               # warm-up steps at the full budget
    tfinal: int = 0              # final steps at the target budget, masks frozen
    deltaT: int = 1              # steps between two reallocations
    beta1: float = 0.85          # EMA of the sensitivity |w·∇w|
    beta2: float = 0.85          # EMA of its uncertainty
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None  # "<module>.lora_E" -> [kept?] per triplet, written by the allocator

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ValueError("AdaLoRA does not support DoRA (use_dora=True); use method 'dora' instead")
        if self.r != 8:  # LoraConfig's default
            warnings.warn("AdaLoraConfig ignores `r`; the starting rank is `init_r`", stacklevel=2)
        if self.total_step is None or self.total_step <= 0:
            raise ValueError("AdaLoRA needs total_step (the number of training steps, > 0) to schedule its rank "
                             "budget, e.g. AdaLoraConfig(total_step=1000)")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit}, tfinal={self.tfinal} leave no budgeting phase in "
                             f"total_step={self.total_step}; need tinit < total_step - tfinal")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform as well")
        if self.alpha_pattern:
            raise ValueError("AdaLoRA uses one lora_alpha for all layers; alpha_pattern is not supported")
        if isinstance(self.init_lora_weights, str):
            raise ValueError(f"AdaLoRA supports init_lora_weights True/False only, got {self.init_lora_weights!r}")


def budget_schedule(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int,
                    delta_t: int) -> tuple[int, bool]:
    """(budget, reallocate now?): b_0 while t ≤ t_init, b_T after T − t_final, cubic decay in between."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    frac = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * frac ** 3 + target_bgt), step % delta_t == 0


class SvdLinear(Adapter):
    """One AdaLoRA triplet set on a Linear / Conv1D, plus the importance EMAs the allocator keeps for it."""
    mergeable = True
    saved_names = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"}
    FACTORS = ("lora_A", "lora_B", "lora_E")

    def __init__(self, d_in: int, d_out: int, r: int, lora_alpha: float, ranknum: float, dropout: float = 0.0,
                 fan_in_fan_out: bool = False, init: bool = True):
        super().__init__()
        self.r, self.ranknum, self.fan_in_fan_out = r, float(ranknum), fan_in_fan_out
        self.scaling = lora_alpha if lora_alpha > 0 else float(r)
        self.lora_A = nn.Parameter(torch.randn(r, d_in))   # Q: right singular vectors
        self.lora_E = nn.Parameter(torch.randn(r, 1))      # Λ: singular values
        self.lora_B = nn.Parameter(torch.randn(d_out, r))  # P: left singular vectors
        if init:  # E = 0 keeps the model unchanged at step 0
            with torch.no_grad():
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Sensitivity EMA Ī and uncertainty EMA Ū per entry of each factor; training state, never saved.
        for name in self.FACTORS:
            p = getattr(self, name)
            self.register_buffer(f"ipt_{name}", torch.zeros_like(p), persistent=False)
            self.register_buffer(f"unc_{name}", torch.zeros_like(p), persistent=False)

    def _factor(self) -> float:
        return self.scaling / (self.ranknum + 1e-5)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        delta = (self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float())) * self._factor()
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x.to(self.lora_A.dtype))
        update = F.linear(F.linear(h, self.lora_A * self.lora_E), self.lora_B)  # (N, r) then (N, d_out)
        return result + (update * self._factor()).to(result.dtype)

    # -- the allocator's per-layer work ------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float, where: str) -> None:
        for name in self.FACTORS:
            p = getattr(self, name)
            if p.grad is None:
                raise RuntimeError(f"AdaLoRA: {where}.{name} has no gradient; call update_and_allocate(step) / "
                                   f"on_step_end(step) after loss.backward() and before optimizer.zero_grad()")
            ipt = (p * p.grad).abs()
            avg, unc = getattr(self, f"ipt_{name}"), getattr(self, f"unc_{name}")
            avg.copy_(beta1 * avg + (1 - beta1) * ipt)
            unc.copy_(beta2 * unc + (1 - beta2) * (ipt - avg).abs())

    def reset_importance(self) -> None:
        for name in self.FACTORS:
            getattr(self, f"ipt_{name}").zero_(), getattr(self, f"unc_{name}").zero_()

    def triplet_scores(self) -> torch.Tensor:
        """S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji), s = Ī·Ū; shape (r,)."""
        s = {n: getattr(self, f"ipt_{n}") * getattr(self, f"unc_{n}") for n in self.FACTORS}
        return s["lora_E"].view(-1) + (s["lora_A"].mean(1) + s["lora_B"].mean(0))

    def resized(self, keep: torch.Tensor) -> "SvdLinear":
        """A copy holding only the kept triplets (as HF PEFT loads a pruned adapter); ranknum stays r_init."""
        d_out, d_in = self.lora_B.shape[0], self.lora_A.shape[1]
        new = SvdLinear(d_in, d_out, int(keep.sum()), self.scaling, self.ranknum, fan_in_fan_out=self.fan_in_fan_out)
        new.scaling, new.dropout = self.scaling, self.dropout
        with torch.no_grad():
            for name in self.FACTORS:
                old = getattr(self, name)
                getattr(new, name).copy_(old[:, keep] if name == "lora_B" else old[keep])
                getattr(new, name).requires_grad_(old.requires_grad)
        return new.to(self.lora_A.device)


def _svd_layers(model: nn.Module, adapter_name: str):
    for name, layer in adapted_layers(model):
        adapter = layer.adapters[adapter_name] if adapter_name in layer.adapters else None
        if isinstance(adapter, SvdLinear):
            yield name, layer, adapter


class _UpdateAndAllocate:
    """`model.base_model.update_and_allocate(step)`: HF PEFT's AdaLoRA entry point, bound to the trainable
    adapter. A plain callable stored on the Transformers model, so the core's attribute forwarding finds it."""

    def __init__(self, model: nn.Module, adapter_name: str, config: AdaLoraConfig):
        self.model, self.adapter_name, self.config = model, adapter_name, config

    def __call__(self, global_step: int) -> None:
        AdaLoraTuner.update_and_allocate(self.model, self.adapter_name, self.config, global_step)


@register_tuner("ADALORA", AdaLoraConfig)
class AdaLoraTuner(LayerTuner):
    default_targets_table = ADALORA_TARGETS

    def create_adapter(self, base_layer, config: AdaLoraConfig, module_name: str, adapter_name: str) -> Adapter:
        d_in, d_out, conv1d = linear_features("AdaLoRA", base_layer, module_name)
        fan_in_fan_out = conv1d  # PEFT forces it to match the layer type (with a warning)
        return SvdLinear(d_in, d_out, config.init_r, config.lora_alpha, config.init_r, config.lora_dropout,
                         fan_in_fan_out, init=bool(config.init_lora_weights))

    def inject(self, model, config: AdaLoraConfig, adapter_name: str) -> None:
        owner = model.__dict__.get("update_and_allocate")
        trainable_owner = isinstance(owner, _UpdateAndAllocate) and not owner.config.inference_mode
        if not config.inference_mode and trainable_owner:
            raise ValueError(f"AdaLoRA trains one adapter at a time and {owner.adapter_name!r} is trainable; add "
                             f"{adapter_name!r} with inference_mode=True or delete the other adapter first")
        super().inject(model, config, adapter_name)
        if not trainable_owner:  # an inference-only entry point answers calls with a clear error
            model.update_and_allocate = _UpdateAndAllocate(model, adapter_name, config)

    def _drop_entry_point(self, model, adapter_name: Optional[str] = None) -> None:
        owner = model.__dict__.get("update_and_allocate")
        if isinstance(owner, _UpdateAndAllocate) and adapter_name in (None, owner.adapter_name):
            del model.__dict__["update_and_allocate"]

    def remove(self, model, adapter_name):
        super().remove(model, adapter_name)
        self._drop_entry_point(model, adapter_name)

    def unload(self, model):
        super().unload(model)
        self._drop_entry_point(model)

    # -- saving: tensors pruned to rank_pattern, as HF PEFT writes them ----------------------------------
    def export_state(self, model, adapter_name, config):
        out = super().export_state(model, adapter_name, config)
        for key, mask in (config.rank_pattern or {}).items():
            module = key[: -len(".lora_E")]
            keep = torch.tensor(mask, dtype=torch.bool)
            if f"{module}.lora_A" in out and int(keep.sum()) != out[f"{module}.lora_A"].shape[0]:
                out[f"{module}.lora_A"] = out[f"{module}.lora_A"][keep]
                out[f"{module}.lora_E"] = out[f"{module}.lora_E"][keep]
                out[f"{module}.lora_B"] = out[f"{module}.lora_B"][:, keep]
        return out

    def import_state(self, model, adapter_name, config, tensors):
        for key, mask in (config.rank_pattern or {}).items():
            layer_name = key[: -len(".lora_E")]
            layer = model.get_submodule(layer_name)
            adapter = layer.adapters[adapter_name]
            keep = torch.tensor(mask, dtype=torch.bool)
            if keep.numel() != adapter.r:
                raise ValueError(f"rank_pattern for {layer_name} has {keep.numel()} entries, but the layer has "
                                 f"init_r={adapter.r} triplets")
            layer.adapters[adapter_name] = adapter.resized(keep)
        super().import_state(model, adapter_name, config, tensors)

    # -- training hooks ------------------------------------------------------------------------------------
    def aux_loss(self, model, adapter_name, config: AdaLoraConfig):
        """orth_reg_weight · mean over factors of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F (keeps P, Q near-orthogonal)."""
        if config.inference_mode or config.orth_reg_weight == 0:
            return None
        terms = []
        for _, _, a in _svd_layers(model, adapter_name):
            for cov in (a.lora_A @ a.lora_A.t(), a.lora_B.t() @ a.lora_B):  # both (r, r)
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device,
                                                                      dtype=cov.dtype)))
        return config.orth_reg_weight * torch.stack(terms).mean() if terms else None

    def on_step_end(self, model, adapter_name, config, step):
        self.update_and_allocate(model, adapter_name, config, step)

    @staticmethod
    def update_and_allocate(model: nn.Module, adapter_name: str, config: AdaLoraConfig, step: int) -> None:
        """Update importance EMAs and mask Λ to the scheduled budget; call after backward, before zero_grad."""
        if config.inference_mode:
            raise RuntimeError(f"AdaLoRA adapter {adapter_name!r} was loaded for inference; load it with "
                               f"is_trainable=True to keep training it")
        layers = list(_svd_layers(model, adapter_name))
        end = config.total_step - config.tfinal
        if step < end:
            for name, _, a in layers:
                a.update_importance(config.beta1, config.beta2, name)
        if step <= end:
            init_bgt, target_bgt = config.init_r * len(layers), config.target_r * len(layers)
            budget, now = budget_schedule(step, init_bgt, target_bgt, config.tinit, config.tfinal,
                                          config.total_step, config.deltaT)
            if now or step == end:
                config.rank_pattern = _mask_to_budget(layers, init_bgt - budget)
            if step == end:
                for _, _, a in layers:
                    a.reset_importance()
        else:  # final phase: keep the masks fixed (Λ entries the optimizer revived are zeroed again)
            if config.rank_pattern is None:
                raise RuntimeError(f"AdaLoRA reached step {step} > total_step - tfinal without a rank pattern; "
                                   f"call update_and_allocate on every step, including step {end}")
            with torch.no_grad():
                for name, _, a in layers:
                    keep = torch.tensor(config.rank_pattern[f"{name}.lora_E"], device=a.lora_E.device)
                    a.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)


@torch.no_grad()
def _mask_to_budget(layers, n_prune: int) -> dict:
    """Zero the λ of the n_prune lowest-scoring triplets (score ≤ the n_prune-th smallest) across all layers."""
    scores = {name: a.triplet_scores() for name, _, a in layers}
    all_scores = torch.cat(list(scores.values()))
    n_prune = min(n_prune, all_scores.numel())
    threshold = torch.kthvalue(all_scores, n_prune).values.item() if n_prune > 0 else None
    pattern = {}
    for name, _, a in layers:
        keep = torch.ones_like(scores[name], dtype=torch.bool) if threshold is None else scores[name] > threshold
        a.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
        pattern[f"{name}.lora_E"] = keep.tolist()
    return pattern


register_method(MethodInfo(
    "adalora", AdaLoraConfig, category="reparameterized", kind="delta-weight", mergeable=True,
    hf_peft_compatible=True,
    default_lr=1e-2, rank_field="init_r", alpha_field="lora_alpha", dropout_field="lora_dropout",
    run_length_field="total_step",
    description="SVD-form LoRA whose rank budget is reallocated by importance during training (Zhang et al. 2023)"))
