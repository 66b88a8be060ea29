"""MAM adapter (He et al. 2021, "Towards a Unified View of Parameter-Efficient Transfer Learning"): prefix
tuning on attention + a scaled parallel bottleneck adapter beside every feed-forward block.

Paper setting: 30 prefix tokens trained through a reparametrisation MLP (folded away when saved), parallel
adapter bottleneck 512 with scale 4. The config composes prefix.py's PrefixFields and adapters.py's
BottleneckFields (the same fields, MAM's defaults); `PrefixAndLayersTuner` (also used by UniPELT) joins a prefix
and layer adapters under one adapter name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..core.prompt import SAVED_KEY
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.tuner import Tuner
from .adapters import BottleneckConfig, BottleneckFields, BottleneckTuner, as_bottleneck_config
from .prefix import PrefixFields, PrefixTuner


# Bases in this order put the prefix part first, in the fields and in the checks (each part checks after super()).
@dataclass
class MamConfig(BottleneckFields, PrefixFields):
    peft_type: str = "MAM"
    # the paper's setting; every other field keeps prefix tuning's or the bottleneck adapter's default
    num_virtual_tokens: int = 30
    prefix_projection: bool = True
    encoder_hidden_size: Optional[int] = 512
    bottleneck_size: int = 512
    scaling: float = 4.0

    def adapter_config(self) -> BottleneckConfig:
        return as_bottleneck_config(self, adapter_type="parallel")  # beside every feed-forward block


class PrefixAndLayersTuner(Tuner):
    """A key/value prefix plus layer adapters under one adapter name. The prefix is saved folded, under
    `prompt_embeddings` as in prefix tuning; the layer adapters under their module names."""
    prefix = PrefixTuner()
    layers = BottleneckTuner()
    rewrites_inputs = True  # the prefix joins every forward's key/value cache

    def inject_layers(self, model, config, adapter_name) -> None:
        self.layers.inject(model, config.adapter_config(), adapter_name)

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
    """The prefix and the config's parallel adapter, as PrefixAndLayersTuner joins them."""


register_method(MethodInfo("mam", MamConfig, category="hybrid", kind="input", mergeable=False,
                           hf_peft_compatible=False, identity_at_init=False,
                           default_lr=1e-3, dropout_field="adapter_dropout",
                           description="prefix tuning on attention + scaled parallel adapter on the FFN "
                                       "(He et al. 2021)"))
