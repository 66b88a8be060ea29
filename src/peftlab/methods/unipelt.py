"""UniPELT (Mao et al. 2022): LoRA + prefix tuning + a bottleneck adapter, each behind a learned sigmoid gate
estimated from the input of the module it modifies.

  LoRA on q/v:      y = W x + g_L · s·B A x,                 g_L = σ(w_L·x + b_L)
  adapter after FFN: h ← h + g_A · up(act(down(h))),          g_A = σ(w_A·h + b_A)
  prefix:           the prefix's attention weights × g_P,     g_P = σ(w_P·x + b_P), x the attention input,
                    i.e. log g_P added to the prefix's attention logits (g_P → 0 removes the prefix entirely)
Deliberate differences from the reference code (which targets encoders): every gate is per token instead of
the mean over the sequence, so a causal LM's token t never sees tokens after t and generate() with a KV cache
computes exactly what a full forward does; and the prefix gate scales the prefix's share of attention rather
than multiplying P_K and P_V. LoRA keeps lora_alpha/r (default alpha = r: the gate is the whole scale, as in
the reference). Pieces reused: LoraLinear (lora/layers.py), the gated Bottleneck (adapters.py), prefix.py's
encoder; the config composes prefix.py's PrefixFields and adapters.py's BottleneckFields with LoRA's fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.layer import Adapter
from ..core.prompt import SAVED_KEY, encoders
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.targets import resolve_targets
from ..hf.modules import block_modules, layout_of
from .adapters import BottleneckConfig, BottleneckFields, adapted, as_bottleneck_config, inject_bottlenecks
from .lora.layers import LoraLinear, lora_scale
from .mam import PrefixAndLayersTuner
from .prefix import PrefixFields


# Bases in MamConfig's order, for the same reason.
@dataclass
class UniPeltConfig(BottleneckFields, PrefixFields):
    peft_type: str = "UNIPELT"
    # gated LoRA (default targets as LoRA's: q_proj/v_proj, query/value)
    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    # gated prefix and gated adapter: UniPELT's defaults; every other field keeps its part's default
    num_virtual_tokens: int = 10
    prefix_projection: bool = True
    encoder_hidden_size: Optional[int] = 512
    bottleneck_size: int = 48

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")

    def adapter_config(self) -> BottleneckConfig:
        # target_modules is LoRA's: the adapter sits after every FFN whatever LoRA targets
        return as_bottleneck_config(self, adapter_type="sequential", placement="ffn")


def _gate(d: int) -> nn.Linear:
    # BERT-style init (normal 0.02, zero bias): every gate starts near σ(0) = 0.5, as in the reference.
    g = nn.Linear(d, 1)
    nn.init.normal_(g.weight, std=0.02)
    nn.init.zeros_(g.bias)
    return g


class GatedLora(Adapter):
    """result + σ(gate(x)) · s·B A x, with lora.py's LoraLinear computing s·B A x."""

    def merge_into(self, base_layer: nn.Module) -> None:
        raise TypeError("a gated LoRA's update g(x)·s·BA depends on the input through its gate, so it cannot be "
                        "merged into the base weight; keep UniPELT unmerged")

    def __init__(self, lora: LoraLinear, d_in: int):
        super().__init__()
        self.lora = lora
        self.lora_gate = _gate(d_in)

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        delta = self.lora(x, base_layer, result.new_zeros(()))                  # 0 + s·B A x, (..., d_out)
        g = torch.sigmoid(self.lora_gate(x.to(self.lora_gate.weight.dtype)))     # (..., 1)
        return result + (g * delta).to(result.dtype)


class PrefixGate:
    """Forward pre-hook on one attention module: adds log σ(gate(x)) to the attention mask over the prefix
    columns (the first n key positions), per query token. Active only when the cache carries this adapter's
    prefix. A plain object (not a closure), so deep-copying the model copies it along with its gate."""

    def __init__(self, box: nn.ModuleDict, adapter_name: str, layer: int):
        self.box, self.adapter_name, self.layer = box, adapter_name, layer

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        cache = kwargs.get("past_key_values")
        if getattr(cache, "peftlab_prefix_owner", None) != self.adapter_name:
            return None
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]        # (b, q, d)
        b, q = h.shape[:2]
        n, past = cache.peftlab_prefix_len, cache.get_seq_length(module.layer_idx)
        gate = self.box[self.adapter_name].prefix_gates[self.layer]
        log_g = F.logsigmoid(gate(h.to(gate.weight.dtype))).to(h.dtype)             # (b, q, 1)
        mask, low = kwargs.get("attention_mask"), torch.finfo(h.dtype).min
        if mask is None:  # no padding: plain causal (decoders) or full (encoders) attention
            kv = past + q
            allowed = torch.ones(q, kv, dtype=torch.bool, device=h.device)
            if getattr(module, "is_causal", False):
                allowed = torch.arange(kv, device=h.device)[None] <= past + torch.arange(q, device=h.device)[:, None]
            mask = allowed[None, None]
        if mask.dim() != 4:
            raise ValueError(f"UniPELT's prefix gate needs a 4-D attention mask (eager or sdpa attention), got "
                             f"shape {tuple(mask.shape)}")
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill(~mask, low)
        mask = mask.to(h.dtype).expand(b, 1, q, mask.shape[-1])                      # (b, 1, q, kv)
        gated = mask[..., :n] + log_g.transpose(1, 2).unsqueeze(-1)                 # (b, 1, q, n)
        return args, {**kwargs, "attention_mask": torch.cat([gated, mask[..., n:]], dim=-1)}


@register_tuner("UNIPELT", UniPeltConfig)
class UniPeltTuner(PrefixAndLayersTuner):
    def inject_layers(self, model, config, adapter_name):
        for name in resolve_targets(model, config):                   # gated LoRA
            layer = adapted(model, name)
            base = layer.base_layer
            if not isinstance(base, nn.Linear):
                raise ValueError(f"UniPELT's LoRA supports nn.Linear targets; {name} is {type(base).__name__}")
            lora = LoraLinear(base.in_features, base.out_features, config.r,
                              lora_scale(config.lora_alpha, config.r, False), config.lora_dropout)
            layer.add(adapter_name, GatedLora(lora, base.in_features).to(base.weight.device))
        inject_bottlenecks(model, config.adapter_config(), adapter_name, gate=True)  # gated adapter after each FFN
        box, d = encoders(model), model.config.hidden_size            # gated prefix: one gate per layer
        attn = block_modules(model, layout_of(model).attn)
        box[adapter_name].prefix_gates = nn.ModuleList(_gate(d) for _ in attn).to(model.device)
        for i, name in enumerate(attn):
            model.get_submodule(name).register_forward_pre_hook(PrefixGate(box, adapter_name, i), with_kwargs=True)

    def prefix_keys(self, key):
        return key == SAVED_KEY or key.startswith("prefix_gates.")

    def export_state(self, model, adapter_name, config):
        gates = encoders(model)[adapter_name].prefix_gates.state_dict()
        return {**super().export_state(model, adapter_name, config),
                **{f"prefix_gates.{k}": v for k, v in gates.items()}}

    def import_prefix(self, model, adapter_name, config, tensors):
        gates = {k[len("prefix_gates."):]: v for k, v in tensors.items() if k.startswith("prefix_gates.")}
        self.prefix.import_state(model, adapter_name, config, {SAVED_KEY: tensors[SAVED_KEY]} if SAVED_KEY in tensors
                                 else {})
        encoders(model)[adapter_name].prefix_gates.load_state_dict(gates)

    def prepare_inputs(self, model, adapter_name, config, kwargs, generate):
        kwargs = super().prepare_inputs(model, adapter_name, config, kwargs, generate)
        cache = kwargs.get("past_key_values")
        if getattr(cache, "peftlab_prefix_len", None) is not None and not hasattr(cache, "peftlab_prefix_owner"):
            cache.peftlab_prefix_owner = adapter_name  # switches this adapter's PrefixGate hooks on
        return kwargs

    def _drop_hooks(self, model, adapter_name: Optional[str] = None) -> None:
        for module in model.modules():
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, PrefixGate) and adapter_name in (None, hook.adapter_name):
                    del module._forward_pre_hooks[key]
                    module._forward_pre_hooks_with_kwargs.pop(key, None)

    def remove(self, model, adapter_name):
        self._drop_hooks(model, adapter_name)
        super().remove(model, adapter_name)

    def unload(self, model):
        self._drop_hooks(model)
        super().unload(model)


register_method(MethodInfo("unipelt", UniPeltConfig, category="hybrid", kind="input", mergeable=False,
                           hf_peft_compatible=False, identity_at_init=False,
                           default_lr=1e-3, rank_field="r", alpha_field="lora_alpha", dropout_field="lora_dropout",
                           description="LoRA + prefix + adapter, each behind a learned sigmoid gate (Mao et al. 2022)"))
