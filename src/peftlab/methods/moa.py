"""MoA (Cao et al. 2025): per block, a SwiGLU router with independent sigmoid weights over heterogeneous slots.

  h = the block's attention input (the input of q/k/v)            w = σ(W_2 (silu(W_1 h) ⊙ W_3 h)) ∈ (0, 1)^S
  slots: LoRA on each of `lora_modules` (q, k, v, o, down)        y_m = W_m x + w_m · s · B_m A_m x
         a parallel adapter beside the FFN                        FFN(z) + w_pa · up(silu(down(z)))
         a prompt expert (soft only)                              attn ← attn + w_p · g_head ⊙ softmax(q Pkᵀ/√d) Pv
  soft:   every slot on every token, weighted by w
  sparse: τ = max_threshold · σ(W_τ h) per token; a slot runs only on the tokens where w_slot ≥ τ, weighted by
          w_slot (the prompt expert is off: attention over a prompt cannot be restricted to some tokens)

The router and threshold sit in the block's `router_module` site (q_proj) and are computed once per forward
from the tensor the attention projections share. B, the adapter's up-projection and the prompt gates start at
0, so the model equals the base at step 0. Not mergeable (per-token weights).
Deviations from the reference (DCDmllm/MoA): the prompt expert's queries are q_proj's output before RoPE (peftlab
wraps layers, not attention internals); the adapter's up-projection starts at 0 (the reference: Xavier, gain
1e-4); in sparse mode the indicator 1[w ≥ τ] passes a straight-through gradient, σ((w − τ)/0.1)'s, so the
threshold is learnt (the reference's comparison passes none, leaving τ at its initialisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import PeftConfig
from ..core.layer import AdaptedLayer
from ..core.quantized import dense_weight
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.routing import RoutedAdapter, RoutedLayerTuner, RoutingContext, RoutingRecorder
from ..core.targets import linear_features
from ..core.tuner import set_submodule
from ..hf.modules import BERT_LIKE, LLAMA_LIKE, block_modules, layout_of

MODES = ("soft", "sparse")
STE_TEMPERATURE = 0.1


@dataclass
class MoaConfig(PeftConfig):
    peft_type: str = "MOA"
    mode: str = "soft"
    r: int = 8                                   # LoRA slots' rank (reference: 8, alpha = r)
    lora_alpha: float = 8.0
    lora_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    adapter_size: int = 16                       # the parallel adapter's bottleneck (reference: 16)
    prompt_length: int = 10                      # the prompt expert's tokens (soft mode; 0: no prompt expert)
    router_expansion: int = 4                    # SwiGLU hidden = slots × this (reference swi_x = 4)
    max_threshold: float = 0.5                   # sparse: τ ∈ (0, max_threshold)
    layers_to_transform: Optional[Union[list[int], int]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"MoaConfig: mode={self.mode!r} is not one of {MODES} ('soft' weights every slot, "
                             f"'sparse' runs a slot only where its weight passes the token's threshold)")
        for name in ("r", "adapter_size", "router_expansion"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"MoaConfig: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.prompt_length < 0:
            raise ValueError(f"MoaConfig: prompt_length must be >= 0, got {self.prompt_length}")
        if not 0.0 < self.max_threshold <= 1.0:
            raise ValueError(f"MoaConfig: max_threshold must be in (0, 1], got {self.max_threshold}")
        unknown = sorted(set(self.lora_modules) - set(BLOCK_SITES))
        if unknown:
            raise ValueError(f"MoaConfig: lora_modules {unknown} are not block projections MoA knows; choose from "
                             f"{', '.join(BLOCK_SITES)}")

    @property
    def prompt_on(self) -> bool:
        return self.mode == "soft" and self.prompt_length > 0

    def slot_names(self) -> list[str]:
        return list(self.lora_modules) + ["parallel_adapter"] + (["prompt"] if self.prompt_on else [])


# Each layout's block projections, relative to the block, under LLaMA's names (the names lora_modules uses).
# A BERT-like block has no gate projection; its FFN input is intermediate.dense's input, its output output.dense's.
BLOCK_SITES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
               "o_proj": LLAMA_LIKE.attn_out, "gate_proj": "mlp.gate_proj", "up_proj": LLAMA_LIKE.ffn_in,
               "down_proj": LLAMA_LIKE.ffn_out}
SITES_BY_LAYOUT = {
    LLAMA_LIKE: BLOCK_SITES,
    BERT_LIKE: {"q_proj": "attention.self.query", "k_proj": "attention.self.key", "v_proj": "attention.self.value",
                "o_proj": BERT_LIKE.attn_out, "up_proj": BERT_LIKE.ffn_in, "down_proj": BERT_LIKE.ffn_out},
}
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")


class MoaRouter(RoutingRecorder):
    """w = σ(SwiGLU(h)) per token (and the sparse threshold τ); one per block."""

    def __init__(self, d: int, slots: int, cfg: MoaConfig, context: RoutingContext):
        super().__init__(slots, context)
        hidden = slots * cfg.router_expansion
        self.w1, self.w3, self.w2 = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, slots)
        for lin in (self.w1, self.w2, self.w3):
            nn.init.zeros_(lin.bias)
        self.threshold = nn.Linear(d, 1) if cfg.mode == "sparse" else None
        self.max_threshold = cfg.max_threshold

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Slot weights (N, S), 0 where sparse routing leaves a slot out."""
        w = torch.sigmoid(self.w2(F.silu(self.w1(h)) * self.w3(h)))
        if self.threshold is not None:
            tau = self.max_threshold * torch.sigmoid(self.threshold(h))          # (N, 1)
            soft = torch.sigmoid((w - tau) / STE_TEMPERATURE)
            w = w * ((w >= tau).to(w.dtype) + soft - soft.detach())              # forward: w · 1[w ≥ τ]
        with torch.no_grad():
            mask = self.context.mask_for(h.shape[0])
            kept = w if mask is None else w[mask]
            # load: the tokens each slot runs on (sparse) or the weight it gets (soft); entropy of w normalised
            load = (kept > 0).sum(0) if self.threshold is not None else kept.sum(0)
            self.record(kept / kept.sum(-1, keepdim=True).clamp_min(1e-12), load)
        return w


class BlockRouting:
    """One block's routing for the current forward: computed once from the attention input, read by every site."""

    def __init__(self, slots: list[str], sparse: bool):
        self.index = {name: i for i, name in enumerate(slots)}
        self.sparse = sparse
        self.router: Optional[MoaRouter] = None
        self.source: Optional[torch.Tensor] = None
        self.weights: Optional[torch.Tensor] = None   # (N, S)
        self.query: Optional[torch.Tensor] = None     # q_proj's output, for the prompt expert
        self.ffn_input: Optional[torch.Tensor] = None

    def route(self, x: torch.Tensor) -> None:
        if x is not self.source:  # q, k and v read one tensor: route it once
            self.source, self.weights = x, self.router(x.reshape(-1, x.shape[-1]))

    def weight(self, slot: str) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("MoA: a slot ran before its block's router (the attention projections must run "
                               "before the attention output and the FFN, as in a LLaMA-like block)")
        return self.weights[:, self.index[slot]]


def weighted_rows(delta_fn, h: torch.Tensor, w: torch.Tensor, into: torch.Tensor, sparse: bool) -> torch.Tensor:
    """into + w ⊙ delta_fn(h) per row; sparse: delta_fn runs on the rows with w > 0 only."""
    if not sparse:
        return into + w.unsqueeze(-1).to(into.dtype) * delta_fn(h).to(into.dtype)
    rows = (w > 0).nonzero().squeeze(-1)
    if rows.numel() == 0:
        return into
    part = w.index_select(0, rows).unsqueeze(-1) * delta_fn(h.index_select(0, rows))
    return into.index_add(0, rows, part.to(into.dtype))


class MoaSite(RoutedAdapter):
    """One projection of a block: optionally a LoRA slot, the parallel adapter (on down_proj), the prompt
    expert (on o_proj), the router (on q_proj); the FFN input tap on up_proj records what the adapter reads."""

    def __init__(self, name: str, d_in: int, d_out: int, block: BlockRouting, cfg: MoaConfig, context, **parts):
        super().__init__(context)
        self.site, self.block, self.scale = name, block, cfg.lora_alpha / cfg.r
        self.lora_A = self.lora_B = self.prompt = self.prompt_gate = None     # the parts this site lacks
        self.router = self.adapter_down = self.adapter_up = None
        if name in cfg.lora_modules:
            self.lora_A = nn.Parameter(torch.empty(cfg.r, d_in))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B = nn.Parameter(torch.zeros(d_out, cfg.r))
        if "router" in parts:
            self.router = parts["router"]
            block.router = self.router
        if "adapter_dim" in parts:                                  # reference: SiLU, biases, zero-init up
            self.adapter_down = nn.Linear(parts["adapter_dim"], cfg.adapter_size)
            self.adapter_up = nn.Linear(cfg.adapter_size, parts["adapter_dim"])
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)
        if "prompt_kv" in parts:
            heads, kv_heads, head_dim = parts["heads"]
            self.prompt = nn.Parameter(torch.randn(cfg.prompt_length, parts["prompt_dim"]) * 0.02)
            self.prompt_gate = nn.Parameter(torch.zeros(heads))     # per head, LLaMA-Adapter's zero gate
            self._kv = parts["prompt_kv"]                          # the frozen k_proj/v_proj (not submodules)
            self.heads = (heads, kv_heads, head_dim)

    def __setattr__(self, name, value):
        if name == "_kv":  # the base's projections are read, never owned: keep them out of the module tree
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _prompt(self, q: torch.Tensor) -> torch.Tensor:
        """gate_head ⊙ softmax(q Pkᵀ / √d) Pv, (N, heads·head_dim), for queries q (N, heads·head_dim)."""
        heads, kv_heads, hd = self.heads
        k_proj, v_proj = self._kv
        pk = k_proj(self.prompt.to(q.dtype)).view(-1, kv_heads, hd).repeat_interleave(heads // kv_heads, 1)
        pv = v_proj(self.prompt.to(q.dtype)).view(-1, kv_heads, hd).repeat_interleave(heads // kv_heads, 1)
        scores = torch.einsum("nhd,lhd->nhl", q.view(-1, heads, hd), pk) / math.sqrt(hd)
        out = torch.einsum("nhl,lhd->nhd", scores.softmax(-1), pv) * self.prompt_gate.view(1, heads, 1)
        return out.reshape(q.shape)

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        block, sparse = self.block, self.block.sparse
        if self.site in ATTENTION_INPUTS:
            block.route(x)
        if self.site == "up_proj":
            block.ffn_input = x
        h, out = x.reshape(-1, x.shape[-1]), result.reshape(-1, result.shape[-1])
        if self.prompt is not None:                       # attention ← attention + prompt: through W_o too
            p = block.weight("prompt").unsqueeze(-1) * self._prompt(block.query.reshape(h.shape))
            h = h + p.to(h.dtype)
            out = out + F.linear(p.to(out.dtype), dense_weight(base_layer).to(out.dtype))  # a 4-bit W: dequantised
        if self.lora_A is not None:
            out = weighted_rows(lambda t: (t.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t() * self.scale,
                                h, block.weight(self.site), out, sparse)
        if self.adapter_down is not None:
            z = block.ffn_input.reshape(-1, block.ffn_input.shape[-1])
            out = weighted_rows(lambda t: self.adapter_up(F.silu(self.adapter_down(t.to(self.adapter_up.weight.dtype)))),
                                z, block.weight("parallel_adapter"), out, sparse)
        if self.site == "q_proj":
            block.query = out
        return out.reshape(result.shape)


@register_tuner("MOA", MoaConfig)
class MoaTuner(RoutedLayerTuner):
    def inject(self, model, config: MoaConfig, adapter_name):
        sites_of = SITES_BY_LAYOUT.get(layout_of(model))
        if sites_of is None:
            raise ValueError(f"MoA needs a LLaMA-like (self_attn.q/k/v/o_proj, mlp.up/down_proj) or BERT-like "
                             f"(attention.self.query/key/value, intermediate/output.dense) block; "
                             f"{model.config.model_type} models are laid out otherwise")
        missing = sorted(set(config.lora_modules) - set(sites_of))
        if missing:
            raise ValueError(f"MoA: lora_modules {missing} do not exist in a {model.config.model_type} block; "
                             f"choose from {', '.join(sites_of)}")
        layers = config.layers_to_transform
        layers = [layers] if isinstance(layers, int) else layers
        context, cfg_model = RoutingContext(), model.config
        slots = config.slot_names()
        head_dim = getattr(cfg_model, "head_dim", None) or cfg_model.hidden_size // cfg_model.num_attention_heads
        heads = (cfg_model.num_attention_heads,
                 getattr(cfg_model, "num_key_value_heads", None) or cfg_model.num_attention_heads, head_dim)
        # q_proj routes, up_proj records the FFN input, down_proj adds the adapter, o_proj the prompt expert
        sites = {"q_proj", "up_proj", "down_proj", *config.lora_modules} | ({"o_proj"} if config.prompt_on else set())
        for block_q in block_modules(model, sites_of["q_proj"], layers):
            prefix = block_q[: -len(sites_of["q_proj"])]
            block = BlockRouting(slots, config.mode == "sparse")
            kv = (self._base(model, prefix + sites_of["k_proj"]), self._base(model, prefix + sites_of["v_proj"]))
            for s in sorted(sites):
                layer = self._wrapped(model, prefix + sites_of[s])
                d_in, d_out, _ = linear_features("MoA", layer.base_layer, prefix + sites_of[s])
                parts: dict = {}
                if s == "q_proj":
                    parts["router"] = MoaRouter(d_in, len(slots), config, context)
                if s == "down_proj":
                    parts["adapter_dim"] = d_out
                if s == "o_proj" and config.prompt_on:
                    parts.update(prompt_kv=kv, heads=heads, prompt_dim=cfg_model.hidden_size)
                site = MoaSite(s, d_in, d_out, block, config, context, **parts)
                layer.add(adapter_name, site.to(layer.base_layer.weight.device))

    @staticmethod
    def _base(model, name):
        module = model.get_submodule(name)
        return module.base_layer if isinstance(module, AdaptedLayer) else module

    @staticmethod
    def _wrapped(model, name) -> AdaptedLayer:
        module = model.get_submodule(name)
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module)
            set_submodule(model, name, module)
        return module


register_method(MethodInfo(
    "moa", MoaConfig, category="moe", kind="activation", mergeable=False, identity_at_init=True,
    default_lr=2e-3, rank_field="r", alpha_field="lora_alpha",
    description="heterogeneous mixture per block: LoRA slots, a parallel adapter and a prompt expert behind a "
                "SwiGLU sigmoid router (soft, or sparse with a per-token threshold)"))
