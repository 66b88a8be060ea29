"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): trainable key/value prefixes on every layer.

Each layer's attention sees n extra key/value positions in front of the real ones. Prefix tuning trains them
through a reparametrisation MLP (token_dim -> encoder_hidden_size -> num_layers·2·token_dim, tanh) that is
folded away when saved; P-tuning v2 trains the deep prompts directly and is used for classification too.
Both are HF PEFT's PREFIX_TUNING (PrefixTuningConfig fields; `prompt_embeddings` (n, num_layers·2·token_dim)
in the file). With grouped-query attention token_dim is num_key_value_heads·head_dim, as in PEFT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from ..core.prompt import EncodedPromptConfig, VirtualTokenEncoder, VirtualTokenTuner, encoders, prepend_prefix
from ..core.registry import MethodInfo, register_method, register_tuner


@dataclass
class PrefixFields(EncodedPromptConfig):
    """A key/value prefix's settings: PrefixTuningConfig's fields, which MAM and UniPELT compose as well. The
    config itself is the prefix's (not a copy): injecting fills its model dimensions in, and they are saved."""
    init_weights: Optional[str] = None          # None: N(0, 1) as nn.Embedding; "zero": zero keys and values
    prefix_projection: bool = False             # train through the MLP (Li & Liang); folded away on save

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")


@dataclass
class PrefixTuningConfig(PrefixFields):
    peft_type: str = "PREFIX_TUNING"


def make_prefix_encoder(cfg: PrefixFields) -> VirtualTokenEncoder:
    """The prefix's (n, num_layers·2·token_dim) table, behind the reparametrisation MLP when prefix_projection."""
    n, d, width = cfg.num_virtual_tokens, cfg.token_dim, cfg.num_layers * 2 * cfg.token_dim
    if cfg.prefix_projection and not cfg.inference_mode:
        head = nn.Sequential(nn.Linear(d, cfg.encoder_hidden_size), nn.Tanh(), nn.Linear(cfg.encoder_hidden_size, width))
        enc = VirtualTokenEncoder(n, d, head)
        last = head[-1]
    else:
        enc = VirtualTokenEncoder(n, width)
        last = enc.embedding
    if cfg.init_weights == "zero":
        for p in last.parameters():
            nn.init.zeros_(p)
    return enc


@register_tuner("PREFIX_TUNING", PrefixTuningConfig)
class PrefixTuner(VirtualTokenTuner):
    kv_prefix = True

    def make_encoder(self, model, config):
        return make_prefix_encoder(config)

    def prepare_inputs(self, model, adapter_name, config, kwargs, generate):
        box = encoders(model)
        if box is None or box.disabled:
            return kwargs
        return prepend_prefix(model, box[adapter_name](), config, kwargs, generate)


_PREFIX = dict(category="additive", kind="input", mergeable=False, hf_peft_compatible=True, identity_at_init=False,
               default_lr=1e-2)
register_method(MethodInfo("prefix-tuning", PrefixTuningConfig, **{**_PREFIX, "default_lr": 1e-3},
                           preset={"num_virtual_tokens": 20, "prefix_projection": True},
                           description="per-layer key/value prefixes trained through an MLP, folded on save "
                                       "(Li & Liang 2021)"))
# P-tuning v2 starts from zero keys and values: nn.Embedding's N(0, 1) prefixes on all 30 layers of SmolLM2 push
# general-English perplexity from 133 to ~41,000 before training, and 40 steps of the demo task then reach 0%
# exact match; zero prefixes reach 43% (benchmarks/method_table.py). HF PEFT loads the file (it drops the
# init_weights field it does not know, with a warning).
register_method(MethodInfo("p-tuning-v2", PrefixTuningConfig, **_PREFIX,
                           preset={"num_virtual_tokens": 20, "prefix_projection": False, "init_weights": "zero"},
                           description="deep prompts: trainable key/value prefixes on every layer, also for "
                                       "classification (Liu et al. 2022)"))
