"""LoraConfig: HF PEFT's LoRA configuration, field for field (rsLoRA, DoRA, PiSSA and CorDA are options of it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ...core.config import PeftConfig

# The config fields that the generic flags --r, --alpha, --dropout set, for every LoRA-family method (MethodInfo).
LORA_FLAG_FIELDS = dict(rank_field="r", alpha_field="lora_alpha", dropout_field="lora_dropout")


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
