"""TT-LoRA MoE (Kunwar et al. 2025): frozen per-task TT-LoRA experts and a noisy top-1 router per input.

Stage 1 trains one ordinary `tt-lora` adapter per task. Stage 2 (this method, `expert_dirs` = those adapter
directories) loads them as frozen experts and trains only the router:

  h_last, h_mean = the frozen base's last hidden state at the last real token, and its mean over the tokens
  logits = W_r h_last (+ ε ⊙ softplus(W_n h_mean), ε ~ N(0, 1), in training only: Shazeer's noisy gating)
  e* = argmax logits                         the input's expert; every layer computes y = W x + α·TT_{e*}(x)
  loss = cross-entropy(logits, the input's task label)          (the batch's `task_ids`; labels without it)

The base pass runs with the adapters off, before the adapted forward (`prepare_inputs`); the router's choice
holds for every position of the input, so `generate()` keeps one expert per row. Inputs are grouped by expert
once per forward and each expert runs once on its rows. The chosen expert's output is multiplied by
p_{e*}/stopgrad(p_{e*}) = 1 (p = softmax(logits)): the outputs are the reference's (a hard top-1 gate of 1),
and the language-model loss also reaches the router (straight-through), which otherwise learns from the
cross-entropy alone. Saved as one TT_LORA_MOE adapter: every expert's cores and the router.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.adapter_files import source_name
from ..core.config import PeftConfig
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.routing import RoutedAdapter, RoutedLayerTuner, RoutingContext, RoutingRecorder, pooled_states
from .tt_lora import TTLoraConfig, TTLoraLinear, TTLoraTuner

STAGE1_FIELDS = ("r", "alpha", "target_modules", "factorization", "max_factor", "fan_in_fan_out")


@dataclass
class TTLoraMoeConfig(TTLoraConfig):
    peft_type: str = "TT_LORA_MOE"
    num_experts: int = 2
    # stage-1 `tt-lora` adapter directories, one per task (expert i = directory i). Read when the adapter is
    # created: their cores and TT settings are copied in, and the saved config no longer needs them.
    expert_dirs: Optional[list] = None
    expert_names: Optional[list] = None     # one name per expert (the statistics' labels); default the dirs'
    router_noise: bool = True               # Shazeer's noisy gating in training
    router_loss_coef: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert_dirs:
            self.num_experts = len(self.expert_dirs)
        if self.num_experts < 1:
            raise ValueError(f"TTLoraMoeConfig: num_experts must be >= 1, got {self.num_experts}")
        if self.expert_names is not None and len(self.expert_names) != self.num_experts:
            raise ValueError(f"TTLoraMoeConfig: {len(self.expert_names)} expert_names for {self.num_experts} "
                             f"experts; give one name per expert")


class InputRouting(RoutingContext):
    """The routing context of one TT-LoRA MoE adapter: which expert each input row of this batch uses."""

    def __init__(self):
        super().__init__()
        self.rows = 0
        self.row_groups: Optional[list[tuple[int, torch.Tensor]]] = None   # [(expert, row indices), ...]
        self.gate: Optional[torch.Tensor] = None   # (B,) exactly 1.0, with the router's straight-through gradient


class TopOneRouter(RoutingRecorder):
    """logits = W_r h_last (+ noise in training); the input's expert is their argmax."""

    def __init__(self, d: int, experts: int, noise: bool, context: RoutingContext):
        super().__init__(experts, context)
        self.proj = nn.Linear(d, experts, bias=False)
        self.noise = nn.Linear(d, experts) if noise else None

    def forward(self, h_last: torch.Tensor, h_mean: torch.Tensor) -> torch.Tensor:
        logits = self.proj(h_last.to(self.proj.weight.dtype))
        if self.noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(h_mean.to(logits.dtype)))
        with torch.no_grad():
            self.record(logits.softmax(-1), torch.bincount(logits.argmax(-1), minlength=logits.shape[-1]))
        return logits


class TTLoraExperts(RoutedAdapter):
    """E frozen TT-LoRA experts on one layer; each input row uses the expert its router chose."""

    def __init__(self, make_expert, experts: int, context: RoutingContext, router: Optional[TopOneRouter]):
        super().__init__(context)
        self.experts = nn.ModuleList(make_expert() for _ in range(experts))
        self.router = router       # on the first adapted layer only (so it is saved once)

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        groups = self.context.row_groups
        if groups is None:
            raise RuntimeError("TT-LoRA MoE: no routing for this batch; call the model through the PeftModel "
                               "(its forward or generate routes each input first)")
        if x.shape[0] != self.context.rows:
            raise ValueError(f"TT-LoRA MoE routed {self.context.rows} inputs but this layer sees {x.shape[0]} rows; "
                             f"it routes whole inputs, so beam search, other row expansions and mixed-adapter "
                             f"batches are not supported")
        out = result.clone()
        gate = self.context.gate.view(-1, *([1] * (x.dim() - 1))).to(result.dtype)
        for e, rows in groups:
            part = result.index_select(0, rows)
            delta = self.experts[e](x.index_select(0, rows), base_layer, torch.zeros_like(part))
            out.index_copy_(0, rows, part + gate.index_select(0, rows) * delta)
        return out


@register_tuner("TT_LORA_MOE", TTLoraMoeConfig)
class TTLoraMoeTuner(RoutedLayerTuner):
    aux_coef_field = "router_loss_coef"
    takes_task_ids = True

    def inject(self, model, config: TTLoraMoeConfig, adapter_name):
        if not config.expert_dirs and config.expert_names is None:
            # a saved TT-LoRA MoE adapter names its experts; a fresh one without stage-1 runs would route between
            # frozen, untrained experts
            raise ValueError("TT-LoRA MoE needs expert_dirs: the stage-1 `tt-lora` adapter directories, one per "
                             "task (train each with `peftlab train --method tt-lora`, then stage 2 with "
                             "`--method tt-lora-moe --set expert_dirs=[DIR1,DIR2]`); without them its frozen "
                             "experts would stay untrained")
        stage1 = [self._stage1(d) for d in config.expert_dirs or []]
        if stage1:
            take_expert_settings(config, stage1)
        self._context, self._router = InputRouting(), None
        self._hidden = model.config.hidden_size
        super().inject(model, config, adapter_name)
        for e, (directory, _) in enumerate(stage1):
            self._load_expert(model, adapter_name, e, directory)
        if stage1:
            config.expert_names = config.expert_names or [source_name(d) for d, _ in stage1]
            config.expert_dirs = None   # the experts now live in this adapter's own file

    def create_adapter(self, base_layer, config: TTLoraMoeConfig, module_name: str, adapter_name: str):
        tt = TTLoraTuner()
        make = lambda: tt.create_adapter(base_layer, config, module_name, adapter_name)   # noqa: E731
        if self._router is None:
            self._router = TopOneRouter(self._hidden, config.num_experts, config.router_noise, self._context)
            router = self._router
        else:
            router = None
        adapter = TTLoraExperts(make, config.num_experts, self._context, router)
        for p in adapter.experts.parameters():
            p.requires_grad_(False)
        return adapter

    def adapter_parameters(self, model, adapter_name):
        for _, layer in self._layers_with(model, adapter_name):
            router = layer.adapters[adapter_name].router
            if router is not None:
                yield from router.parameters()     # stage 2 trains the router alone; the experts stay frozen

    def prepare_inputs(self, model, adapter_name, config, kwargs, generate):
        kwargs = super().prepare_inputs(model, adapter_name, config, kwargs, generate)
        task_ids = kwargs.pop("task_ids", None)
        ctx, router = self.routing_contexts(model, adapter_name)[0], self._router_of(model, adapter_name)
        h_last, h_mean = pooled_states(model, kwargs)     # the router reads the frozen base
        logits = router(h_last, h_mean)
        choice = logits.argmax(-1)
        p = logits.softmax(-1).gather(1, choice.unsqueeze(1)).squeeze(1)
        ctx.gate = p / p.detach()  # 1.0 exactly; its gradient lets the language-model loss teach the router too
        ctx.rows = choice.shape[0]
        ctx.row_groups = [(e, (choice == e).nonzero().squeeze(-1)) for e in choice.unique().tolist()]
        if task_ids is not None and router.training and torch.is_grad_enabled():
            ctx.losses.append(F.cross_entropy(logits.float(), task_ids.to(logits.device)))
        return kwargs

    def _router_of(self, model, adapter_name) -> TopOneRouter:
        return next(layer.adapters[adapter_name].router for _, layer in self._layers_with(model, adapter_name)
                    if layer.adapters[adapter_name].router is not None)

    @staticmethod
    def _stage1(directory) -> tuple[Path, TTLoraConfig]:
        from ..core.adapter_files import adapter_dir
        path = adapter_dir(directory)
        cfg = PeftConfig.from_pretrained(path)
        if cfg.peft_type != "TT_LORA":
            raise ValueError(f"TT-LoRA MoE: {path} holds a {cfg.peft_type} adapter; stage 2 takes the directories "
                             f"of `tt-lora` runs (one per task)")
        return path, cfg

    def _load_expert(self, model, adapter_name, e: int, directory: Path) -> None:
        from ..core.adapter_files import read_weights
        layers = dict(self._layers_with(model, adapter_name))
        for key, t in read_weights(directory).items():
            name, _, suffix = key.removeprefix("base_model.model.").rpartition(".tt_cores.")
            if name not in layers:
                raise KeyError(f"TT-LoRA MoE: {directory} has {key!r}, but this model adapts no module {name!r}; "
                               f"the stage-1 adapters must share one base model and target_modules")
            core = layers[name].adapters[adapter_name].experts[e].tt_cores[int(suffix)]
            if core.shape != t.shape:
                raise ValueError(f"TT-LoRA MoE: {directory}: {key} has shape {tuple(t.shape)}, this expert's core "
                                 f"{tuple(core.shape)}; the stage-1 adapters were trained with other TT settings")
            with torch.no_grad():
                core.copy_(t)


def take_expert_settings(config: TTLoraMoeConfig, stage1: list[tuple[Path, TTLoraConfig]]) -> None:
    """The stage-1 experts define the TT shape (STAGE1_FIELDS): they must agree with each other, and a field the
    user set to something else than its default (`--r 8`) is refused rather than silently replaced by theirs."""
    defaults = TTLoraMoeConfig()
    (first_dir, first), rest = stage1[0], stage1[1:]
    for f in STAGE1_FIELDS:
        theirs = getattr(first, f)
        for directory, cfg in rest:
            if getattr(cfg, f) != theirs:
                raise ValueError(f"TT-LoRA MoE: the stage-1 experts disagree on {f}: {first_dir} has {theirs!r}, "
                                 f"{directory} {getattr(cfg, f)!r}; train every expert with the same TT settings "
                                 f"and target_modules")
        given = getattr(config, f)
        if given not in (theirs, getattr(defaults, f)):
            raise ValueError(f"TT-LoRA MoE: {f}={given!r} was given, but the stage-1 experts were trained with "
                             f"{f}={theirs!r}; leave {f} unset (stage 2 takes the experts' TT settings)")
        setattr(config, f, theirs)


register_method(MethodInfo(
    "tt-lora-moe", TTLoraMoeConfig, category="moe", kind="activation", mergeable=False, identity_at_init=False,
    default_lr=1e-3, rank_field="r", alpha_field="alpha", trains_on="tt-lora",
    description="frozen per-task TT-LoRA experts (stage-1 tt-lora runs) and a noisy top-1 router on the frozen "
                "base's last hidden state, trained with cross-entropy on the task labels"))
