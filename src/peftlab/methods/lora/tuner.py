"""LoraTuner: puts LoRA / rsLoRA / DoRA / PiSSA / CorDA layers into a model (peft_type "LORA"), and registers the
method names that are options of one LoraConfig."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ...core.layer import Adapter
from ...core.registry import MethodInfo, register_method, register_tuner
from ...core.tuner import LayerTuner
from .combine import add_weighted_lora
from .config import LORA_FLAG_FIELDS, LoraConfig
from .corda import corda_init
from .dora import DoraLinear
from .layers import LoraEmbedding, LoraLinear, rank_and_scale
from .loftq import init_loftq
from .olora import init_olora
from .params import add_parameter_adapters, targets_modules
from .pissa import init_pissa
from .replication import replicate_layers
from .trainable_tokens import add_trainable_tokens


@register_tuner("LORA", LoraConfig)
class LoraTuner(LayerTuner):
    supports_weighted_combination = True
    converts_to_plain = True

    def inject(self, model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
        if config.layer_replication:
            replicate_layers(model, config.layer_replication)
        if targets_modules(model, config):
            super().inject(model, config, adapter_name)
        if config.target_parameters:
            add_parameter_adapters(model, config, adapter_name, rank_and_scale)
        if config.trainable_token_indices:
            add_trainable_tokens(model, config, adapter_name)
        if config.layer_replication:
            for _, layer in self._layers_with(model, adapter_name):  # HF PEFT refuses the merge as well
                layer.adapters[adapter_name].merge_refused = (
                    "its model's layers are replicated (layer_replication), so its base weights are shared with "
                    "other layers; merging would change them too. Keep it unmerged")

    def init_writes_base(self, config: LoraConfig) -> bool:
        init = config.init_lora_weights
        # LoftQ writes the base too, but must see a quantised one to refuse it: it needs the full-precision weights
        return isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda"))

    def create_adapter(self, base_layer, config: LoraConfig, module_name: str, adapter_name: str) -> Adapter:
        r, scale = rank_and_scale(config, module_name)
        init = config.init_lora_weights
        if isinstance(base_layer, nn.Embedding):
            if config.use_dora:
                raise ValueError(f"{module_name}: DoRA on embeddings is not supported by peftlab; exclude it "
                                 f"(exclude_modules) or use plain LoRA there")
            if config.lora_bias:
                raise ValueError(f"{module_name}: lora_bias=True is not supported on embeddings (nor in HF PEFT); "
                                 f"exclude it (exclude_modules) or pass lora_bias=False")
            return LoraEmbedding(base_layer.num_embeddings, base_layer.embedding_dim, r, scale, init)
        weight = getattr(base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"LoRA cannot adapt {module_name} ({type(base_layer).__name__}); it supports "
                             f"nn.Linear, transformers' Conv1D and nn.Embedding")
        if type(base_layer).__name__ == "Conv1D" and not config.fan_in_fan_out:
            config.fan_in_fan_out = True  # Conv1D stores W as (d_in, d_out); HF PEFT records the same fix-up
        if isinstance(base_layer, nn.Linear):  # its declared sizes: a quantised (bitsandbytes) weight is packed
            d_out, d_in = base_layer.out_features, base_layer.in_features
        else:
            d_out, d_in = weight.shape[::-1] if config.fan_in_fan_out else weight.shape
        layer_cls = DoraLinear if config.use_dora else LoraLinear
        extra = dict(lora_bias=True) if config.lora_bias else {}
        adapter = layer_cls(d_in=d_in, d_out=d_out, r=r, scale=scale, dropout=config.lora_dropout,
                            fan_in_fan_out=config.fan_in_fan_out, init=init, **extra).to(weight.device)
        if isinstance(init, str) and init.startswith("pissa"):
            init_pissa(adapter, base_layer, init)
        elif init == "olora":
            init_olora(adapter, base_layer, module_name)
        elif init == "loftq":
            init_loftq(adapter, base_layer, config.loftq_config, module_name)
        elif init == "corda":
            corda_init(adapter, base_layer, config, module_name)  # needs preprocess_corda's decomposition first
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
                             options) -> None:
        add_weighted_lora(self, peft_model, adapters, weights, adapter_name, options)


# 2e-3 at scale alpha/r = 1 trains SmolLM2-135M's demo task in tens of steps (2e-4, the usual choice for 7B
# models, barely moves it in 40 steps: EM 0% vs the demo's 56%); PiSSA starts from the principal components,
# whose scale is far larger than a zero-init B, so it keeps the small rate.
LORA_INFO = dict(config_cls=LoraConfig, category="reparameterized", kind="delta-weight", mergeable=True,
                 hf_peft_compatible=True, default_lr=2e-3, **LORA_FLAG_FIELDS)
register_method(MethodInfo("lora", **LORA_INFO, description="low-rank update s·BA on target layers (Hu et al. 2021)"))
register_method(MethodInfo("rslora", preset={"use_rslora": True}, **LORA_INFO,
                           description="LoRA with rank-stabilised scaling alpha/sqrt(r)"))
register_method(MethodInfo("pissa", preset={"init_lora_weights": "pissa"}, **{**LORA_INFO, "default_lr": 2e-4},
                           description="LoRA initialised from the top-r singular triplets of W; residual frozen"))
register_method(MethodInfo("dora", preset={"use_dora": True}, **LORA_INFO,
                           description="weight-decomposed LoRA: learned row magnitudes over a LoRA-updated direction"))
