"""MoE-Adapters with DDAS (Yu et al., CVPR 2024): per-task routers over one set of bottleneck experts beside each
block's feed-forward network, and one autoencoder per task that picks the task, or the untouched base, at test time.

Per block, in parallel with the FFN (peftlab's parallel-adapter placement, hf/modules.py: h = the FFN input):
  expert e    E_e(h) = s · up_e(dropout(ReLU(down_e h)))     down_e: d → 64, up_e: 64 → d zero-init, s = 0.1
  router t    l = h̄ W_t (+ ε ⊙ (softplus(h̄ N_t) + 0.01), ε ~ N(0, 1), in training only)   W_t, N_t ∈ R^{d×E}, zero
              g = softmax of the top-k logits, 0 for the other experts (k = 2, Shazeer's noisy top-k gate)
  block       FFN(h) + Σ_e g_e E_e(h)
h̄ is the block's FFN input at one summary position per input, so routing is per input and per block (the
reference routes each image by its class token; a causal LM's summary of its prompt is the last prompt token: in a
batch with labels, the position before a row's first labelled token). generate() routes on the prompt and keeps
that choice for the new tokens (a forward that continues a KV cache outside generate() is routed on its own tokens).

Task t trains router t (`tasks_done` = t tasks finished) and the experts not yet frozen. `PeftModel.end_task(
batches)` after task t (`peftlab continual` calls it): (1) in every block the top_k experts router t chose most
often during task t's training are frozen for good (later routers still use them; the reference's frozen list);
(2) DDAS: autoencoder t, x ↦ sigmoid(D_t ReLU(C_t x + b_t) + b'_t), C_t: d → 100, is fit on x = sigmoid(the mean
of the frozen base's final hidden states over the prompt) of `ddas_batches` batches of the task: MSE, Adam
(ddas_lr, weight decay 1e-4, lr × 0.1 every 10 passes over the features; the reference's), ddas_steps steps, 64
rows a step; (3) tasks_done += 1: router t + 1 trains next. At test time (eval mode) each input goes to
t* = argmin_t MSE_t(x) over the finished tasks, or, when min_t MSE_t(x) > ddas_threshold, to no expert at all: the
base model's output (its zero-shot ability). Before any task has finished (a single `peftlab train`), evaluation
uses the router being trained.

Deviations from the reference (JiazuoYu/MoE-Adapters4CL, mtil/): its autoencoders read ImageNet AlexNet conv
features of the image, here the frozen LM's own pooled state; it picks one task per evaluation batch (the batch's
mean error), here per input; it keeps one more autoencoder of a reference dataset (TinyImageNet) whose win also
means "base", here only the threshold does (0.0655 there, on AlexNet features; the default here was measured on
SmolLM2-135M's pooled states, see METHODS.md); its routers and experts read the block's residual stream before
ln_2, here the FFN's (normalised) input. Like the reference, the cv² balance loss is not trained on (it computes it
and drops it). Not implemented: MoE-Adapters++ (TPAMI 2025: experts added during training, the LEAS selector),
whose code is not in the reference repository. Not mergeable (per-input routing); mixed-adapter batches and beam
search are refused.
File: ours, `MOE_ADAPTERS`; every expert, router and frozen mask per block, the autoencoders on the first block.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.routing import (RoutedAdapter, RoutedLayerTuner, RoutingContext, RoutingRecorder, pooled_states,
                            prompt_mask)
from ..core.tuner import LayerTuner
from .adapters import BottleneckFields, BottleneckTuner, InputTap, _Slot, adapted, adapter_sites, \
    as_bottleneck_config, out_features

BASE = -1   # an input's task when DDAS sends it to the base model


@dataclass
class MoeAdaptersConfig(BottleneckFields):
    peft_type: str = "MOE_ADAPTERS"
    scaling: float = 0.1             # the reference's adapter_scalar
    adapter_dropout: float = 0.1
    num_experts: int = 22            # the reference's 22 experts for 11 tasks
    top_k: int = 2
    num_tasks: int = 11              # routers, one per task: how many tasks the adapter can learn
    router_noise: bool = True
    noise_epsilon: float = 1e-2
    ddas_code_size: int = 100
    ddas_threshold: float = 0.01     # min reconstruction error above which an input goes to the base model
    ddas_steps: int = 300
    ddas_lr: float = 1e-2
    ddas_batches: int = 64           # batches of a finished task whose features fit its autoencoder
    tasks_done: int = 0              # tasks finished so far (set by end_task; saved)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_experts", "top_k", "num_tasks", "ddas_code_size", "ddas_steps", "ddas_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MoeAdaptersConfig: {name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoeAdaptersConfig: top_k={self.top_k} exceeds num_experts={self.num_experts}; use "
                             f"top_k <= num_experts")
        if self.non_linearity != "relu":
            raise ValueError(f"MoeAdaptersConfig: the experts are ReLU bottlenecks (the reference's); got "
                             f"non_linearity={self.non_linearity!r}")
        if not 0 <= self.tasks_done <= self.num_tasks:
            raise ValueError(f"MoeAdaptersConfig: tasks_done={self.tasks_done} must be in [0, num_tasks="
                             f"{self.num_tasks}]")
        for name in ("ddas_threshold", "ddas_lr", "noise_epsilon"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"MoeAdaptersConfig: {name} must be a positive finite number, got {value!r}")


class TaskRouting(RoutingContext):
    """Shared by one adapter's blocks: each input's task and summary position for this batch, the task in training."""

    def __init__(self, task: int):
        super().__init__()
        self.task = task                              # the task being trained (= tasks_done)
        self.tasks: Optional[torch.Tensor] = None     # (B,) router per input; BASE: no experts
        self.positions: Optional[torch.Tensor] = None  # (B,) summary position per input, or None: the last
        self.route_id = 0                             # one per PeftModel call; generate's steps share one


class TaskRouters(RoutingRecorder):
    """Router t (W_t, N_t ∈ R^{d×E}, zero-init: the reference's) for every task t: noisy top-k gates per input."""

    def __init__(self, d: int, experts: int, tasks: int, k: int, noise: bool, eps: float, context: TaskRouting):
        super().__init__(experts, context)
        self.w_gate = nn.ParameterList(nn.Parameter(torch.zeros(d, experts)) for _ in range(tasks))
        self.w_noise = nn.ParameterList(nn.Parameter(torch.zeros(d, experts)) for _ in range(tasks))
        self.k, self.noise, self.eps = k, noise, eps

    def forward(self, h: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Gates (B, E) for summaries h (B, d): row b uses router tasks[b]; a BASE row gets none."""
        gates = h.new_zeros(h.shape[0], self.w_gate[0].shape[1])
        for t in tasks.unique().tolist():
            if t == BASE:
                continue
            rows = (tasks == t).nonzero().squeeze(1)
            x = h.index_select(0, rows)
            logits = x @ self.w_gate[t]
            if self.noise and self.training:
                logits = logits + torch.randn_like(logits) * (F.softplus(x @ self.w_noise[t]) + self.eps)
            top, idx = logits.topk(self.k, dim=-1)
            gates = gates.index_put((rows.unsqueeze(1), idx), top.softmax(-1))
            with torch.no_grad():
                self.record(logits.softmax(-1), torch.bincount(idx.reshape(-1), minlength=logits.shape[1]))
        return gates


class Expert(nn.Module):
    """A bottleneck adapter: s · up(dropout(ReLU(down h))), down Kaiming-uniform with zero bias, up zero."""

    def __init__(self, d: int, r: int, dropout: float):
        super().__init__()
        self.down, self.up = nn.Linear(d, r), nn.Linear(r, d)
        for t in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(t)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(F.relu(self.down(h))))


class TaskAutoencoders(nn.Module):
    """DDAS: autoencoder t (d → c → d, ReLU code, sigmoid output) per task, fit once at the task's end (buffers)."""

    def __init__(self, d: int, code: int, tasks: int):
        super().__init__()
        self.register_buffer("enc_weight", torch.zeros(tasks, code, d))
        self.register_buffer("enc_bias", torch.zeros(tasks, code))
        self.register_buffer("dec_weight", torch.zeros(tasks, d, code))
        self.register_buffer("dec_bias", torch.zeros(tasks, d))
        self.register_buffer("fit_error", torch.zeros(tasks))   # each task's own mean error when fit: τ's scale

    def errors(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Reconstruction MSE (B, n) of x = sigmoid(features) (B, d) by the first n autoencoders."""
        z = F.relu(torch.einsum("bd,tcd->btc", x, self.enc_weight[:n]) + self.enc_bias[:n])
        out = torch.sigmoid(torch.einsum("btc,tdc->btd", z, self.dec_weight[:n]) + self.dec_bias[:n])
        return (out - x.unsqueeze(1)).pow(2).mean(-1)

    def choose(self, x: torch.Tensor, n: int, threshold: float) -> torch.Tensor:
        """Each row's task: the autoencoder that reconstructs it best, or BASE when every error exceeds threshold."""
        best, task = self.errors(x, n).min(-1)
        return torch.where(best > threshold, torch.full_like(task, BASE), task)

    def fit(self, t: int, x: torch.Tensor, steps: int, lr: float, batch: int = 64) -> float:
        """Train autoencoder t on x (N, d) from a fresh nn.Linear init; returns the final MSE on all of x."""
        enc, dec = nn.Linear(x.shape[1], self.enc_weight.shape[1]), nn.Linear(self.enc_weight.shape[1], x.shape[1])
        ae = nn.Sequential(enc, nn.ReLU(), dec, nn.Sigmoid()).to(x.device)
        opt = torch.optim.Adam(ae.parameters(), lr=lr, weight_decay=1e-4)
        per_pass = math.ceil(x.shape[0] / batch)
        order = torch.randperm(x.shape[0], device=x.device)
        with torch.enable_grad():
            for step in range(steps):
                if step % per_pass == 0 and step:
                    order = torch.randperm(x.shape[0], device=x.device)
                for group in opt.param_groups:          # ×0.1 every 10 passes over the data (the reference's)
                    group["lr"] = lr * 0.1 ** (step // per_pass // 10)
                rows = order[(step % per_pass) * batch:(step % per_pass + 1) * batch]
                loss = F.mse_loss(ae(x[rows]), x[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            for buf, p in ((self.enc_weight, enc.weight), (self.enc_bias, enc.bias), (self.dec_weight, dec.weight),
                           (self.dec_bias, dec.bias)):
                buf[t].copy_(p)
            self.fit_error[t] = self.errors(x, t + 1)[:, t].mean()
            return float(self.fit_error[t])


class MoeAdapterBlock(RoutedAdapter):
    """E bottleneck experts and the per-task routers of one block, added to the FFN output (`ffn_out`)."""

    def __init__(self, d: int, cfg: MoeAdaptersConfig, source: _Slot, context: TaskRouting,
                 ddas: Optional[TaskAutoencoders]):
        super().__init__(context)
        self.experts = nn.ModuleList(Expert(d, cfg.bottleneck_size, cfg.adapter_dropout)
                                     for _ in range(cfg.num_experts))
        self.router = TaskRouters(d, cfg.num_experts, cfg.num_tasks, cfg.top_k, cfg.router_noise, cfg.noise_epsilon,
                                  context)
        self.register_buffer("frozen_by", torch.full((cfg.num_experts,), BASE, dtype=torch.long))  # task, or -1
        self.register_buffer("task_counts", torch.zeros(cfg.num_experts))   # router choices in this task's training
        self.ddas = ddas             # on the first block only (saved once)
        self.scaling, self._source = cfg.scaling, source
        self._cached: tuple[int, Optional[torch.Tensor]] = (-1, None)

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        h, self._source.value = self._source.value, None
        if h is None:
            raise RuntimeError("MoE-Adapters: the FFN input was not recorded (ffn_in of peftlab.hf.modules must run "
                               "before ffn_out)")
        gates = self._gates(h)                                                  # (B, E)
        out = result
        for e in gates.nonzero()[:, 1].unique().tolist():
            rows = gates[:, e].nonzero().squeeze(1)
            g = gates.index_select(0, rows)[:, e].view(-1, *([1] * (h.dim() - 1)))
            y = self.experts[e](h.index_select(0, rows).to(self.router.w_gate[0].dtype)) * self.scaling
            out = out.index_add(0, rows, (g * y).to(out.dtype))
        return out

    def _gates(self, h: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        if ctx.tasks is None:
            raise RuntimeError("MoE-Adapters: no routing for this batch; call the model through the PeftModel "
                               "(its forward and generate choose each input's task first)")
        if h.shape[0] != ctx.tasks.shape[0]:
            raise ValueError(f"MoE-Adapters routed {ctx.tasks.shape[0]} inputs but this block sees {h.shape[0]} rows; "
                             f"it routes whole inputs, so beam search and mixed-adapter batches are not supported")
        route_id, gates = self._cached
        if torch.is_grad_enabled() or route_id != ctx.route_id:   # later generation steps reuse the prompt's
            pos = ctx.positions
            rows = torch.arange(h.shape[0], device=h.device)
            summary = h[rows, pos.to(h.device) if pos is not None else h.shape[1] - 1]     # (B, d)
            gates = self.router(summary.to(self.router.w_gate[0].dtype), ctx.tasks.to(h.device))
            if self.training and torch.is_grad_enabled():
                with torch.no_grad():
                    self.task_counts += (gates > 0).sum(0).to(self.task_counts.dtype)
            self._cached = (ctx.route_id, None if torch.is_grad_enabled() else gates)
        return gates

    def trainable(self) -> list[nn.Parameter]:
        """The experts not frozen yet and the router of the task in training."""
        out = [p for e, ex in enumerate(self.experts) if int(self.frozen_by[e]) == BASE for p in ex.parameters()]
        t = self.context.task
        if t < len(self.router.w_gate):
            out += [self.router.w_gate[t]] + ([self.router.w_noise[t]] if self.router.noise else [])
        return out

    def freeze_most_used(self, task: int, k: int) -> None:
        """End of a task: its k most chosen experts are frozen (the reference's top-2 of choose_map)."""
        counts, idx = self.task_counts.topk(k)
        for c, e in zip(counts.tolist(), idx.tolist()):
            if c > 0 and int(self.frozen_by[e]) == BASE:
                self.frozen_by[e] = task
        self.task_counts.zero_()

    def after_load(self) -> None:
        keep = {id(p) for p in self.trainable()}
        for p in self.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)


@register_tuner("MOE_ADAPTERS", MoeAdaptersConfig)
class MoeAdaptersTuner(RoutedLayerTuner, BottleneckTuner):
    consolidates_tasks = True

    def inject(self, model, config: MoeAdaptersConfig, adapter_name: str) -> None:
        context, ddas = TaskRouting(config.tasks_done), None
        for read, write in adapter_sites(model, as_bottleneck_config(config, adapter_type="parallel")):
            slot = _Slot()
            adapted(model, read).add(adapter_name, InputTap(slot))
            layer, first = adapted(model, write), ddas is None
            if first:
                ddas = TaskAutoencoders(model.config.hidden_size, config.ddas_code_size, config.num_tasks)
            block = MoeAdapterBlock(out_features(layer.base_layer, model), config, slot, context,
                                    ddas if first else None)
            layer.add(adapter_name, block.to(LayerTuner._device_of(layer.base_layer)))

    def _blocks(self, model, adapter_name) -> list[MoeAdapterBlock]:
        return [layer.adapters[adapter_name] for _, layer in self._layers_with(model, adapter_name)]

    def adapter_parameters(self, model, adapter_name):
        for block in self._blocks(model, adapter_name):
            yield from block.trainable()

    def prepare_inputs(self, model, adapter_name, config: MoeAdaptersConfig, kwargs, generate):
        kwargs = super().prepare_inputs(model, adapter_name, config, kwargs, generate)
        blocks = self._blocks(model, adapter_name)
        ctx, training = blocks[0].context, blocks[0].training
        ctx.task, ctx.route_id = config.tasks_done, ctx.route_id + 1
        own = this_call(kwargs)
        ctx.positions = summary_positions(own)
        rows = _rows(kwargs)
        device = blocks[0].frozen_by.device
        if training or not config.tasks_done:
            if training and config.tasks_done >= config.num_tasks:
                raise ValueError(f"MoE-Adapters: all {config.num_tasks} task routers are used ({config.tasks_done} "
                                 f"tasks finished); create the adapter with a larger num_tasks to learn more tasks")
            ctx.tasks = torch.full((rows,), config.tasks_done, dtype=torch.long, device=device)
        else:
            x = torch.sigmoid(pooled_states(model, own)[1].float())
            ctx.tasks = blocks[0].ddas.choose(x.to(device), config.tasks_done, config.ddas_threshold)
        return kwargs

    def end_task(self, model, adapter_name, config: MoeAdaptersConfig, batches) -> None:
        t = config.tasks_done
        if config.inference_mode:
            raise ValueError("MoE-Adapters: end_task on an adapter loaded for inference; load it with "
                             "is_trainable=True to learn more tasks")
        if t >= config.num_tasks:
            raise ValueError(f"MoE-Adapters: all {config.num_tasks} task routers are used; create the adapter with a "
                             f"larger num_tasks")
        blocks = self._blocks(model, adapter_name)
        feats = [pooled_states(model, b)[1] for b in itertools.islice(batches, config.ddas_batches)]
        if not feats:
            raise ValueError("MoE-Adapters: end_task got no batches; DDAS fits the task's autoencoder on them")
        x = torch.sigmoid(torch.cat(feats).float()).to(blocks[0].frozen_by.device)
        blocks[0].ddas.fit(t, x, config.ddas_steps, config.ddas_lr)
        for block in blocks:
            block.freeze_most_used(t, config.top_k)
        config.tasks_done = t + 1
        for block in blocks:
            block.context.task = t + 1
            for p in block.trainable():
                p.requires_grad_(True)    # the next task's router
            block.after_load()            # and nothing else: the frozen experts, task t's router


def _rows(kwargs: dict) -> int:
    ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if ids is None:
        raise ValueError("MoE-Adapters routes each input: pass input_ids (or inputs_embeds) as a keyword argument")
    return ids.shape[0]


def this_call(kwargs: dict) -> dict:
    """The inputs with the attention mask cut to this call's tokens. A call that continues a KV cache (its mask also
    covers the cached positions) is routed on its own tokens: the cache's rows may have been reordered since the
    call that filled it (a multiple-choice scorer copies one context per choice). generate() is exact: its first
    call routes on the prompt and the later steps keep that."""
    ids, mask = kwargs.get("input_ids", kwargs.get("inputs_embeds")), kwargs.get("attention_mask")
    if ids is None or mask is None or mask.dim() != 2 or mask.shape[1] <= ids.shape[1]:
        return kwargs
    return {**kwargs, "attention_mask": mask[:, -ids.shape[1]:]}


def summary_positions(kwargs: dict) -> Optional[torch.Tensor]:
    """(B,) each input's last prompt position: its last real token, or with labels the one before the first
    labelled token (core/routing.prompt_mask); None without an attention mask (the last position)."""
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return None
    mask = prompt_mask(mask, kwargs.get("labels"), mask.shape)
    return (mask.long() * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(-1)


register_method(MethodInfo(
    "moe-adapters", MoeAdaptersConfig, category="moe", kind="activation", mergeable=False, identity_at_init=True,
    default_lr=1e-2, rank_field="bottleneck_size", dropout_field="adapter_dropout",
    description="continual learning: per-task noisy top-2 routers over bottleneck experts beside each FFN, a "
                "task's most used experts frozen after it; DDAS autoencoders pick the task or the base at test time"))
