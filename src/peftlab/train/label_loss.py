"""The causal-LM training loss computed only where there are labels: LM head and cross-entropy on the hidden states
of the positions whose next token is a label, in row chunks, so the (positions, vocab) logits never exist whole.

On completion-only data (prompt/completion records) a handful of the batch's positions carry labels; the stock
forward multiplies every kept position by the (vocab × hidden) head and keeps the logits and their gradient alive
until the backward. Here the model's head is swapped for the identity during the training forward, and the
model's own `loss_function` (transformers calls it with the head's output and the labels it was given, after any
method's input changes such as prompt tuning's virtual tokens) is swapped for `gathered_causal_lm_loss`, which
gathers the labelled positions and applies the real head and the loss to them. The loss is the one transformers'
ForCausalLMLoss computes (mean over the label tokens, position p predicting label p + 1), the gradients the same.

Only for model classes whose forward applies the head and then the loss with nothing in between (GATHER_SAFE:
no logit soft-capping or scaling) and whose head is a frozen plain nn.Linear (an adapter or a trained copy on
the head keeps the stock path).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# model_type -> the attribute holding the LM head; each class's forward is `logits = self.<head>(hidden)` followed
# directly by `self.loss_function(logits, labels, ...)` (checked in transformers 5.x; Granite, Cohere and Gemma 2+
# rescale or soft-cap the logits in between and are left out)
GATHER_SAFE = {name: "lm_head" for name in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                                            "phi", "phi3", "olmo2", "smollm3", "gemma", "gpt_neox", "gpt2")}
CHUNK_BYTES = 64 * 2 ** 20   # fp32 logits materialised at once (rows × vocab × 4 bytes)


def head_of(hf_model: nn.Module) -> Optional[nn.Linear]:
    """The model's LM head when the gathered loss applies to it (see the module docstring), else None."""
    from transformers import PreTrainedModel
    if not isinstance(hf_model, PreTrainedModel):   # e.g. HF PEFT's wrapper: its head lives on the model inside
        return None
    config = getattr(hf_model, "config", None)
    attr = GATHER_SAFE.get(getattr(config, "model_type", None))
    head = getattr(hf_model, attr, None) if attr else None
    if type(head) is not nn.Linear or any(p.requires_grad for p in head.parameters()):
        return None
    if type(hf_model).__name__.endswith("ForCausalLM") or type(hf_model).__name__ == "GPT2LMHeadModel":
        return head
    return None


def _chunk_logits(h_rows: torch.Tensor, weight, bias, dtype) -> torch.Tensor:
    """fp32 logits of a chunk of rows, the matmul in `dtype` (the weight and bias already cast to it)."""
    return F.linear(h_rows.to(dtype), weight, bias).float()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, t_i) over row chunks; the backward recomputes each chunk's logits (when there is more
    than one chunk) instead of keeping them, so peak memory is one chunk of logits. The head is frozen: gradients
    flow to h only."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, dtype, chunk):
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        total = h.new_zeros((), dtype=torch.float32)
        lse_all, kept = [], []
        for s in range(0, h.shape[0], chunk):
            logits = _chunk_logits(h[s:s + chunk], w, b, dtype)
            lse = torch.logsumexp(logits, -1)
            total = total + (lse - logits.gather(1, targets[s:s + chunk, None]).squeeze(1)).sum()
            lse_all.append(lse)
            if h.shape[0] <= chunk:
                kept.append(logits)     # one chunk: keep its logits for the backward rather than recompute them
        ctx.save_for_backward(h, weight, bias, targets, torch.cat(lse_all))
        ctx.dtype, ctx.chunk, ctx.kept = dtype, chunk, kept
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, weight, bias, targets, lse = ctx.saved_tensors
        w, b = weight.to(ctx.dtype), None if bias is None else bias.to(ctx.dtype)
        grad_h = torch.empty_like(h)
        for i, s in enumerate(range(0, h.shape[0], ctx.chunk)):
            rows = slice(s, s + ctx.chunk)
            logits = ctx.kept[i] if ctx.kept else _chunk_logits(h[rows], w, b, ctx.dtype)
            # d(lse - z_t)/dz = softmax(z) - onehot(t)
            g = torch.exp(logits - lse[rows, None])
            g.scatter_add_(1, targets[rows, None], torch.full_like(lse[rows, None], -1.0))
            grad_h[rows] = (g.mul_(grad_total).to(ctx.dtype) @ w).to(h.dtype)
        ctx.kept = []
        return grad_h, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of head(h) against targets (rows of h: (N, hidden); targets: (N,)), chunked over rows.
    The matmul runs in the autocast dtype when autocast is on (as the stock head would), the softmax in fp32."""
    if targets.numel() == 0:   # no labelled position in the batch: a zero loss (the stock one would be 0/0 = nan)
        return h.sum() * 0.0
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else head.weight.dtype
    chunk = max(1, CHUNK_BYTES // (4 * head.out_features))
    return _LinearCrossEntropy.apply(h, head.weight, head.bias, targets, dtype, chunk) / targets.numel()


def gathered_causal_lm_loss(head: nn.Linear):
    """A `loss_function` for a model whose head is the identity: logits are the final hidden states (B, S, hidden)."""
    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, **_):
        hidden = logits
        next_labels = F.pad(labels, (0, 1), value=ignore_index)[:, 1:].to(hidden.device)  # position p predicts p+1
        keep = next_labels != ignore_index
        loss = linear_cross_entropy(hidden[keep], head, next_labels[keep])
        if num_items_in_batch is not None:   # transformers' convention: the sum over the tokens / this count
            loss = loss * keep.sum() / num_items_in_batch
        return loss
    return loss_function


@contextlib.contextmanager
def gathered_loss(hf_model: nn.Module, head: nn.Linear):
    """Inside: hf_model's forward returns the final hidden states as `logits` and the gathered loss as `loss`."""
    attr = GATHER_SAFE[hf_model.config.model_type]
    had_own = "_loss_function" in vars(hf_model)
    own = vars(hf_model).get("_loss_function")
    setattr(hf_model, attr, nn.Identity())
    hf_model.loss_function = gathered_causal_lm_loss(head)
    try:
        yield
    finally:
        setattr(hf_model, attr, head)
        if had_own:
            hf_model.loss_function = own
        else:
            del hf_model._loss_function
