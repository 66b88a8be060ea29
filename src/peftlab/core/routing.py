"""Token routing, shared by the mixture methods: top-k with renormalisation, the load-balancing loss, and the
routing statistics a model reports (`PeftModel.get_routing_stats()`).

  p = softmax(W_r x)                              router probabilities over S slots, (N, S)
  top-k:  g_j = p_{e_j} / Σ_{j'} p_{e_j'}         j = 1..k, the renormalised weights of the k largest
  balance loss (Switch, eqs. 4-6; MixLoRA/Mixtral's form for top-k):
          L = S · Σ_i f_i P_i,   f_i = (1/N) #{(t, j): e_tj = i},   P_i = (1/N) Σ_t p_ti
          (uniform routing gives L = k; padding tokens are left out when the attention mask is known);
          the adapter's auxiliary loss is coef · the mean of L over its routers

A `Router` belongs to one adapter on one layer; every router of an adapter shares one `RoutingContext`, through
which the tuner hands the batch's attention mask and the current statistics group (a task name) to the routers
and collects their auxiliary losses. Routed low-rank experts are computed by core/grouped.py. Methods that
route differently (MoA's sigmoid slots, TT-LoRA MoE's top-1 per input) record through the same `RoutingStats`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import Adapter
from .tuner import LayerTuner, adapters_off

ALL = "all"  # the statistics group every routed token counts in


def topk_route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs (N, S), weights (N, k) renormalised to sum 1, slot indices (N, k)) of router logits (N, S)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
    top, idx = probs.topk(k, dim=-1)
    return probs, top / top.sum(-1, keepdim=True), idx


def balance_loss(probs: torch.Tensor, idx: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """S · Σ_i f_i P_i over the tokens where `mask` (N,) is True (all without one); see the module docstring.
    `counts` (S,): the assignments per slot of those tokens, when the caller has them already."""
    if mask is not None:
        probs, idx = probs[mask], idx[mask]
    n, slots = probs.shape
    if n == 0:
        return probs.sum() * 0.0
    if counts is None:
        counts = torch.bincount(idx.reshape(-1), minlength=slots)
    return slots * (counts.to(probs.dtype) / n * probs.mean(0)).sum()         # f = counts / N sums to k


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Router entropy per token in nats, (N,)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


class RoutingStats:
    """Per statistics group: tokens routed, assignments per slot, summed router entropy (detached tensors)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.groups: dict[str, list] = {}

    def add(self, group: Optional[str], counts: torch.Tensor, entropy_sum: torch.Tensor, tokens: int) -> None:
        """Accumulated as tensors where they are (no device sync per forward); read by summary()."""
        for g in (ALL,) if group is None else (ALL, group):
            acc = self.groups.get(g)
            if acc is None:
                self.groups[g] = [counts.detach().double(), entropy_sum.detach().double(), tokens]
            else:
                acc[0], acc[1], acc[2] = acc[0] + counts.detach(), acc[1] + entropy_sum.detach(), acc[2] + tokens

    def summary(self, group: str) -> Optional[dict]:
        """{"tokens", "load" (each slot's share of the assignments), "entropy" (mean nats), "max_entropy"}."""
        if group not in self.groups:
            return None
        counts, ent, tokens = self.groups[group]
        counts = counts.cpu()
        total = float(counts.sum()) or 1.0
        return {"tokens": tokens, "load": [round(float(c) / total, 6) for c in counts],
                "entropy": float(ent) / max(tokens, 1), "max_entropy": math.log(self.slots)}

    def reset(self) -> None:
        self.groups = {}


class RoutingContext:
    """Shared by the routers of one adapter: the batch's token mask, the statistics group, collected losses."""

    def __init__(self):
        self.token_mask: Optional[torch.Tensor] = None   # (B·T,) bool, from the forward's attention_mask
        self.group: Optional[str] = None
        self.losses: list[torch.Tensor] = []
        self.stats: list[RoutingStats] = []               # every router's, so one call resets them all

    def set_mask(self, attention_mask: Optional[torch.Tensor]) -> None:
        self.token_mask = None if attention_mask is None else attention_mask.reshape(-1).bool()

    def mask_for(self, n: int) -> Optional[torch.Tensor]:
        """The token mask if it describes these n tokens (not during cached generation steps, not for a row
        segment of a mixed batch), else None."""
        m = self.token_mask
        return m if m is not None and m.numel() == n else None

    def reset_stats(self) -> None:
        for s in self.stats:
            s.reset()

    def take_losses(self) -> Optional[torch.Tensor]:
        losses, self.losses = self.losses, []
        # the mean over routers (Switch adds one loss per MoE layer; the mean keeps the coefficient's meaning
        # independent of how many layers are adapted)
        return torch.stack(losses).mean() if losses else None


class RoutingRecorder(nn.Module):
    """A router module that records its decisions into the adapter's RoutingContext (statistics found by type)."""

    def __init__(self, slots: int, context: RoutingContext):
        super().__init__()
        self.context = context
        self.stats = RoutingStats(slots)
        context.stats.append(self.stats)

    def record(self, probs: torch.Tensor, load: torch.Tensor) -> None:
        """probs (n, S): the recorded tokens' routing distributions (their entropy is kept); load (S,): what those
        tokens gave each slot (assignments, or weights)."""
        self.stats.add(self.context.group, load, entropy(probs).sum(), probs.shape[0])

    def record_topk(self, probs: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Record a top-k decision over every token (probs (N, S), slot indices (N, k)); padding tokens (the
        context's mask) are left out. Returns the kept (probs, indices) and their assignments per slot (S,)."""
        mask = self.context.mask_for(probs.shape[0])
        kept_p, kept_i = (probs, idx) if mask is None else (probs[mask], idx[mask])
        counts = torch.bincount(kept_i.reshape(-1), minlength=probs.shape[1])
        with torch.no_grad():
            self.record(kept_p, counts)
        return kept_p, kept_i, counts


class Router(RoutingRecorder):
    """A linear softmax router over `slots` slots with top-k; records statistics and its balance loss."""

    def __init__(self, d_in: int, slots: int, context: RoutingContext, init_std: float = 0.02):
        super().__init__(slots, context)
        self.weight = nn.Parameter(torch.randn(slots, d_in) * init_std)   # MixLoRA's normal(0, 0.02) gate

    def forward(self, x: torch.Tensor, k: int, with_loss: bool,
                logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, slot indices), each (N, k), for x (N, d_in), or for `logits` = x W_rᵀ computed by the caller
        (in one matmul with its experts' down-projection); the balance loss goes to the context."""
        if logits is None:
            logits = x.to(self.weight.dtype) @ self.weight.t()
        probs, weights, idx = topk_route(logits, k)
        kept_p, kept_i, counts = self.record_topk(probs, idx)     # the counts serve the balance loss too
        if with_loss:
            self.context.losses.append(balance_loss(kept_p, kept_i, counts=counts))
        return weights, idx


def routers_of(module: nn.Module) -> Iterator[tuple[str, RoutingRecorder]]:
    for name, m in module.named_modules():
        if isinstance(m, RoutingRecorder):
            yield name, m


def collect_stats(layers: Iterator[tuple[str, nn.Module]]) -> dict:
    """{group: {"layers": {router name: summary}, "mean_entropy", "mean_load"}} over (name, adapter) pairs."""
    per_group: dict[str, dict] = {}
    for layer_name, adapter in layers:
        for sub, router in routers_of(adapter):
            name = f"{layer_name}.{sub}" if sub else layer_name
            for group in router.stats.groups:
                per_group.setdefault(group, {})[name] = router.stats.summary(group)
    out = {}
    for group, layers_ in per_group.items():
        ents = [s["entropy"] for s in layers_.values()]
        widths = {len(s["load"]) for s in layers_.values()}
        loads = torch.tensor([s["load"] for s in layers_.values()]).mean(0).tolist() if len(widths) == 1 else None
        out[group] = {"mean_entropy": sum(ents) / len(ents),
                      "mean_load": None if loads is None else [round(v, 6) for v in loads], "layers": layers_}
    return out


@contextlib.contextmanager
def group_contexts(contexts: list[RoutingContext], group: Optional[str]) -> Iterator[None]:
    """Inside: routing statistics are also recorded under `group` (e.g. a task name)."""
    before = [c.group for c in contexts]
    for c in contexts:
        c.group = group
    try:
        yield
    finally:
        for c, g in zip(contexts, before):
            c.group = g


class RoutedAdapter(Adapter):
    """An adapter whose routing belongs to the adapter's shared RoutingContext (`context`). Per-token routing has
    no single weight to fold into W, so no routed adapter merges."""
    merge_refused = ("it routes each token to its own experts, so its update is a different matrix for every token "
                     "and there is no single ΔW to fold into W; keep it unmerged (merge_and_unload is refused too)")

    def __init__(self, context: RoutingContext):
        super().__init__()
        self.context = context


class RoutedLayerTuner(LayerTuner):
    """A LayerTuner for mixtures: one RoutingContext per adapter, the balance losses as aux_loss, statistics.
    Subclasses set `aux_coef_field` (the config field scaling the balance loss) and create RoutedAdapters."""
    routes_tokens = True
    aux_coef_field: Optional[str] = None

    def routing_contexts(self, model: nn.Module, adapter_name: str) -> list[RoutingContext]:
        for _, layer in self._layers_with(model, adapter_name):
            adapter = layer.adapters[adapter_name]
            if isinstance(adapter, RoutedAdapter):
                return [adapter.context]   # one context per adapter: the first routed layer has it
        return []

    def routing_stats(self, model: nn.Module, adapter_name: str) -> dict:
        return collect_stats((n, l.adapters[adapter_name]) for n, l in self._layers_with(model, adapter_name))

    def prepare_inputs(self, model, adapter_name, config, kwargs, generate):
        for ctx in self.routing_contexts(model, adapter_name):
            ctx.set_mask(kwargs.get("attention_mask"))
            ctx.losses = []   # a training forward without labels leaves its losses behind: never carry them on
        return kwargs

    def aux_loss(self, model, adapter_name, config):
        total = None
        for ctx in self.routing_contexts(model, adapter_name):
            loss = ctx.take_losses()
            if loss is not None:
                total = loss if total is None else total + loss
        coef = getattr(config, self.aux_coef_field) if self.aux_coef_field else 0.0
        return None if total is None or not coef else coef * total


def prompt_mask(attention_mask: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                shape: torch.Size) -> torch.Tensor:
    """(B, T) bool: each row's prompt tokens, what a router that decides per input reads (at inference a request
    is its prompt alone). The real tokens (attention_mask; all when None) before the row's first labelled token (a
    prompt/completion record in training); a row labelled throughout (text data), or a batch without labels, keeps
    all its real tokens. The training loop may keep only the last columns of a left-padded batch's labels
    (logits_to_keep): they are the sequence's right end."""
    mask = torch.ones(shape[:2], dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if labels is not None and labels.dim() == 2 and labels.shape[0] == mask.shape[0] \
            and labels.shape[1] <= mask.shape[1]:
        labels = F.pad(labels, (mask.shape[1] - labels.shape[1], 0), value=-100)
        prompt = mask & ~((labels.to(mask.device) != -100).long().cumsum(1) > 0)
        mask = torch.where(prompt.any(1, keepdim=True), prompt, mask)
    return mask


def pooled_states(model: nn.Module, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(last prompt token's, mean over prompt tokens') final hidden state of the frozen body (every adapter off),
    (B, d) each.

    The router decides from the input it will see at inference, where a generation request is its prompt alone:
    so in a training batch with labels only the positions before a row's first labelled token count (the prompt
    of a prompt/completion record), not the completion and its EOS. A row labelled throughout (text data) or a
    batch without labels is pooled over all its real tokens."""
    inputs = {k: kwargs[k] for k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids") if k in kwargs}
    with torch.no_grad(), adapters_off(model):
        h = model.base_model(**inputs).last_hidden_state                     # (B, T, d)
    mask = prompt_mask(inputs.get("attention_mask"), kwargs.get("labels"), h.shape).to(h.device, h.dtype)
    last = (mask * torch.arange(1, h.shape[1] + 1, device=h.device)).argmax(-1)   # the last real position
    mean = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    return h[torch.arange(h.shape[0], device=h.device), last], mean


def cross_entropy_top1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The router cross-entropy of TT-LoRA MoE: logits (B, E) against the task label of each input (B,)."""
    return F.cross_entropy(logits.float(), labels.to(logits.device))
