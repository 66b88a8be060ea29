"""The method registry: user-facing method names -> configs, and peft_type -> the tuner that implements it.

Two tables, because HF PEFT's file format keys adapters by `peft_type` ("LORA") while users pick methods by
name ("dora" is LORA with use_dora=True). A method file registers both once, at import time.
"""
from __future__ import annotations

import difflib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# What a method changes (docs/DESIGN.md, "Kinds"): a weight delta (mergeable into W), activations beside a layer,
# the inputs (virtual tokens, key/value prefixes), a subset of the model's own parameters, or all of them. It is
# reported to users (`peftlab methods`, the bench); the core reads declared capabilities, never the kind.
KINDS = ("delta-weight", "activation", "input", "selective", "full")
SAVES = ("adapter", "model")


@dataclass(frozen=True)
class MethodInfo:
    name: str                     # registry name used by --method and list_methods()
    config_cls: type              # the config dataclass
    preset: dict = field(default_factory=dict)  # config fields this name implies (dora -> use_dora=True)
    kind: str = "delta-weight"
    category: str = "reparameterized"  # the survey's column: reparameterized/additive/selective/hybrid/moe
    mergeable: bool = True
    hf_peft_compatible: bool = False   # written exactly as HF PEFT writes it
    identity_at_init: bool = True      # the adapted model equals the base model at step 0
    description: str = ""
    # The learning rate `peftlab train` uses when --lr is not given. Methods differ by orders of magnitude
    # (a few thousand soft-prompt values want ~3e-2, full fine-tuning ~5e-5); one global default would make
    # half the zoo look broken. The values were chosen on SmolLM2-135M's demo task (benchmarks/method_table.py,
    # 40 steps × 8): e.g. VeRA, FourierFT and AdaLoRA reach 0% exact match at 2e-4/4e-3 and 42–44% at 1e-2–2e-2.
    default_lr: float = 2e-4
    # The config fields the generic command-line flags --r, --alpha and --dropout set (None: the method has no
    # such setting, and the flag is refused with the method's fields listed).
    rank_field: Optional[str] = None
    alpha_field: Optional[str] = None
    dropout_field: Optional[str] = None
    # A config field that takes the run's number of optimizer steps when the user leaves it unset (AdaLoRA's
    # total_step schedules its rank budget over the run).
    run_length_field: Optional[str] = None
    # What a training run keeps: an adapter directory, or (full fine-tuning) a whole Transformers model.
    saves: str = "adapter"
    # Stage 2 of a two-stage method: it trains on top of finished runs of this method, one per task (TT-LoRA MoE
    # on tt-lora experts), so it cannot start from the bare base; the single-task bench grid skips it.
    trains_on: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.saves not in SAVES:
            raise ValueError(f"method {self.name!r}: saves must be one of {SAVES}, got {self.saves!r}")
        names = {f.name for f in dataclasses.fields(self.config_cls)}
        for attr in ("rank_field", "alpha_field", "dropout_field", "run_length_field"):
            value = getattr(self, attr)
            if value is not None and value not in names:
                raise ValueError(f"method {self.name!r}: {attr}={value!r} is not a field of "
                                 f"{self.config_cls.__name__}")

    def make_config(self, **overrides: Any):
        return self.config_cls(**{**self.preset, **overrides})

    def as_dict(self) -> dict:
        return {"name": self.name, "category": self.category, "kind": self.kind, "mergeable": self.mergeable,
                "hf_peft_compatible": self.hf_peft_compatible, "identity_at_init": self.identity_at_init,
                "description": self.description, "default_lr": self.default_lr, "saves": self.saves}


_METHODS: dict[str, MethodInfo] = {}
_TUNERS: dict[str, Any] = {}      # peft_type -> tuner instance
_CONFIGS: dict[str, type] = {}    # peft_type -> config class


def register_method(info: MethodInfo) -> MethodInfo:
    if info.name in _METHODS:
        raise ValueError(f"method {info.name!r} is registered twice")
    _METHODS[info.name] = info
    return info


def register_tuner(peft_type: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator: `@register_tuner("LORA", LoraConfig) class LoraTuner(LayerTuner): ...`."""
    def wrap(tuner_cls: type) -> type:
        _TUNERS[peft_type] = tuner_cls()
        _CONFIGS[peft_type] = config_cls
        return tuner_cls
    return wrap


def _ensure_loaded() -> None:
    # Importing the methods package registers every method file in it.
    import peftlab.methods  # noqa: F401


def get_method(name: str) -> MethodInfo:
    _ensure_loaded()
    key = name.strip().lower().replace("_", "-")
    if key not in _METHODS:
        near = difflib.get_close_matches(key, list(_METHODS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise ValueError(f"unknown method {name!r}.{hint} Registered methods: {', '.join(sorted(_METHODS))}.")
    return _METHODS[key]


def list_methods() -> list[MethodInfo]:
    _ensure_loaded()
    return list(_METHODS.values())


def get_tuner(peft_type: str):
    _ensure_loaded()
    if peft_type not in _TUNERS:
        raise ValueError(f"no tuner implements peft_type {peft_type!r}; known: {', '.join(sorted(_TUNERS))}")
    return _TUNERS[peft_type]


def registered_peft_types() -> list[str]:
    _ensure_loaded()
    return sorted(_TUNERS)


def config_class_for(peft_type: str) -> type:
    _ensure_loaded()
    if peft_type not in _CONFIGS:
        raise ValueError(
            f"adapter_config.json has peft_type {peft_type!r}, which peftlab does not implement; "
            f"known types: {', '.join(sorted(_CONFIGS))}")
    return _CONFIGS[peft_type]
