"""MAM adapter (He et al. 2021, "Towards a Unified View of Parameter-Efficient Transfer Learning"): prefix
tuning on attention + a scaled parallel bottleneck adapter beside every feed-forward block.

Paper setting: 30 prefix tokens trained through a reparametrisation MLP (folded away when saved), parallel
adapter bottleneck 512 with scale 4. The pieces are prefix.py's encoder and adapters.py's parallel adapter;
`PrefixAndLayersTuner` (also used by UniPELT) joins a prefix and layer adapters under one adapter name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..core.config import PeftConfig
from ..core.prompt import SAVED_KEY, check_virtual_tokens
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.tuner import Tuner
from .adapters import BottleneckTuner, check_bottleneck_fields, inject_bottlenecks
from .prefix import PrefixTuner


@dataclass
class MamConfig(PeftConfig):
    peft_type: str = "MAM"
    # prefix tuning on attention (PrefixTuningConfig's fields)
    num_virtual_tokens: int = 30
    prefix_projection: bool = True
    encoder_hidden_size: Optional[int] = 512
    init_weights: Optional[str] = None
    token_dim: Optional[int] = None              # filled from the model, as for prefix tuning
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    # parallel adapter beside the FFN (BottleneckConfig's fields)
    bottleneck_size: int = 512
    non_linearity: str = "relu"
    scaling: float = 4.0
    adapter_dropout: float = 0.0
    layers_to_transform: Optional[Union[list[int], int]] = None
    modules_to_save: Optional[list[str]] = None

    adapter_type = "parallel"  # read by adapters.adapter_sites; not a config field

    def __post_init__(self) -> None:
        super().__post_init__()
        check_virtual_tokens(self)
        check_bottleneck_fields(self)


class PrefixAndLayersTuner(Tuner):
    """A key/value prefix plus layer adapters under one adapter name. The prefix is saved folded, under
    `prompt_embeddings` as in prefix tuning; the layer adapters under their module names."""
    prefix = PrefixTuner()
    layers = BottleneckTuner()
    rewrites_inputs = True  # the prefix joins every forward's key/value cache

    def inject_layers(self, model, config, adapter_name) -> None:
        raise NotImplementedError

    def inject(self, model, config, adapter_name):
        self.prefix.inject(model, config, adapter_name)
        self.inject_layers(model, config, adapter_name)

    def prefix_keys(self, key: str) -> bool:
        return key == SAVED_KEY

    def export_state(self, model, adapter_name, config):
        return {**self.prefix.export_state(model, adapter_name, config),
                **self.layers.export_state(model, adapter_name, config)}

    def import_state(self, model, adapter_name, config, tensors):
        mine = {k: v for k, v in tensors.items() if self.prefix_keys(k)}
        self.import_prefix(model, adapter_name, config, mine)
        self.layers.import_state(model, adapter_name, config, {k: v for k, v in tensors.items() if k not in mine})

    def import_prefix(self, model, adapter_name, config, tensors) -> None:
        self.prefix.import_state(model, adapter_name, config, tensors)

    def adapter_parameters(self, model, adapter_name):
        yield from self.prefix.adapter_parameters(model, adapter_name)
        yield from self.layers.adapter_parameters(model, adapter_name)

    def set_active(self, model, names):
        self.layers.set_active(model, names)

    def set_disabled(self, model, disabled):
        self.prefix.set_disabled(model, disabled)
        self.layers.set_disabled(model, disabled)

    def remove(self, model, adapter_name):
        self.prefix.remove(model, adapter_name)
        self.layers.remove(model, adapter_name)

    def unload(self, model):
        self.prefix.unload(model)
        self.layers.unload(model)

    def prepare_inputs(self, model, adapter_name, config, kwargs, generate):
        return self.prefix.prepare_inputs(model, adapter_name, config, kwargs, generate)


@register_tuner("MAM", MamConfig)
class MamTuner(PrefixAndLayersTuner):
    def inject_layers(self, model, config, adapter_name):
        inject_bottlenecks(model, config, adapter_name)


register_method(MethodInfo("mam", MamConfig, category="hybrid", kind="input", mergeable=False,
                           hf_peft_compatible=False, identity_at_init=False,
                           default_lr=1e-3, dropout_field="adapter_dropout",
                           description="prefix tuning on attention + scaled parallel adapter on the FFN "
                                       "(He et al. 2021)"))
