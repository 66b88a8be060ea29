"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): n trainable virtual tokens prepended to
the input embeddings; P-tuning produces them with a small MLP or bi-LSTM encoder during training.

HF PEFT's PromptTuningConfig / PromptEncoderConfig fields and file layout (one tensor `prompt_embeddings`,
(n · num_transformer_submodules, token_dim): the encoder's output, so a saved P-tuning adapter is the folded
prompt). On encoder-decoder models (SEQ_2_SEQ_LM, two submodules) the first n rows go in front of the encoder
input and the decoder is left alone, as in HF PEFT. The shared virtual-token machinery (masks, labels, generate)
is core/prompt.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..core.prompt import (EncodedPromptConfig, PromptLearningConfig, VirtualTokenEncoder, VirtualTokenTuner,
                           encoders, prepend_embeddings, virtual_rows)
from ..core.registry import MethodInfo, register_method, register_tuner

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    peft_type: str = "PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"      # RANDOM: N(0,1); SAMPLE_VOCAB: random vocabulary rows; TEXT: a text
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None  # a tokenizer directory or an embedded model name
    tokenizer_kwargs: Optional[dict] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper()
        if self.prompt_tuning_init not in INITS:
            raise ValueError(f"prompt_tuning_init must be one of {', '.join(INITS)}, got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not (self.tokenizer_name_or_path and self.prompt_tuning_init_text):
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path "
                             "(a tokenizer directory, or an embedded model name such as 'smollm2-135m')")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ValueError("tokenizer_kwargs only applies with prompt_tuning_init='TEXT'")


@dataclass
class PromptEncoderConfig(EncodedPromptConfig):
    peft_type: str = "P_TUNING"
    encoder_reparameterization_type: str = "MLP"  # "MLP" or "LSTM"
    encoder_num_layers: int = 2                   # LSTM layers (the MLP always has 3 linear layers, as in PEFT)
    encoder_dropout: float = 0.0                  # between LSTM layers

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = str(getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type))
        self.encoder_reparameterization_type = kind.upper()
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', got {kind!r}")


def _tokenizer(cfg: PromptTuningConfig):
    from transformers import AutoTokenizer
    from .. import models
    name = cfg.tokenizer_name_or_path
    path = models.model_path(name) if name in models.EMBEDDED_MODELS else name
    kwargs = {k: v for k, v in (cfg.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    return AutoTokenizer.from_pretrained(path, **kwargs)


def initial_prompt(model: nn.Module, cfg: PromptTuningConfig) -> Optional[torch.Tensor]:
    """(rows, d) rows of the word embedding matrix for SAMPLE_VOCAB / TEXT; None keeps nn.Embedding's N(0, 1)."""
    n, words = virtual_rows(cfg), model.get_input_embeddings()
    if cfg.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, words.num_embeddings, (n,))
    elif cfg.prompt_tuning_init == "TEXT":
        ids = _tokenizer(cfg)(cfg.prompt_tuning_init_text)["input_ids"]
        ids = torch.tensor((ids * math.ceil(n / len(ids)))[:n])  # repeat a short text, cut a long one
    else:
        return None
    with torch.no_grad():
        return words(ids.to(words.weight.device)).detach().float().clone()


class MLPHead(nn.Sequential):
    """P-tuning's MLP encoder: d -> h -> h -> d with ReLUs (HF PEFT's `mlp_head`)."""

    def __init__(self, d: int, h: int):
        super().__init__(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))


class LSTMHead(nn.Module):
    """P-tuning's bi-LSTM encoder over the n virtual tokens, then a 2h -> 2h -> d MLP."""

    def __init__(self, d: int, h: int, layers: int, dropout: float):
        super().__init__()
        self.lstm_head = nn.LSTM(d, h, num_layers=layers, dropout=dropout, bidirectional=True, batch_first=True)
        self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.lstm_head(table.unsqueeze(0))[0][0])  # (n, d) -> (1, n, 2h) -> (n, d)


class _EmbeddingPromptTuner(VirtualTokenTuner):
    def prepare_inputs(self, model, adapter_name, config, kwargs, generate):
        box = encoders(model)
        if box is None or box.disabled:
            return kwargs
        # all rows go through the encoder head (an LSTM reads them all); the first n are the input's
        return prepend_embeddings(model, box[adapter_name]()[:config.num_virtual_tokens], kwargs, generate)


@register_tuner("PROMPT_TUNING", PromptTuningConfig)
class PromptTuningTuner(_EmbeddingPromptTuner):
    def make_encoder(self, model, config):
        enc = VirtualTokenEncoder(virtual_rows(config), config.token_dim)
        init = None if config.inference_mode else initial_prompt(model, config)
        if init is not None:
            with torch.no_grad():
                enc.embedding.weight.copy_(init)
        return enc


@register_tuner("P_TUNING", PromptEncoderConfig)
class PTuningTuner(_EmbeddingPromptTuner):
    def make_encoder(self, model, config):
        d, h = config.token_dim, config.encoder_hidden_size
        if config.encoder_reparameterization_type == "LSTM":
            head = LSTMHead(d, h, config.encoder_num_layers, config.encoder_dropout)
        else:
            head = MLPHead(d, h)
        return VirtualTokenEncoder(virtual_rows(config), d, head)


_PROMPT = dict(category="additive", kind="input", mergeable=False, hf_peft_compatible=True, identity_at_init=False)
register_method(MethodInfo("prompt-tuning", PromptTuningConfig, **_PROMPT,
                           preset={"num_virtual_tokens": 20, "prompt_tuning_init": "SAMPLE_VOCAB"}, default_lr=3e-2,
                           description="trainable virtual-token embeddings prepended to the input (Lester et al. 2021)"))
register_method(MethodInfo("p-tuning", PromptEncoderConfig, **_PROMPT,
                           preset={"num_virtual_tokens": 20, "encoder_reparameterization_type": "MLP"}, default_lr=1e-3,
                           description="virtual tokens produced by an MLP/LSTM prompt encoder (Liu et al. 2021)"))
