"""LoraConfig: HF PEFT's LoRA configuration, field for field (rsLoRA, DoRA, PiSSA, OLoRA, CorDA, EVA, lora_bias,
trainable tokens, target_parameters and layer replication are options of it; what is not implemented is refused)."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from ...core.config import PeftConfig

# The config fields that the generic flags --r, --alpha, --dropout set, for every LoRA-family method (MethodInfo).
LORA_FLAG_FIELDS = dict(rank_field="r", alpha_field="lora_alpha", dropout_field="lora_dropout")


class SubConfig(dict):
    """A LoraConfig sub-configuration with HF PEFT's fields and defaults (CordaConfig, EvaConfig). A dict, so
    adapter_config.json holds it exactly as PEFT writes it; fields read as attributes too."""
    DEFAULTS: ClassVar[dict] = {}

    def __init__(self, **fields: Any):
        unknown = sorted(set(fields) - set(self.DEFAULTS))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}; fields: {sorted(self.DEFAULTS)}")
        super().__init__({**self.DEFAULTS, **fields})
        self.validate()

    def validate(self) -> None:
        """Raise ValueError for a field value PEFT refuses."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def of(cls, value: Optional[dict]) -> "SubConfig":
        """`value` as this class: a dict read from adapter_config.json, None (the defaults), or one already."""
        return value if isinstance(value, cls) else cls(**(value or {}))


class LoftQConfig(SubConfig):
    """HF PEFT's LoftQConfig: loftq_bits (4: NF4, 8: int8) and loftq_iter (alternating steps, ≥ 1)."""
    DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}

    def validate(self) -> None:
        if self["loftq_bits"] not in (4, 8):
            raise ValueError(f"LoftQConfig: loftq_bits must be 4 (NF4) or 8 (int8), got {self['loftq_bits']}")
        if int(self["loftq_iter"]) < 1:
            raise ValueError(f"LoftQConfig: loftq_iter must be at least 1, got {self['loftq_iter']}")


class EvaConfig(SubConfig):
    """HF PEFT's EvaConfig: rho (max rank rho·r per layer), tau (convergence threshold), use_label_mask and
    label_mask_value (positions left out of the SVD), whiten (A rows divided by √σ), adjust_scaling_factors."""
    DEFAULTS = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
                "adjust_scaling_factors": True}

    def validate(self) -> None:
        if self["rho"] < 1.0:
            raise ValueError(f"EvaConfig: rho must be >= 1.0 (the most rank a layer may get is rho * r), got "
                             f"{self['rho']}")
        if not 0.0 <= self["tau"] <= 1.0:
            raise ValueError(f"EvaConfig: tau is a cosine similarity threshold in [0, 1], got {self['tau']}")


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
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    # Further HF PEFT fields; those of features peftlab lacks (PEFT_ONLY_FIELDS) are refused when set.
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

    # The features beyond plain LoRA that this config class's tuner implements (fields set to a non-default value,
    # and init_lora_weights values). A subclass (AdaLoRA, LoRA-FA, LoRA-dropout) implements none of them unless it
    # declares them itself, so a field its tuner would ignore is refused rather than accepted and dropped.
    implemented_features: ClassVar[frozenset] = frozenset(
        {"lora_bias", "olora", "eva", "loftq", "trainable_token_indices", "target_parameters", "layer_replication"})

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "implemented_features" not in cls.__dict__:
            cls.implemented_features = frozenset()

    def to_lora_config(self) -> "LoraConfig":
        """The plain LoRA config with this one's LoRA fields: what a LoRA variant whose inference outputs are LoRA's
        (LoRA-FA, LoRA-dropout, LoRA-Pro) is for HF PEFT, or to keep training it as plain LoRA."""
        names = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_type"}
        return LoraConfig(**{n: getattr(self, n) for n in names})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self._check_init()
        self._check_features()
        if self.init_lora_weights == "loftq":  # PEFT's rules: a loftq_config is required, else it is dropped
            if not self.loftq_config:
                raise ValueError("init_lora_weights='loftq' needs a loftq_config, e.g. LoftQConfig(loftq_bits=4)")
            self.loftq_config = LoftQConfig.of(dict(self.loftq_config))
        elif self.loftq_config and "loftq" in self.implemented_features:
            warnings.warn("loftq_config is ignored unless init_lora_weights='loftq' (as in HF PEFT)", stacklevel=3)
            self.loftq_config = {}
        if self.init_lora_weights == "eva":  # PEFT fills in the defaults, so the saved file names every field
            self.eva_config = EvaConfig.of(self.eva_config)
        elif self.eva_config is not None and "eva" in self.implemented_features:
            warnings.warn("eva_config is ignored unless init_lora_weights='eva' (as in HF PEFT)", stacklevel=3)

    def _check_init(self) -> None:
        init = self.init_lora_weights
        inits = ["gaussian", "pissa", "corda"] + [i for i in EXTRA_INITS if i in self.implemented_features]
        if not (isinstance(init, bool) or init in inits
                or (isinstance(init, str) and init.startswith("pissa_niter_") and init[12:].isdigit())):
            raise ValueError(f"{type(self).__name__}: init_lora_weights={init!r} is not supported; use True, False, "
                             f"{', '.join(repr(i) for i in inits)} or 'pissa_niter_N'")

    def _check_features(self) -> None:
        features = {**FEATURE_FIELDS, **{name: None for name in PEFT_ONLY_FIELDS}}
        bad = [k for k, feature in features.items() if getattr(self, k) and feature not in self.implemented_features]
        if bad:
            where = "peftlab does not implement" if type(self) is LoraConfig else \
                f"{type(self).__name__} ({self.peft_type}) does not implement"
            raise ValueError(f"LoraConfig: {where} {', '.join(bad)}; leave them at their defaults")
        if self.target_parameters is not None and not isinstance(self.target_parameters, (list, tuple)):
            raise TypeError(f"target_parameters must be a list of '<module>.<parameter>' names, got "
                            f"{self.target_parameters!r}")
        if self.target_parameters and (self.lora_dropout or self.use_dora or self.lora_bias or self.fan_in_fan_out):
            raise ValueError("target_parameters does not combine with lora_dropout, use_dora, lora_bias or "
                             "fan_in_fan_out (HF PEFT refuses them too: the update applies to the weight, not x)")
        if self.target_parameters and self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"target_parameters works with init_lora_weights True, False or 'gaussian' in peftlab, "
                             f"got {self.init_lora_weights!r}")
        if self.lora_bias:
            if self.init_lora_weights not in (True, False):  # HF PEFT's rule
                raise ValueError(f"lora_bias=True works with init_lora_weights=True or False only, got "
                                 f"{self.init_lora_weights!r}")
            if self.use_dora:
                raise ValueError("lora_bias=True does not combine with DoRA; pass use_dora=False")


# init_lora_weights values beyond LoRA's, PiSSA's and CorDA's; each is allowed where implemented_features has it.
EXTRA_INITS = ("olora", "eva", "loftq")
# Fields of features the LoRA tuner implements -> the feature's name in implemented_features.
FEATURE_FIELDS = {"lora_bias": "lora_bias", "trainable_token_indices": "trainable_token_indices",
                  "layer_replication": "layer_replication", "target_parameters": "target_parameters",
                  "loftq_config": "loftq", "eva_config": "eva"}
# Fields HF PEFT writes for features peftlab does not implement; kept for file compatibility, refused when set.
PEFT_ONLY_FIELDS = ("use_qalora", "megatron_config", "alora_invocation_tokens", "use_bdlora", "arrow_config",
                    "kasa_config", "monteclora_config", "velora_config", "lora_ga_config")
