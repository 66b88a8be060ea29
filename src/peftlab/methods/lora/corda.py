"""CorDA: LoRA initialised by a context-oriented SVD of W C (C = input covariance from calibration data).

Per target layer (Yang et al. 2024; HF PEFT's `init_lora_weights="corda"`): C = mean over samples of XᵀX (each
sample's activations X divided by their max); damp C' = C + λ·mean(diag C)·I with λ = 0.01 doubled until
‖C'C'⁻¹ − I‖ < 0.05; SVD W C' = U S Vh; then W = U S (Vh C'⁻¹). IPM takes the largest r components (task
data), KPM the smallest r (data whose knowledge must be kept; the large ones stay frozen).
A = diag(√(S/s)) (Vh C'⁻¹)_r, B = U_r diag(√(S/s)), and the base keeps W − sBA, so the model is unchanged.

    cfg = peftlab.LoraConfig(r=8, init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))
    preprocess_corda(model, cfg, dataloader)          # or PEFT's form: preprocess_corda(model, cfg, run_model)
    model = peftlab.get_peft_model(model, cfg)

The adapter file is a plain LoRA file (peft_type LORA). Its base is the residual, which needs the decomposition:
with `corda_config.cache_file` set, the decomposition is written there (safetensors, atomically) and loading the
adapter later rebuilds the residual from it; otherwise call preprocess_corda again before loading, or save with
`path_initial_model_for_weight_conversion` to get a plain LoRA for the original base.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ...core.calibration import InputHook, device_of, iter_batches, model_inputs
from ...core.io import load_tensors, save_tensors
from ...core.layer import innermost
from ...core.quantized import dequantize, is_quantized, keep_canonical_layout
from ...core.registry import MethodInfo, register_method
from ...core.selective import weight_view
from ...core.targets import is_linear_like, pattern_value, resolve_targets
from .config import LORA_FLAG_FIELDS, LoraConfig, SubConfig

EIGENS_ATTR = "_peftlab_corda_eigens"   # (U (d_out, r), S (r,), V (d_in, r)) set by preprocess_corda, taken by init


class CordaConfig(SubConfig):
    """HF PEFT's CordaConfig fields, written to adapter_config.json exactly as PEFT writes them."""
    DEFAULTS = {"cache_file": None, "covariance_file": None, "corda_method": "ipm", "verbose": False,
                "use_float16_for_covariance": False, "prune_temporary_fields": True}

    def validate(self) -> None:
        if self["corda_method"] not in ("ipm", "kpm"):
            raise ValueError(f"corda_method must be 'ipm' (largest components, task data) or 'kpm' (smallest "
                             f"components, data whose knowledge to keep), got {self['corda_method']!r}")


def corda_options(config: LoraConfig) -> CordaConfig:
    return CordaConfig.of(config.corda_config)


@dataclass
class CordaLoraConfig(LoraConfig):
    """LoraConfig with init_lora_weights="corda" (the registry's `corda`); saved as a plain LoraConfig."""
    implemented_features = LoraConfig.implemented_features  # it is LoRA, initialised by CorDA
    init_lora_weights: Any = "corda"
    corda_config: Optional[dict] = field(default_factory=CordaConfig)

    @property
    def calibration_data(self) -> str:
        """Which data `prepare` wants: the task's (IPM), or text whose knowledge must be kept (KPM)."""
        return "knowledge" if corda_options(self).corda_method == "kpm" else "task"

    def prepare(self, model: nn.Module, data: Any, **kwargs) -> None:
        preprocess_corda(model, self, data, **kwargs)


def linear_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The Linear/Conv1D layers the LoRA tuner will adapt, by the name it passes to corda_init (embedding targets
    get no CorDA or EVA init); an already adapted layer is represented by its base layer."""
    out = []
    for name in resolve_targets(model, config):
        module = innermost(model, name)[1]
        if is_linear_like(module):
            out.append((name, module))
    return out


def _weight(module: nn.Module, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The weight as (d_out, d_in) float32 (a quantised base's dequantised)."""
    if is_quantized(module):
        return dequantize(module, torch.float32)
    return weight_view(module, "weight", fan_in_fan_out or type(module).__name__ == "Conv1D").float()


def _checksum(w: torch.Tensor) -> torch.Tensor:
    w = w.double()
    return torch.stack([w.sum(), (w * w).sum(), w.abs().max()]).cpu()


def _samples(args, mask: Optional[torch.Tensor], name: str) -> list[torch.Tensor]:
    """A layer input's samples: each row's real (unpadded) tokens when the batch's mask fits, else each row."""
    x = args[0].detach()
    if x.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
        return [x[b][mask[b].bool()] for b in range(x.shape[0])]
    return list(x) if x.dim() == 3 else [x.reshape(-1, x.shape[-1])]


@torch.no_grad()
def collect_covariance(model: nn.Module, targets: list[tuple[str, nn.Module]], data: Any = None,
                       run_model: Optional[Callable[[], None]] = None, fp16: bool = False,
                       **batch_kwargs) -> dict[str, torch.Tensor]:
    """C per target = mean over samples of (X/max X)ᵀ(X/max X), X a sample's real (unpadded) tokens."""
    sums = {name: None for name, _ in targets}
    counts = {name: 0 for name, _ in targets}

    def accumulate(name: str, samples: list[torch.Tensor]) -> None:
        scaled = []
        for s in samples:
            s = s if fp16 else s.float()
            scaled.append(s / s.max().abs())
        z = torch.cat(scaled)                                                        # (Σ tokens, d_in)
        if not torch.isfinite(z).all():
            raise ValueError(f"CorDA: non-finite activations at {name}; check the calibration data")
        cov = z.t() @ z                        # Σ_samples (X/max X)ᵀ(X/max X) as one product, (d_in, d_in)
        sums[name] = cov if sums[name] is None else sums[name] + cov
        counts[name] += len(samples)

    hooks = [InputHook(n, _samples, lambda samples, n=n: accumulate(n, samples)) for n, _ in targets]
    handles = [m.register_forward_hook(h) for h, (_, m) in zip(hooks, targets)]
    was_training = model.training
    model.eval()
    try:
        if run_model is not None:
            run_model()
        else:
            device = device_of(model)
            for batch in iter_batches(data, **batch_kwargs):
                inputs = model_inputs(model, batch, device)
                inputs.pop("labels", None)
                for h in hooks:
                    h.context = inputs.get("attention_mask")
                model(**inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n in sums if sums[n] is None]
    if missing:
        raise ValueError(f"CorDA: the calibration run never reached {len(missing)} target layer(s), e.g. "
                         f"{missing[0]}; give calibration data the model can run on")
    return {n: (sums[n] / counts[n]).float() for n in sums}


@torch.no_grad()
def decompose(w: torch.Tensor, cov: torch.Tensor, r: int, method: str, where: str = "") -> tuple:
    """Context-oriented SVD of w (d_out, d_in), covariance cov (d_in, d_in): (U_r, S_r, V_r), V = (Vh C'⁻¹)ᵀ."""
    eye = torch.eye(cov.shape[0], device=cov.device)
    if not torch.isfinite(cov).all() or torch.diag(cov).mean() <= 0:
        raise ValueError(f"CorDA: the covariance of {where} is zero or not finite (the calibration data gave this "
                         f"layer no signal); use more varied calibration data")
    damp = 0.01
    for _ in range(60):
        fixed = cov + eye * torch.diag(cov).mean() * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise ValueError(f"CorDA: could not regularise the covariance of {where} into an invertible matrix")
    u, s, vh = torch.linalg.svd(w.float().to(cov.device) @ fixed, full_matrices=False)
    v = (vh @ inv).t()                                                               # (d_in, min_dim)
    if r > s.numel():
        raise ValueError(f"CorDA: r={r} exceeds the rank of {where} ({s.numel()})")
    part = slice(0, r) if method == "ipm" else slice(s.numel() - r, s.numel())       # IPM largest, KPM smallest
    return u[:, part].clone(), s[part].clone(), v[:, part].clone()


def preprocess_corda(model: nn.Module, config: LoraConfig, data: Any = None, hooked_model: Optional[nn.Module] = None,
                     *, run_model: Optional[Callable[[], None]] = None, batch_size: int = 8,
                     max_samples: Optional[int] = None, tokenizer=None) -> None:
    """Compute CorDA's decomposition for every layer `config` targets and attach it for get_peft_model.

    `data`: calibration data in any form core/calibration.py accepts, or (PEFT's form) a callable that runs the
    model itself. Reads/writes `corda_config.covariance_file` and `cache_file` (safetensors, written atomically).
    """
    if callable(data) and run_model is None and not isinstance(data, (nn.Module, torch.Tensor)):
        data, run_model = None, data
    if config.init_lora_weights != "corda":
        raise ValueError(f"preprocess_corda needs a config with init_lora_weights='corda', got "
                         f"{config.init_lora_weights!r}")
    opts = corda_options(config)
    config.corda_config = opts
    keep_canonical_layout(model)  # the calibration forwards must not repack a 4-bit base (core/quantized.py)
    targets = linear_targets(model, config)
    ranks = {n: pattern_value(config.rank_pattern, n, config.r) for n, _ in targets}
    cache = opts.cache_file
    if cache and os.path.isfile(cache) and os.path.getsize(cache) > 0:
        eigens = _eigens_from_cache(cache, targets, ranks, config.fan_in_fan_out)
    else:
        covfile = opts.covariance_file
        if covfile and os.path.isfile(covfile) and os.path.getsize(covfile) > 0:
            stored = load_tensors(covfile)
            missing = [n for n, _ in targets if n not in stored]
            if missing:
                raise ValueError(f"CorDA covariance file {covfile} has no covariance for {missing[0]}; it was built "
                                 f"for other target_modules — delete it to rebuild")
            covs = {n: stored[n].float().to(device_of(model)) for n, _ in targets}
        else:
            if data is None and run_model is None:
                raise ValueError("preprocess_corda needs calibration data (a dataloader, dataset, token tensor, or a "
                                 "run_model callable), unless corda_config.cache_file/covariance_file already exist")
            hooked = hooked_model if hooked_model is not None else model
            hooked_targets = [(n, hooked.get_submodule(n)) for n, _ in targets]
            covs = collect_covariance(hooked, hooked_targets, data, run_model, opts.use_float16_for_covariance,
                                      batch_size=batch_size, max_samples=max_samples, tokenizer=tokenizer)
            if covfile:
                save_tensors(covfile, {n: c.contiguous() for n, c in covs.items()}, metadata={"format": "pt"})
        eigens = {}
        for name, module in targets:
            eigens[name] = decompose(_weight(module, config.fan_in_fan_out), covs[name], ranks[name],
                                     opts.corda_method, name)
            if opts.verbose:
                print(f"CorDA {opts.corda_method}: {name} r={ranks[name]}")
        if cache:
            out = {}
            for name, module in targets:
                u, s, v = eigens[name]
                out.update({f"{name}.eigens.U_WC": u, f"{name}.eigens.S_WC": s, f"{name}.eigens.V_WC": v,
                            f"{name}.weight_checksum": _checksum(_weight(module, config.fan_in_fan_out))})
            save_tensors(cache, out, metadata={"format": "pt", "corda_method": opts.corda_method})
    for name, module in targets:
        module.__dict__[EIGENS_ATTR] = eigens[name]


def _eigens_from_cache(path: str, targets, ranks: dict, fan_in_fan_out: bool = False) -> dict:
    stored = load_tensors(path)
    out = {}
    for name, module in targets:
        keys = [f"{name}.eigens.{k}" for k in ("U_WC", "S_WC", "V_WC")]
        if any(k not in stored for k in keys):
            raise ValueError(f"CorDA cache {path} has no decomposition for {name}; it was built for other "
                             f"target_modules — delete it or point corda_config.cache_file elsewhere")
        check = stored.get(f"{name}.weight_checksum")
        w = _weight(module, fan_in_fan_out)
        if check is not None and not torch.allclose(check.double(), _checksum(w), rtol=1e-6, atol=1e-6):
            raise ValueError(f"CorDA cache {path} was built from different weights than this model's {name} "
                             f"(another base model, or one already CorDA-initialised); delete it to rebuild")
        u, s, v = (stored[k].float().to(w.device) for k in keys)
        if s.numel() != ranks[name] or u.shape[0] != w.shape[0] or v.shape[0] != w.shape[1]:
            raise ValueError(f"CorDA cache {path} holds rank {s.numel()} for {name} ({tuple(u.shape)}, "
                             f"{tuple(v.shape)}), but this config needs r={ranks[name]} on a {tuple(w.shape)} "
                             f"weight; delete the cache to rebuild it for this rank")
        out[name] = (u, s, v)
    return out


@torch.no_grad()
def corda_init(adapter, base_layer: nn.Module, config: LoraConfig, module_name: str) -> None:
    """Called by LoraTuner for init_lora_weights="corda": A, B from the decomposition; the base keeps W − sBA."""
    eigens = base_layer.__dict__.pop(EIGENS_ATTR, None)
    if eigens is None:
        cache = corda_options(config).cache_file
        if not (cache and os.path.isfile(cache)):
            raise ValueError(
                f"{module_name}: init_lora_weights='corda' needs CorDA's decomposition of this layer: call "
                f"peftlab.methods.lora.preprocess_corda(model, config, calibration_data) before get_peft_model, or "
                f"set corda_config.cache_file to a cache it wrote. (A saved CorDA adapter applies to the residual "
                f"base; save with path_initial_model_for_weight_conversion for a plain LoRA of the original base.)")
        eigens = _eigens_from_cache(cache, [(module_name, base_layer)], {module_name: adapter.r},
                                    adapter.fan_in_fan_out)[module_name]
    w = base_layer.weight
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{module_name}: CorDA initialises float32/float16/bfloat16 weights, got {w.dtype}; "
                        f"initialise before quantising the residual")
    u, s, v = (t.to(w.device).float() for t in eigens)
    if s.numel() != adapter.r:
        raise ValueError(f"{module_name}: the CorDA decomposition has rank {s.numel()}, the adapter r={adapter.r}; "
                         f"run preprocess_corda with the same config you pass to get_peft_model")
    root = (s / adapter.scale).sqrt()
    a = v.t() * root.view(-1, 1)                                                   # (r, d_in)
    b = u * root.view(1, -1)                                                       # (d_out, r)
    adapter.lora_A.copy_(a)
    adapter.lora_B.copy_(b)
    residual = adapter.base_weight(base_layer).detach().float() - adapter.scale * (b @ a)
    residual = residual.t() if adapter.fan_in_fan_out else residual
    base_layer.weight.data = residual.to(w.dtype).contiguous()


register_method(MethodInfo(
    "corda", CordaLoraConfig, category="reparameterized", kind="delta-weight", mergeable=True,
    hf_peft_compatible=True, default_lr=2e-3, **LORA_FLAG_FIELDS,
    description="LoRA initialised by context-oriented SVD of W·C from calibration data (IPM / KPM modes)"))
