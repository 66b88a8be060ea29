"""TTMM, test-time model merging (Bertolissi, Hübotter, Hakimi & Krause 2025, "Local Mixtures of Experts: Essentially
Free Test-Time Training via Model Merging"; reference: github.com/rbertolissi/ttmerge).

Train time: the training data is clustered by sentence embedding (bisecting k-means), one LoRA is trained per
cluster, and cluster k's centroid φ_k is the normalised mean of its members' normalised embeddings
(`cluster_texts`, `centroids`; `peftlab compose ttmm` runs the whole recipe). Test time, per request: φ* = the
normalised embedding of the prompt's first `prefix_length` tokens (decoded by the model's tokenizer, embedded by a
sentence encoder: mean-pooled, as sentence-transformers does), then the reference's sparse cross-attention

    κ_k = exp(−(1 − φ*·φ_k) / β²),   w = κ / Σκ,   keep the experts with w_k > τ (at most max_merge_count, by κ),
    renormalise the kept weights to sum 1;   none kept: the base model;   w not finite: the nearest expert alone

and the request runs with W + Σ_k w_k s_k B_k A_k, the kept experts merged. The reference merges into W for a batch
of one prompt and restores it afterwards; here every row of a batch gets its own merge without writing W: each
layer adds Σ_k w_rk s_k B_k (A_k x) for row r, over the experts some row keeps, which is the merged model's output
exactly (linear in ΔW) with no per-row weight copy. `generate()` weighs the prompt once and keeps the weights for
every new token. Nothing needs training (the experts are finished LoRAs; their factors stay trainable, for a
user who fine-tunes the mixture further; the centroids never train); not mergeable into one W (the weights
change per request). Saved as one TTMM adapter: every expert's factors (B pre-scaled by its s_k, ranks padded to
the largest) and the centroids.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.adapter_files import source_name
from ..core.config import PeftConfig
from ..core.registry import MethodInfo, register_method, register_tuner
from ..core.routing import RoutedAdapter, RoutedLayerTuner, RoutingContext, prompt_mask
from ..core.targets import linear_features
from .smile import lora_deltas


@dataclass
class TTMMConfig(PeftConfig):
    peft_type: str = "TTMM"
    # The experts: LoRA adapter directories (or train runs), one per cluster, and their centroids (one embedding
    # each, from `centroids()`). Read when the adapter is created; the saved adapter holds both.
    expert_dirs: Optional[list] = None
    centroids: Optional[list] = None
    beta: float = 0.2                 # the kernel's width (the reference's β; the exponent divides by β²)
    tau: float = 0.01                 # sparsity: experts whose normalised weight is at most τ are left out
    max_merge_count: int = 50
    prefix_length: int = 50           # prompt tokens embedded for the query
    encoder: str = "minilm-l6"        # sentence encoder: an embedded model name or a local encoder directory
    tokenizer: Optional[str] = None   # the model's tokenizer (to decode prompts); None: config._name_or_path
    num_experts: Optional[int] = None
    expert_names: Optional[list] = None
    r: Optional[int] = None           # filled in: the experts' largest rank
    embedding_dim: Optional[int] = None
    target_modules: Optional[list] = None   # filled in: every layer some expert adapts

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert_dirs:
            self.num_experts = len(self.expert_dirs)
        if self.beta <= 0 or not 0 <= self.tau < 1 or self.max_merge_count < 1 or self.prefix_length < 1:
            raise ValueError(f"TTMMConfig: need beta > 0, 0 <= tau < 1, max_merge_count >= 1, prefix_length >= 1; "
                             f"got beta={self.beta}, tau={self.tau}, max_merge_count={self.max_merge_count}, "
                             f"prefix_length={self.prefix_length}")
        if self.expert_dirs and (self.centroids is None or len(self.centroids) != len(self.expert_dirs)):
            raise ValueError(f"TTMMConfig: {len(self.expert_dirs)} expert_dirs need as many centroids (one "
                             f"embedding per expert, from peftlab.methods.ttmm.centroids); got "
                             f"{None if self.centroids is None else len(self.centroids)}")


# -- the embedding side: sentence encoder, clusters, centroids, merge weights ---------------------------------
class SentenceEncoder:
    """Normalised mean-pooled last hidden states of an encoder (all-MiniLM-L6-v2's sentence embedding)."""

    def __init__(self, name_or_path: str = "minilm-l6", device=None):
        from ..models import load_model
        self.model, self.tokenizer = load_model(name_or_path, task="encoder")
        self.model.eval().to(device or "cpu")

    @torch.no_grad()
    def __call__(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=256,
                                 return_tensors="pt").to(device)
            h = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(F.normalize((h * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1).float())
        return torch.cat(out)


def cluster_texts(embeddings: torch.Tensor, k: int, seed: int = 0) -> list[int]:
    """A cluster index per row, by scikit-learn's bisecting k-means (the paper's choice: balanced clusters)."""
    from sklearn.cluster import BisectingKMeans
    if not 1 <= k <= embeddings.shape[0]:
        raise ValueError(f"TTMM: cannot make {k} clusters of {embeddings.shape[0]} examples")
    return BisectingKMeans(n_clusters=k, random_state=seed).fit_predict(embeddings.double().numpy()).tolist()


def centroids(embeddings: torch.Tensor, assignment: list[int], k: int) -> torch.Tensor:
    """φ_k = normalise(mean of cluster k's normalised embeddings), (k, D)."""
    a = torch.tensor(assignment)
    return torch.stack([F.normalize(embeddings[a == c].mean(0), dim=0) for c in range(k)])


def merge_weights(query: torch.Tensor, cents: torch.Tensor, beta: float, tau: float, max_count: int) -> torch.Tensor:
    """The reference's sparse cross-attention, per row: (B, D) normalised queries -> (B, K) expert weights."""
    sims = query @ cents.t()
    kernel = torch.exp(-(1 - sims) / beta ** 2)
    norm = kernel / kernel.sum(-1, keepdim=True)
    keep = norm > tau
    if keep.shape[1] > max_count:   # the max_count largest kernels, where more pass τ
        top = kernel.topk(max_count, dim=-1).indices
        keep &= torch.zeros_like(keep).scatter(1, top, True)
    w = torch.where(keep, norm, torch.zeros_like(norm))
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    bad = ~torch.isfinite(norm).all(-1)
    if bad.any():   # the kernel overflowed (a tiny β): the reference falls back to the most similar expert
        w[bad] = F.one_hot(sims[bad].argmax(-1), cents.shape[0]).to(w.dtype)
    return w


# -- the layers ----------------------------------------------------------------------------------------------
class RequestWeights(RoutingContext):
    """Each row's expert weights for this request (B, K), set before the forward / generate."""

    def __init__(self):
        super().__init__()
        self.weights: Optional[torch.Tensor] = None


class TTMMLinear(RoutedAdapter):
    """K frozen LoRA experts on one layer: A (K, r, d_in), B (K, d_out, r) holding s_k B_k."""
    merge_refused = ("its experts are merged per request, with weights from each prompt: there is no single ΔW to "
                     "fold into W; keep it unmerged (merge_and_unload is refused too)")

    def __init__(self, d_in: int, d_out: int, experts: int, r: int, dim: Optional[int], context: RequestWeights):
        super().__init__(context)
        self.lora_A = nn.Parameter(torch.zeros(experts, r, d_in))
        self.lora_B = nn.Parameter(torch.zeros(experts, d_out, r))
        # the first adapted layer keeps the centroids (so they are saved once)
        self.centroids = None if dim is None else nn.Parameter(torch.zeros(experts, dim), requires_grad=False)

    def forward(self, x: torch.Tensor, base_layer: nn.Module, result: torch.Tensor) -> torch.Tensor:
        w = self.context.weights
        if w is None:
            raise RuntimeError("TTMM: no merge weights for this batch; call the model through the PeftModel (its "
                               "forward and generate weigh each prompt first)")
        if x.shape[0] != w.shape[0]:
            raise ValueError(f"TTMM weighed {w.shape[0]} prompts but this layer sees {x.shape[0]} rows; beam search "
                             f"and other row expansions are not supported")
        used = w.abs().sum(0).nonzero().squeeze(-1)
        if used.numel() == 0:
            return result        # no expert close enough for any row: the base model
        a, b, wu = self.lora_A[used].to(x.dtype), self.lora_B[used].to(x.dtype), w[:, used].to(x.dtype)
        h = torch.einsum("b...i,kri->b...kr", x, a)                          # every kept expert's A_k x
        h = h * wu.view(wu.shape[0], *([1] * (x.dim() - 2)), wu.shape[1], 1)   # row r's weight w_rk
        return result + torch.einsum("b...kr,kor->b...o", h, b).to(result.dtype)


@register_tuner("TTMM", TTMMConfig)
class TTMMTuner(RoutedLayerTuner):
    def inject(self, model, config: TTMMConfig, adapter_name):
        if not config.expert_dirs and config.expert_names is None:
            raise ValueError("TTMM needs its experts: expert_dirs (LoRA adapters, one per cluster of the training data) "
                             "and their centroids; `peftlab compose ttmm --model M --task T --clusters K --output DIR` "
                             "clusters the data, trains them and builds the adapter")
        self._context, self._first = RequestWeights(), True
        self._pending: dict[str, list] = {}
        if config.expert_dirs:
            per_expert = [lora_deltas(d)[0] for d in config.expert_dirs]
            config.r = max(b.shape[1] for e in per_expert for b, _, _ in e.values())
            config.target_modules = sorted(set().union(*per_expert))
            self._pending = {m: [e.get(m) for e in per_expert] for m in config.target_modules}
            config.embedding_dim = len(config.centroids[0])
        super().inject(model, config, adapter_name)
        if config.expert_dirs:
            first = next(layer for _, layer in self._layers_with(model, adapter_name)).adapters[adapter_name]
            with torch.no_grad():
                first.centroids.copy_(F.normalize(torch.tensor(config.centroids, dtype=torch.float32), dim=-1))
            config.expert_names = config.expert_names or [source_name(d) for d in config.expert_dirs]
            config.expert_dirs = config.centroids = None   # both now live in this adapter's own file

    def create_adapter(self, base_layer, config: TTMMConfig, module_name: str, adapter_name: str):
        d_in, d_out, _ = linear_features("TTMM", base_layer, module_name)
        dim, self._first = (config.embedding_dim if self._first else None), False
        adapter = TTMMLinear(d_in, d_out, config.num_experts, config.r, dim, self._context)
        with torch.no_grad():
            for e, factors in enumerate(self._pending.pop(module_name, None) or []):
                if factors is not None:   # an expert that leaves this layer alone stays zero here
                    b, a, scale = factors
                    adapter.lora_A[e, : a.shape[0]] = a
                    adapter.lora_B[e, :, : b.shape[1]] = b * scale
        return adapter.to(base_layer.weight.device)

    def adapter_parameters(self, model, adapter_name):
        # TTMM itself trains nothing (finished experts, weights from the prompt); the experts stay trainable for a
        # user who fine-tunes the mixture further, as any adapter's tensors. The centroids are data, never trained.
        for _, layer in self._layers_with(model, adapter_name):
            adapter = layer.adapters[adapter_name]
            yield adapter.lora_A
            yield adapter.lora_B

    def prepare_inputs(self, model, adapter_name, config, kwargs, generate):
        kwargs = super().prepare_inputs(model, adapter_name, config, kwargs, generate)
        if "input_ids" not in kwargs:
            raise ValueError("TTMM weighs each prompt by its text: call the model with input_ids")
        texts = self.prompt_texts(model, config, kwargs)
        query = _encoder(config.encoder, str(kwargs["input_ids"].device))(texts)
        cents = self._centroids(model, adapter_name)
        self.routing_contexts(model, adapter_name)[0].weights = merge_weights(
            query.to(cents.device), cents.float(), config.beta, config.tau, config.max_merge_count)
        return kwargs

    def prompt_texts(self, model, config: TTMMConfig, kwargs) -> list[str]:
        """Each row's first prefix_length real tokens before its first labelled token (a training record's
        prompt; the whole row when nothing is labelled), decoded without special tokens."""
        tokenizer = _tokenizer(config.tokenizer or model.config._name_or_path)
        ids = kwargs["input_ids"]
        real = prompt_mask(kwargs.get("attention_mask"), kwargs.get("labels"), ids.shape).to(ids.device)
        return [tokenizer.decode(row[keep][: config.prefix_length].tolist(), skip_special_tokens=True)
                for row, keep in zip(ids, real)]

    def _centroids(self, model, adapter_name) -> torch.Tensor:
        return next(layer.adapters[adapter_name].centroids for _, layer in self._layers_with(model, adapter_name)
                    if layer.adapters[adapter_name].centroids is not None)


# Loaded once per process and kept outside the model (a tuner is shared by every model of its type): the encoder
# is not part of the adapter, so it is never saved, trained, merged or moved with the model.
@functools.lru_cache(maxsize=4)
def _encoder(name_or_path: str, device: str) -> SentenceEncoder:
    return SentenceEncoder(name_or_path, device)


@functools.lru_cache(maxsize=8)
def _tokenizer(name_or_path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(name_or_path)


register_method(MethodInfo(
    "ttmm", TTMMConfig, category="moe", kind="activation", mergeable=False, identity_at_init=False,
    trains_on="lora",
    description="test-time model merging: one LoRA per cluster of the training data; each prompt merges the "
                "experts whose centroids are near its embedding (Bertolissi et al. 2025)"))
