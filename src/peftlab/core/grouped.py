"""Routed low-rank experts, two ways: grouped by expert (only routed experts computed) or dense (every expert's
thin down-projection, then one matmul of the routed ones' weighted products).

  y_t = into_t + Σ_j g_tj · s · B_{e_tj} A_{e_tj} x_t            x (N, d_in), g/e (N, k)
  A (E, r, d_in), B (E, r, d_out) (stored so [B_1 … B_E]ᵀ is a view); slots e ≥ E (the zero expert) add nothing and cost nothing.

The N·k assignments are sorted by expert once (stable) and laid out as E segments of C = the largest expert's
count (padding slots point at row 0 with weight 0, so they add and receive nothing); then every expert's
segment is multiplied at once by `torch.bmm`, (E, C, d_in) × (E, d_in, r) and (E, C, r) × (E, r, d_out). One
batched call instead of one small matmul per expert matters on CPU, where a thin matmul costs its thread
start-up more than its arithmetic. Only routed experts are computed: the work is E·C ≈ N·k rows, not N·E.
One autograd node per layer (`_GroupedLowRank`) computes the routed rows' updates: it saves x (which the
expert gradients need anyway), the index and the thin (E, C, r) products, never a (routed, d) intermediate; the
rows are gathered again in backward. The updates are accumulated into `into` (the base output) in place, so
they cost no extra pass over an (N, d_out) tensor.

`dense_lowrank` instead computes u = x [A_1; …; A_E]ᵀ (N, E·r) for every expert, zeroes the blocks of the experts
a token is not routed to (scaling the others by g·s), and adds u [B_1 … B_E]ᵀ to the base output with one addmm:
E/k times the adapter arithmetic of the grouped form, but two dense matmuls and no (N·k, d) gathers. For a small
E·r (8 experts of r = 8: 64 columns, ~11% of a 576-wide base matmul) it is the faster form on CPU, where the
gathers and thin batched matmuls cost more than the arithmetic they save (benchmarks/results/moe_step.md).
Both are tested against plain per-token code in tests/test_mixtures.py.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Dispatch(NamedTuple):
    rows: torch.Tensor       # (E·C,) the token of each padded assignment slot, grouped by expert (0 for padding)
    order: torch.Tensor      # (E·C,) its index in the flattened (N·k) assignments (N·k for padding)
    valid: torch.Tensor      # (E·C,) False for padding
    capacity: int            # C: the largest expert's number of assignments


def dispatch(idx: torch.Tensor, experts: int) -> Dispatch:
    """Sort the (N, k) slot assignments by expert into E padded segments; slots ≥ experts are dropped."""
    n, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts)[:experts]
    cap = int(counts.max()) if experts else 0
    routed = int(counts.sum())
    order = order[:routed]                                           # the zero expert's assignments sort last
    expert = flat.index_select(0, order)                             # (routed,) non-decreasing
    starts = torch.cumsum(counts, 0) - counts                        # (E,)
    slot = expert * cap + (torch.arange(routed, device=idx.device) - starts.index_select(0, expert))
    padded_order = torch.full((experts * cap,), n * k, dtype=order.dtype, device=idx.device)
    padded_order[slot] = order
    valid = padded_order < n * k
    rows = torch.where(valid, torch.div(padded_order, k, rounding_mode="floor"), 0)
    return Dispatch(rows, padded_order, valid, cap)


class _GroupedLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, lora_A, lora_B, d: Dispatch, scale: float):
        e, cap = lora_A.shape[0], d.capacity
        xs = x.index_select(0, d.rows).view(e, cap, -1)                  # (E, C, d_in)
        w_ext = torch.cat([weights.reshape(-1), weights.new_zeros(1)])   # padding reads the appended 0
        g = (w_ext.index_select(0, d.order).to(x.dtype) * scale).view(e, cap, 1)
        u = torch.bmm(xs, lora_A.transpose(1, 2))                        # (E, C, r)
        ys = torch.bmm(u * g, lora_B)                                    # (E, C, d_out)
        ctx.save_for_backward(x, weights, lora_A, lora_B, u, g)
        ctx.d, ctx.scale = d, scale
        return ys.view(e * cap, -1)

    @staticmethod
    def backward(ctx, grad_out):
        x, weights, lora_A, lora_B, u, g = ctx.saved_tensors
        d = ctx.d
        e, cap = lora_A.shape[0], d.capacity
        gy = grad_out.to(x.dtype).view(e, cap, -1)                       # (E, C, d_out)
        xs = x.index_select(0, d.rows).view(e, cap, -1)
        d_ug = torch.bmm(gy, lora_B.transpose(1, 2))                     # d(loss)/d(g·u), (E, C, r)
        grad_B = torch.bmm((u * g).transpose(1, 2), gy)                  # (E, r, d_out)
        du = d_ug * g
        grad_A = torch.bmm(du.transpose(1, 2), xs)                       # (E, r, d_in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_xs = torch.bmm(du, lora_A).view(e * cap, -1)            # padding rows are 0 (g = 0)
            grad_x = torch.zeros_like(x).index_add_(0, d.rows, grad_xs)
        grad_w = None
        if ctx.needs_input_grad[1]:
            gw = (d_ug * u).sum(-1).reshape(-1) * ctx.scale              # d/dg of g·s·(B A x), (E·C,)
            grad_w = torch.zeros(weights.numel() + 1, dtype=weights.dtype, device=weights.device)
            grad_w.index_put_((d.order,), gw.to(weights.dtype))
            grad_w = grad_w[:-1].view_as(weights)                        # the padding slot's entry goes
        return grad_x, grad_w, grad_A, grad_B, None, None


def grouped_lowrank(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scale: float, into: torch.Tensor, slots: int = 0) -> torch.Tensor:
    """into + Σ_j g_j · s · B_{e_j} A_{e_j} x per token (see the module docstring); `into` is written in place.
    (`slots` is dense_lowrank's; slot indices ≥ E are dropped here whatever their number.)"""
    d = dispatch(idx, lora_A.shape[0])
    if d.capacity == 0:
        return into
    ys = _GroupedLowRank.apply(x, weights, lora_A, lora_B, d, scale)
    # in place into the base output (autograd's own index_add_, which handles `into` being a view): no extra
    # (N, d_out) pass; its backward gathers the output gradient of the routed rows
    return into.index_add_(0, d.rows, ys.to(into.dtype))


def dense_lowrank(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, lora_A: torch.Tensor,
                  lora_B: torch.Tensor, scale: float, into: torch.Tensor, slots: int,
                  u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same sum as grouped_lowrank with every expert's down-projection computed (see the module docstring);
    `slots`: the router's width (E, or E + 1 with a zero expert); `u`: x [A_1; …; A_E]ᵀ if the caller has it."""
    e, r = lora_A.shape[:2]
    gate = torch.zeros(x.shape[0], slots, dtype=x.dtype, device=x.device).scatter(1, idx, weights.to(x.dtype))
    u = x @ lora_A.reshape(e * r, -1).t() if u is None else u                    # (N, E·r)
    h = (u.view(-1, e, r) * (gate[:, :e] * scale).unsqueeze(-1)).view(-1, e * r)  # zero zero-expert slots dropped
    return into.addmm_(h.to(into.dtype), lora_B.reshape(e * r, -1).to(into.dtype))    # (E·r, d_out): a view
