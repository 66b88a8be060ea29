"""LoRA (and rsLoRA, PiSSA/gaussian inits): y = W x + s · B A dropout(x), on Linear, Conv1D and Embedding.

HF PEFT's LoraConfig fields and file layout (lora_A.weight r×d_in, lora_B.weight d_out×r, embeddings as
lora_embedding_A r×num / lora_embedding_B dim×r). DoRA lives in dora.py and plugs in through `use_dora`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import PeftConfig
from ..core.functional import fused_ok, lora_linear, peft_order
from ..core.layer import Adapter
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.targets import linear_features, pattern_value
from ..core.tuner import LayerTuner


@dataclass
class LoraConfig(PeftConfig):
    peft_type: str = "LORA"
    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    # Fields HF PEFT writes that peftlab keeps for file compatibility; non-default values are refused below.
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    trainable_token_indices: Optional[Union[list[int], dict]] = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: Optional[dict] = None
    corda_config: Optional[dict] = None
    lora_ga_config: Optional[dict] = None
    velora_config: Optional[dict] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Optional[dict] = None
    layer_replication: Optional[list] = None
    target_parameters: Optional[list[str]] = None
    use_bdlora: Optional[dict] = None
    arrow_config: Optional[dict] = None
    kasa_config: Optional[dict] = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in ("gaussian", "pissa", "corda")
                or (isinstance(init, str) and init.startswith("pissa_niter_") and init[12:].isdigit())):
            raise ValueError(f"init_lora_weights={init!r} is not supported; use True, False, 'gaussian', 'pissa', "
                             f"'pissa_niter_N' or 'corda'")
        unsupported = {"lora_bias": self.lora_bias, "use_qalora": self.use_qalora,
                       "layer_replication": self.layer_replication, "target_parameters": self.target_parameters,
                       "megatron_config": self.megatron_config, "loftq_config": self.loftq_config,
                       "eva_config": self.eva_config, "trainable_token_indices": self.trainable_token_indices,
                       "alora_invocation_tokens": self.alora_invocation_tokens, "use_bdlora": self.use_bdlora,
                       "arrow_config": self.arrow_config, "kasa_config": self.kasa_config,
                       "monteclora_config": self.monteclora_config, "velora_config": self.velora_config,
                       "lora_ga_config": self.lora_ga_config}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"LoraConfig: peftlab does not implement {', '.join(bad)}; leave them at their "
                             f"defaults (HF PEFT-only features)")


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _kaiming(t: torch.Tensor) -> torch.Tensor:
    # nn.Linear's default init; LoRA's A uses it (Microsoft loralib, HF PEFT).
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoraLinear(Adapter):
    """LoRA on a Linear (or GPT-2 Conv1D, whose weight is stored d_in×d_out: `fan_in_fan_out`)."""
    mergeable = True
    fuses_base = True
    saved_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, d_in: int, d_out: int, r: int, scale: float, dropout: float = 0.0,
                 fan_in_fan_out: bool = False, init: Union[bool, str] = True):
        super().__init__()
        self.r, self.scale, self.fan_in_fan_out = r, scale, fan_in_fan_out
        self.lora_A = nn.Parameter(torch.empty(r, d_in))
        self.lora_B = nn.Parameter(torch.empty(d_out, r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            if init is False:
                _kaiming(self.lora_A), _kaiming(self.lora_B)  # both random: a non-zero delta from the start
            else:
                if init == "gaussian":
                    nn.init.normal_(self.lora_A, std=1 / r)
                else:
                    _kaiming(self.lora_A)
                nn.init.zeros_(self.lora_B)

    def base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The base weight as (d_out, d_in), whatever its storage layout."""
        w = base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale  # (d_out, r) @ (r, d_in)
        return delta.t() if self.fan_in_fan_out else delta

    def _dropout_active(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def lowrank_factors(self, base_layer: nn.Module):
        """(A, B, s, None): the output is base(x) + s·B A x; used by mixed-adapter batches (core/mixed.py)."""
        return None if self._dropout_active() else (self.lora_A, self.lora_B, self.scale, None)

    def _takes_fused_kernel(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        """Whether this layer runs core.functional's fused kernels (alone or in a sibling group) for x."""
        return (self.training or not peft_order()) and not self._dropout_active() and fused_ok(x, w, self.lora_A)

    # Subclasses that compute something else (LoRA-FA, LoRA-dropout) must not inherit the fused group kernel:
    # only a class that sets this itself joins sibling groups (core/siblings.py).
    joins_sibling_groups = True

    def group_operands(self, x: torch.Tensor, base_layer: nn.Module, probe: bool = False) -> Optional[tuple]:
        if type(self).__dict__.get("joins_sibling_groups") is not True:
            return None
        w = self.base_weight(base_layer)
        if w.requires_grad or not self._takes_fused_kernel(x, w):
            return None
        if not (x.requires_grad or any(p.requires_grad for p in self.parameters())
                or (base_layer.bias is not None and base_layer.bias.requires_grad)):
            return None  # nothing to differentiate: the inference kernel is faster
        return w, base_layer.bias, self.lora_A, self.lora_B, self.scale, None, None

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: Optional[torch.Tensor]) -> torch.Tensor:
        if result is None:
            w = self.base_weight(base_layer)
            # The fused kernels by default (training and inference); `peftlab.hf_peft_numerics()` outside
            # training sums in HF PEFT's order instead, for outputs bit-identical to a PEFT-loaded adapter.
            if self._takes_fused_kernel(x, w):
                return lora_linear(x, w, base_layer.bias, self.lora_A, self.lora_B, self.scale)
            result = base_layer(x)
        # The unfused path, with HF PEFT's numerics: x cast to the adapter dtype, the sum back to the output's.
        h = self.dropout(x.to(self.lora_A.dtype))
        return result + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale).to(result.dtype)

    def init_pissa(self, base_layer: nn.Module, mode: str) -> None:
        """PiSSA: A, B from the top-r singular triplets of W; W keeps only the residual (model unchanged)."""
        w = self.base_weight(base_layer)
        dtype = w.dtype
        w32 = w.detach().float()
        if mode == "pissa":
            u, s, vh = torch.linalg.svd(w32, full_matrices=False)
            u, s, vh = u[:, : self.r], s[: self.r], vh[: self.r]
        else:
            u, s, v = torch.svd_lowrank(w32, self.r, niter=int(mode.split("_niter_")[-1]))
            vh = v.t()
        s = s / self.scale
        with torch.no_grad():
            self.lora_A.copy_(torch.diag(s.sqrt()) @ vh)   # (r, d_in)
            self.lora_B.copy_(u @ torch.diag(s.sqrt()))    # (d_out, r)
            residual = (w32 - self.scale * self.lora_B @ self.lora_A).to(dtype)
            base_layer.weight.data = residual.t().contiguous() if self.fan_in_fan_out else residual


class LoraEmbedding(Adapter):
    """LoRA on an nn.Embedding: delta rows looked up from A (r×num) then projected by B (dim×r)."""
    mergeable = True
    saved_names = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}

    def __init__(self, num: int, dim: int, r: int, scale: float, init: Union[bool, str] = True):
        super().__init__()
        self.r, self.scale = r, scale
        self.lora_A = nn.Parameter(torch.randn(r, num))
        self.lora_B = nn.Parameter(torch.randn(dim, r))
        if init is not False:  # HF PEFT: A zeros, B normal, for every init mode of embeddings
            with torch.no_grad():
                self.lora_A.zero_()
                nn.init.normal_(self.lora_B)

    def delta_weight(self, base_layer: nn.Module) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()).t() * self.scale  # (num, dim)

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(x, self.lora_A.t(), padding_idx=base_layer.padding_idx, max_norm=base_layer.max_norm,
                           norm_type=base_layer.norm_type, scale_grad_by_freq=base_layer.scale_grad_by_freq,
                           sparse=base_layer.sparse)                 # (..., r)
        return result + (rows @ self.lora_B.t() * self.scale).to(result.dtype)


def linear_lora_kwargs(method: str, base_layer: nn.Module, config: LoraConfig, module_name: str) -> dict:
    """LoraLinear's constructor arguments for a Linear/Conv1D layer (rank/alpha patterns applied), for LoRA and
    the LoRA variants that subclass LoraLinear (LoRA-FA, LoRA-dropout)."""
    d_in, d_out, conv1d = linear_features(method, base_layer, module_name)
    r = pattern_value(config.rank_pattern, module_name, config.r)
    alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
    fan_in_fan_out = config.fan_in_fan_out or conv1d
    return dict(d_in=d_in, d_out=d_out, r=r, scale=lora_scale(alpha, r, config.use_rslora),
                dropout=config.lora_dropout, fan_in_fan_out=fan_in_fan_out, init=config.init_lora_weights)


@register_tuner("LORA", LoraConfig)
class LoraTuner(LayerTuner):
    def target_filter(self, module: nn.Module) -> bool:
        return super().target_filter(module)

    def create_adapter(self, base_layer, config: LoraConfig, module_name: str, adapter_name: str) -> Adapter:
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        scale = lora_scale(alpha, r, config.use_rslora)
        init = config.init_lora_weights
        if isinstance(base_layer, nn.Embedding):
            if config.use_dora:
                raise ValueError(f"{module_name}: DoRA on embeddings is not supported by peftlab; exclude it "
                                 f"(exclude_modules) or use plain LoRA there")
            return LoraEmbedding(base_layer.num_embeddings, base_layer.embedding_dim, r, scale, init)
        if not hasattr(base_layer, "weight") or base_layer.weight.dim() != 2 or isinstance(base_layer, nn.Embedding):
            raise ValueError(f"LoRA cannot adapt {module_name} ({type(base_layer).__name__}); it supports "
                             f"nn.Linear, transformers' Conv1D and nn.Embedding")
        conv1d = type(base_layer).__name__ == "Conv1D"
        if conv1d and not config.fan_in_fan_out:
            config.fan_in_fan_out = True  # Conv1D stores W as (d_in, d_out); HF PEFT records the same fix-up
        fan_in_fan_out = config.fan_in_fan_out
        d_out, d_in = base_layer.weight.shape[::-1] if fan_in_fan_out else base_layer.weight.shape
        kwargs = dict(d_in=d_in, d_out=d_out, r=r, scale=scale, dropout=config.lora_dropout,
                      fan_in_fan_out=fan_in_fan_out, init=init)
        if config.use_dora:
            from .dora import DoraLinear
            adapter = DoraLinear(**kwargs)
        else:
            adapter = LoraLinear(**kwargs)
        adapter.to(base_layer.weight.device)
        if isinstance(init, str) and init.startswith("pissa"):
            adapter.init_pissa(base_layer, init)
        elif init == "corda":
            from .corda import corda_init  # the decomposition comes from calibration data: see methods/corda.py
            corda_init(adapter, base_layer, config, module_name)
        if config.use_dora:
            adapter.init_magnitude(base_layer)
        return adapter

    def convert_to_plain(self, tensors: dict, config: LoraConfig, initial: dict):
        """PiSSA/CorDA → plain LoRA on the original base: ΔW = BA − B₀A₀ = [B, −B₀][A; A₀] (rank 2r)."""
        if config.use_dora:
            raise ValueError("converting a DoRA adapter to a plain LoRA is not possible (DoRA is not additive)")
        initial = {k if k.startswith("base_model.model.") else "base_model.model." + k: v for k, v in initial.items()}
        out = {}
        for key, t in tensors.items():
            if key not in initial:
                raise KeyError(f"the initial adapter lacks {key}; was it saved from this model before training?")
            if key.endswith("lora_A.weight"):
                out[key] = torch.cat([t, initial[key]], dim=0)
            elif key.endswith("lora_B.weight"):
                out[key] = torch.cat([t, -initial[key]], dim=1)
            else:
                out[key] = t
        factor = math.sqrt(2) if config.use_rslora else 2  # keeps s = alpha/r (or alpha/√r) unchanged at 2r
        new = config.replace(
            r=2 * config.r, lora_alpha=factor * config.lora_alpha, init_lora_weights=True,
            rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
            alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()})
        return out, new

    def add_weighted_adapter(self, peft_model, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None) -> None:
        from .lora_combine import add_weighted_lora
        add_weighted_lora(self, peft_model, adapters, weights, adapter_name, combination_type, svd_rank)


# 2e-3 at scale alpha/r = 1 trains SmolLM2-135M's demo task in tens of steps (2e-4, the usual choice for 7B
# models, barely moves it in 40 steps: EM 0% vs the demo's 56%); PiSSA starts from the principal components,
# whose scale is far larger than a zero-init B, so it keeps the small rate.
_LORA = dict(config_cls=LoraConfig, category="reparameterized", kind="delta-weight", mergeable=True,
             hf_peft_compatible=True, default_lr=2e-3)
register_method(MethodInfo("lora", **_LORA, description="low-rank update s·BA on target layers (Hu et al. 2021)"))
register_method(MethodInfo("rslora", preset={"use_rslora": True}, **_LORA,
                           description="LoRA with rank-stabilised scaling alpha/sqrt(r)"))
register_method(MethodInfo("pissa", preset={"init_lora_weights": "pissa"}, **{**_LORA, "default_lr": 2e-4},
                           description="LoRA initialised from the top-r singular triplets of W; residual frozen"))
