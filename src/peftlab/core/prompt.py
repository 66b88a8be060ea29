"""Virtual tokens: the machinery prompt tuning, P-tuning, prefix tuning and the prefix hybrids share.

Two ways in, both through `Tuner.prepare_inputs` (so training, evaluation and `generate()` all go through them):
  embeddings  n virtual token embeddings prepended to the input embeddings; attention mask, labels (-100),
              token types and positions grow by n (prompt tuning, P-tuning). The outputs cover the n virtual
              positions too, first, as in HF PEFT: logits are (batch, n + L, vocab), so PEFT code that slices
              `logits[:, n:]` lines up; peftlab's evaluators take the last L positions
  prefix      per-layer key/value prefixes, handed to the model as a transformers `DynamicCache` that already
              holds n positions; the attention mask grows by n, positions start at n (prefix tuning, P-tuning v2)
Encoder-decoder models (SEQ_2_SEQ_LM; HF PEFT's num_transformer_submodules = 2): virtual tokens go in front of
the encoder input only, a prefix into the decoder's self-attention cache only, laid out as HF PEFT does.
The trainable tensors live in `model.prompt_encoder[adapter_name]` (HF PEFT's attribute path): an `embedding`
table, optionally followed by a reparametrisation head used only during training. Saving folds the head away:
the file holds the encoder's output under the single key `prompt_embeddings`, exactly like HF PEFT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from .config import PeftConfig
from .layer import PeftlabModule
from .loading import check_shape
from .tuner import Tuner
from ..hf.modules import pooling_of

SAVED_KEY = "prompt_embeddings"


@dataclass
class PromptLearningConfig(PeftConfig):
    """HF PEFT's PromptLearningConfig fields; the model-dependent ones are filled in from the model."""
    num_virtual_tokens: int = None
    token_dim: int = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_virtual_tokens(self)

    def fill_derived_dims(self) -> None:
        """Fields that default to a model dimension, once fill_model_dims has read it (none here)."""


@dataclass
class EncodedPromptConfig(PromptLearningConfig):
    """A prompt-learning config whose virtual tokens pass through a trained encoder (P-tuning's MLP/LSTM, prefix
    tuning's reparametrisation MLP, MAM's and UniPELT's prefixes): HF PEFT's encoder width field."""
    encoder_hidden_size: Optional[int] = None   # the encoder's hidden width; None: token_dim (HF PEFT's default)

    def fill_derived_dims(self) -> None:
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim


def check_virtual_tokens(cfg) -> None:
    n = cfg.num_virtual_tokens
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"num_virtual_tokens must be a positive integer (the number of virtual tokens to "
                         f"prepend), got {n!r}")


def fill_model_dims(cfg: PromptLearningConfig, model: nn.Module, kv_prefix: bool) -> None:
    """HF PEFT's fix-ups: layers, width and heads from the model config; for key/value prefixes on
    grouped-query attention, token_dim = head_dim · num_key_value_heads and heads = num_key_value_heads."""
    mc = model.config.get_text_config()  # PretrainedConfig's: the text model's config of a multimodal one
    cfg.num_transformer_submodules = _submodules(cfg, mc, kv_prefix)

    def first(*names):
        for n in names:
            if getattr(mc, n, None) is not None:
                return getattr(mc, n)
        raise ValueError(f"cannot read {names[0]} from {type(mc).__name__}; set it in the adapter config")
    if cfg.num_layers is None:
        cfg.num_layers = first("num_hidden_layers", "num_layers", "n_layer")
    if cfg.token_dim is None:
        cfg.token_dim = first("hidden_size", "n_embd", "d_model")
    if cfg.num_attention_heads is None:
        cfg.num_attention_heads = first("num_attention_heads", "n_head", "num_heads")
    if kv_prefix and getattr(mc, "num_key_value_heads", None) is not None:
        head_dim = getattr(mc, "head_dim", None) or cfg.token_dim // cfg.num_attention_heads
        cfg.token_dim = head_dim * mc.num_key_value_heads
        cfg.num_attention_heads = mc.num_key_value_heads
    cfg.fill_derived_dims()


def _submodules(cfg, mc, kv_prefix: bool) -> int:
    """HF PEFT's num_transformer_submodules: 2 (encoder and decoder) for SEQ_2_SEQ_LM, else 1."""
    seq2seq = bool(getattr(mc, "is_encoder_decoder", False))
    if seq2seq and cfg.task_type != "SEQ_2_SEQ_LM":
        raise ValueError(f"prompt methods on an encoder-decoder model ({type(mc).__name__}) need "
                         f"task_type='SEQ_2_SEQ_LM', got {cfg.task_type!r}")
    if not seq2seq and cfg.task_type == "SEQ_2_SEQ_LM":
        raise ValueError(f"task_type='SEQ_2_SEQ_LM' needs an encoder-decoder model; {type(mc).__name__} is not one")
    n = cfg.num_transformer_submodules or (2 if seq2seq else 1)
    # an encoder-decoder prefix with one submodule is a self-attention-only cache, which the decoder's
    # cross-attention would append its keys to (HF PEFT builds it and T5 then fails on a shape mismatch)
    allowed = ((2,) if kv_prefix else (1, 2)) if seq2seq else (1,)
    if n not in allowed:
        what = "key/value prefix" if kv_prefix else "virtual tokens"
        raise ValueError(f"num_transformer_submodules={n} is not supported here ({type(mc).__name__}, {what}); "
                         f"use {' or '.join(map(str, allowed))}")
    return n


def virtual_rows(cfg) -> int:
    """Rows of a virtual-token table: HF PEFT keeps num_virtual_tokens per transformer submodule (its
    encoder-decoder forward reads only the first num_virtual_tokens, the encoder's)."""
    return cfg.num_virtual_tokens * cfg.num_transformer_submodules


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


class PromptEncoders(PeftlabModule, nn.ModuleDict):
    """`model.prompt_encoder`: one encoder per adapter name. Target matching never looks inside it."""
    disabled = False


def encoders(model: nn.Module, create: bool = False) -> Optional[PromptEncoders]:
    found = getattr(model, "prompt_encoder", None)
    if found is None and create:
        found = PromptEncoders()
        model.prompt_encoder = found
    return found


class VirtualTokenEncoder(nn.Module):
    """An (n, width_in) `embedding` table and an optional reparametrisation `head` mapping it to (n, width)."""

    def __init__(self, n: int, width_in: int, head: Optional[nn.Module] = None):
        super().__init__()
        self.embedding = nn.Embedding(n, width_in)
        self.head = head

    def forward(self) -> torch.Tensor:
        table = self.embedding.weight                        # (n, width_in)
        return table if self.head is None else self.head(table)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace table + head by one table holding the head's output (what gets saved)."""
        if self.head is None:
            return
        out = self().detach()
        self.embedding = nn.Embedding(*out.shape).to(out.device)
        self.embedding.weight.copy_(out)
        self.head = None

    def load_folded(self, t: torch.Tensor, where: str) -> None:
        self.fold()
        own = self.embedding.weight
        check_shape(where, SAVED_KEY, t, own, "was it saved for another base model or another num_virtual_tokens?")
        with torch.no_grad():
            own.copy_(t.to(own.dtype))


class VirtualTokenTuner(Tuner):
    """Tuner protocol for methods whose state is one VirtualTokenEncoder per adapter."""
    is_prompt_learning = True
    rewrites_inputs = True
    kv_prefix = False  # prefix methods: token_dim is per-layer key/value width

    def make_encoder(self, model: nn.Module, config) -> VirtualTokenEncoder:
        raise NotImplementedError

    def inject(self, model, config, adapter_name):
        fill_model_dims(config, model, self.kv_prefix)
        enc = self.make_encoder(model, config)
        if config.inference_mode:
            enc.fold()  # loaded for inference: the table holds the saved (folded) output, as in HF PEFT
        enc.to(model.get_input_embeddings().weight.device)
        encoders(model, create=True)[adapter_name] = enc

    def encoder(self, model, adapter_name) -> VirtualTokenEncoder:
        return encoders(model)[adapter_name]

    def export_state(self, model, adapter_name, config):
        return {SAVED_KEY: self.encoder(model, adapter_name)().detach().clone()}

    def import_state(self, model, adapter_name, config, tensors):
        extra = sorted(set(tensors) - {SAVED_KEY})
        if SAVED_KEY not in tensors or extra:
            raise KeyError(f"a {config.peft_type} adapter file holds exactly '{SAVED_KEY}'; this one has "
                           f"{sorted(tensors) or 'nothing'}")
        self.encoder(model, adapter_name).load_folded(tensors[SAVED_KEY], f"adapter {adapter_name!r}")

    def adapter_parameters(self, model, adapter_name):
        yield from self.encoder(model, adapter_name).parameters()

    def set_disabled(self, model, disabled):
        if encoders(model) is not None:
            encoders(model).disabled = disabled

    def remove(self, model, adapter_name):
        box = encoders(model)
        del box[adapter_name]
        if not len(box):
            self.unload(model)

    def unload(self, model):
        if encoders(model) is not None:
            del model.prompt_encoder


# -- the two ways in ---------------------------------------------------------------------------------------
def _cache_len(cache) -> int:
    if cache is None:
        return 0
    from transformers import Cache
    if isinstance(cache, Cache):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple of (key, value) per layer


def _inputs(kwargs: dict, what: str):
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if ids is None and embeds is None:
        raise ValueError(f"{what} needs input_ids=... or inputs_embeds=... as keyword arguments (positional "
                         f"inputs cannot be given virtual tokens)")
    return ids, embeds, (ids if embeds is None else embeds).shape[0], (ids if embeds is None else embeds).shape[1]


def _grow_mask(kwargs: dict, b: int, n: int, length: int, device) -> None:
    """Prepend n attended positions to the attention mask (making one if there was none)."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(b, length, dtype=torch.long, device=device)
    if mask.dim() != 2:
        raise ValueError(f"virtual tokens need a 2-D attention mask (batch, length), got shape {tuple(mask.shape)}")
    kwargs["attention_mask"] = mask
    _prepend_ones(kwargs, "attention_mask", n)


def _prepend_ones(kwargs: dict, key: str, n: int) -> None:
    """n attended positions in front of the mask kwargs[key]."""
    mask = kwargs[key]
    kwargs[key] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def _continuing(kwargs: dict, n: int, length: int, mask_key: str) -> bool:
    """A non-empty cache was passed in: the virtual tokens are already in it (an earlier step put them there).
    Only the mask over the cached positions (`mask_key`, `length` new positions) may still lack their n columns."""
    past = _cache_len(kwargs.get("past_key_values"))
    if past == 0:
        return False
    mask = kwargs.get(mask_key)
    if mask is not None and mask.shape[1] == past + length - n:
        _prepend_ones(kwargs, mask_key, n)
    return True


def prepend_embeddings(model: nn.Module, prompts: torch.Tensor, kwargs: dict, generate: bool) -> dict:
    """prompts (n, d): prepend to the input embeddings of every row."""
    kwargs = dict(kwargs)
    n = prompts.shape[0]
    ids, embeds, b, length = _inputs(kwargs, "prompt tuning")
    seq2seq = is_encoder_decoder(model)  # the encoder input is whole on every call; only it gets the tokens
    if not seq2seq and _continuing(kwargs, n, length, "attention_mask"):
        return kwargs
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)                       # (b, L, d)
    virtual = prompts.to(embeds.dtype).unsqueeze(0).expand(b, -1, -1)   # (b, n, d)
    kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)      # (b, n+L, d)
    kwargs.pop("input_ids", None)
    if generate and ids is not None and not seq2seq:
        kwargs["input_ids"] = ids  # generate() prefills from inputs_embeds and returns input_ids + new tokens
    if generate or kwargs.get("attention_mask") is not None:
        _grow_mask(kwargs, b, n, length, embeds.device)
    if seq2seq:
        return kwargs  # labels and decoder inputs are the decoder's, which sees no virtual tokens
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == length:  # token labels (causal LM)
        kwargs["labels"] = torch.cat([labels.new_full((b, n), -100), labels], dim=1)
    if kwargs.get("token_type_ids") is not None:
        kwargs["token_type_ids"] = torch.cat([kwargs["token_type_ids"].new_zeros(b, n), kwargs["token_type_ids"]], 1)
    if kwargs.get("position_ids") is not None:
        pos = kwargs["position_ids"]
        kwargs["position_ids"] = torch.cat([torch.arange(n, device=pos.device).expand(b, n), pos + n], dim=1)
    if not generate and _reads_last_token(model) and kwargs.get("attention_mask") is not None:
        _left_align(kwargs)
    return kwargs


def _reads_last_token(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification") and pooling_of(model) == "last"


def _left_align(kwargs: dict) -> None:
    """Decoder classification heads read the last position when given embeddings (there are no input_ids to
    find the last real token with), so right-padded rows are moved to the left, with positions that skip the
    padding: each row then computes exactly what it computes unpadded."""
    mask = kwargs["attention_mask"]
    if not bool((mask[:, -1] == 0).any()):
        return
    length = mask.shape[1]
    shift = (mask.flip(1).cumsum(1) > 0).float().argmax(1)                 # number of right pads per row
    idx = (torch.arange(length, device=mask.device).unsqueeze(0) - shift.unsqueeze(1)) % length  # (b, T)
    for key in ("inputs_embeds", "attention_mask", "token_type_ids"):
        t = kwargs.get(key)
        if t is not None:
            kwargs[key] = t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand_as(t))
    m = kwargs["attention_mask"].long()
    kwargs["position_ids"] = (m.cumsum(1) - 1).clamp_min(0)


def prefix_cache(model: nn.Module, kv: torch.Tensor, cfg, batch: int):
    """kv (n, num_layers·2·token_dim) -> a cache holding each layer's key and value prefix, laid out as HF PEFT:
    columns [layer0 key, layer0 value, layer1 key, ...], each num_heads × head_dim. One submodule: a DynamicCache.
    Two (encoder-decoder): PEFT repeats that list of 2·num_layers tensors and deals it out four per decoder layer,
    keeping the first two as that layer's self-attention prefix (decoder layer i gets layer 2i of the repeated
    list, so odd layers' columns are never read) and an empty cross-attention cache, which the decoder fills
    from the encoder output as without a prefix. The encoder gets no prefix."""
    from transformers import DynamicCache, EncoderDecoderCache
    n, heads, per = cfg.num_virtual_tokens, cfg.num_attention_heads, 2 * cfg.num_transformer_submodules
    kv = kv.to(model.get_input_embeddings().weight.dtype)
    kv = kv.view(n, cfg.num_layers * 2, heads, cfg.token_dim // heads).permute(1, 2, 0, 3)  # (2L, H, n, hd)
    kv = kv.repeat(cfg.num_transformer_submodules, 1, 1, 1)                                 # (2L·s, H, n, hd)
    kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)                                        # (2L·s, b, H, n, hd)
    cache = DynamicCache([(kv[i], kv[i + 1]) for i in range(0, kv.shape[0], per)])
    if per == 4:
        cache = EncoderDecoderCache(cache, DynamicCache())
    cache.peftlab_prefix_len = n  # lets hooks (UniPELT's prefix gate) know where the prefix columns are
    return cache


def prepend_prefix(model: nn.Module, kv: torch.Tensor, cfg, kwargs: dict, generate: bool) -> dict:
    kwargs = dict(kwargs)
    n = cfg.num_virtual_tokens
    ids, embeds, b, length = _inputs(kwargs, "prefix tuning")
    cache = kwargs.get("past_key_values")
    if getattr(cache, "peftlab_prefix_len", None) is not None and _cache_len(cache) == cache.peftlab_prefix_len:
        raise ValueError("only one prefix adapter can be active at a time; set_adapter() a single one")
    # the prefix is the decoder's on encoder-decoder models: the encoder mask stays, the decoder's grows (PEFT)
    seq2seq = is_encoder_decoder(model)
    mask_key = "decoder_attention_mask" if seq2seq else "attention_mask"
    if _continuing(kwargs, n, _decoder_length(kwargs) if seq2seq else length, mask_key):
        return kwargs
    if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError("prefix methods hand the prefix to the model as a key/value cache, which gradient "
                         "checkpointing would append to a second time when it recomputes a layer; train them "
                         "without gradient checkpointing")
    kwargs["past_key_values"] = prefix_cache(model, kv, cfg, b)
    if not seq2seq:
        _grow_mask(kwargs, b, n, length, (ids if embeds is None else embeds).device)
    elif kwargs.get(mask_key) is not None:
        _prepend_ones(kwargs, mask_key, n)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n
    return kwargs


def _decoder_length(kwargs: dict) -> int:
    dec = kwargs.get("decoder_input_ids")
    dec = kwargs.get("decoder_inputs_embeds") if dec is None else dec
    return 0 if dec is None else dec.shape[1]
