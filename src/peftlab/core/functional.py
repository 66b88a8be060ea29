"""Fused autograd kernels for adapted linear layers: the base matmul and the low-rank update in one pass.

Why: an unfused LoRA runs dropout/A/B/scale/add as separate ops that each read or write an N×d tensor and
keep extra N×d temporaries. Here the scale is applied to the N×r tensor u = s·x Aᵀ only, u Bᵀ is written once
and the base matmul accumulates onto it (addmm, beta=1), so the output costs no extra N×d pass or buffer.
Backward saves x (which A's gradient needs anyway) and u (N×r, 4r bytes a row; recomputing it would cost one
more pass over x); no N×d intermediate is saved. Without autograd, many rows go through W + s·BA instead.
A quantised base (core/quantized.py) passes W as a transient dequantised tensor plus `rebuild`, a function
that dequantises it again: the kernels then keep nothing of W for backward and call `rebuild` there.
Shapes: x (N, d_in), W (d_out, d_in), A (r, d_in), B (d_out, r), u (N, r).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .lowrank import LowRankOperands

# A plain module global, not a thread-local: torch.compile reads (and guards on) globals without a graph break.
_PEFT_ORDER = False


@contextlib.contextmanager
def hf_peft_numerics() -> Iterator[None]:
    """Inside this block, LoRA and FourierFT layers outside training compute exactly as HF PEFT does: base output
    + (B(A x))·s (+ x·ΔWᵀ), summed in that order, so outputs equal a PEFT-loaded adapter's bit for bit. Outside
    it (the default) they take the fast kernels below, which round differently: the same function to float
    precision (~1e-6 relative per layer), measurably faster (benchmarks/inference.py)."""
    global _PEFT_ORDER
    before, _PEFT_ORDER = _PEFT_ORDER, True
    try:
        yield
    finally:
        _PEFT_ORDER = before


def peft_order() -> bool:
    """True inside `hf_peft_numerics()`."""
    return _PEFT_ORDER


def _base_onto_lowrank(x2, weight, bias, u, lora_B) -> torch.Tensor:
    """W x + b + u Bᵀ: the thin (N, r) @ (r, d_out) product is written first and the big matmul accumulates onto
    it (addmm with beta=1 reads it inside the compute-bound kernel) — measured ~2–4% faster per layer on CPU
    than the big matmul followed by an in-place low-rank addmm pass over the (N, d_out) output."""
    out = torch.mm(u, lora_B.t()) if bias is None else torch.addmm(bias, u, lora_B.t())
    return out.addmm_(x2, weight.t())


def _lora_backward(ctx, g, x2, weight, lora_A, lora_B, u, s: float):
    """Gradients of out = W x + (s·x Aᵀ) Bᵀ for the output gradient g (N, d_out); only those ctx asks for."""
    grad_x = grad_A = grad_B = None
    need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    if need_x or need_A:
        gb = (g @ lora_B).mul_(s)                          # (N, d_out) @ (d_out, r) -> (N, r), scaled once
        if need_x:  # the low-rank term first, then the big matmul accumulates onto it (beta=1 rides along)
            grad_x = gb @ lora_A                           # (N, r) @ (r, d_in)
            grad_x.addmm_(g, weight)                       # + (N, d_out) @ (d_out, d_in)
        if need_A:
            grad_A = gb.t() @ x2                           # (r, N) @ (N, d_in)
    if need_B:
        grad_B = (u.t() @ g).t()                           # (r, N) @ (N, d_out): the faster orientation on CPU
    return grad_x, grad_A, grad_B


def _kept_weight(weight: torch.Tensor, rebuild) -> Optional[torch.Tensor]:
    """What backward keeps of W: W itself (a parameter, alive anyway), or nothing when it can be rebuilt."""
    return None if rebuild is not None else weight


def _weight_for_backward(saved: Optional[torch.Tensor], rebuild) -> torch.Tensor:
    return saved if rebuild is None else rebuild()


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float, rebuild=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        u = F.linear(x2, lora_A).mul_(scale)               # (N, d_in) -> (N, r)
        out = _base_onto_lowrank(x2, weight, bias, u, lora_B)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[3] else None, _kept_weight(weight, rebuild), lora_A,
                              lora_B, u if ctx.needs_input_grad[4] else None)
        ctx.scale, ctx.has_bias, ctx.x_shape, ctx.rebuild = scale, bias is not None, shape, rebuild
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, lora_A, lora_B, u = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            weight = _weight_for_backward(weight, ctx.rebuild)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x, grad_A, grad_B = _lora_backward(ctx, g, x2, weight, lora_A, lora_B, u, ctx.scale)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_A, grad_B, None, None


class _DoraLinear(torch.autograd.Function):
    """y = c ⊙ (W x + s·B A x) + b with c = m / ‖W + sBA‖_row (the norm a constant, DoRA §4.3).

    Saves the output y instead of z = W x + s·BAx: for gate/up/v projections autograd keeps y anyway. The
    magnitude's gradient is ‖·‖⁻¹ Σ_n g·z with z = (y − b)/c; for columns whose c is exactly zero (m_j = 0) z
    cannot be recovered from y, so those few columns are recomputed from x (nothing is recomputed otherwise).
    Under torch.compile that data-dependent branch is not traceable, so z itself is saved there instead.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, inv_norm, scale: float, rebuild=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        u = F.linear(x2, lora_A).mul_(scale)               # (N, r)
        z = _base_onto_lowrank(x2, weight, None, u, lora_B)  # z = W x + s·B A x, (N, d_out)
        col_scale = magnitude * inv_norm                   # c, (d_out,)
        need_m = ctx.needs_input_grad[5]
        ctx.saved_z = need_m and torch.compiler.is_compiling()
        if ctx.saved_z:
            out = torch.addcmul(bias, z, col_scale) if bias is not None else z * col_scale
        else:
            out = z.mul_(col_scale)
            if bias is not None:
                out.add_(bias)
        keep = (z if ctx.saved_z else out) if need_m else None
        ctx.save_for_backward(x2 if (ctx.needs_input_grad[3] or need_m) else None, _kept_weight(weight, rebuild),
                              lora_A, lora_B, u, col_scale, inv_norm, bias, keep)
        ctx.scale, ctx.x_shape, ctx.rebuild = scale, shape, rebuild
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, lora_A, lora_B, u, col_scale, inv_norm, bias, kept = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            weight = _weight_for_backward(weight, ctx.rebuild)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gs = g * col_scale                                 # gradient through the column scale, (N, d_out)
        grad_x, grad_A, grad_B = _lora_backward(ctx, gs, x2, weight, lora_A, lora_B, u, ctx.scale)
        grad_m = grad_bias = None
        if ctx.needs_input_grad[5]:                        # gs is spent: its memory holds g·y
            grad_m = _dora_magnitude_grad(g, gs, kept, ctx.saved_z, col_scale, inv_norm, bias, x2,
                                          _weight_source(weight, ctx.rebuild), u, lora_B)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_x, None, grad_bias, grad_A, grad_B, grad_m, None, None, None


def _weight_source(weight: Optional[torch.Tensor], rebuild):
    """W on demand, for code that needs it only in a rare branch: the kept W, or a rebuilt one."""
    return (lambda: weight) if weight is not None else rebuild


def _dora_magnitude_grad(g, buf, kept, saved_z: bool, col_scale, inv_norm, bias, x2, weight_of, u, lora_B):
    """∂L/∂m = ‖·‖⁻¹ Σ_n g·z for y = c ⊙ z + b, from the kept z (saved_z) or the kept output y (z = (y − b)/c).
    `buf` (N, d_out) is scratch memory the caller no longer needs. Columns whose c is exactly 0 (m_j = 0) cannot
    recover z from y: those few are recomputed from x and W = weight_of() (nothing is recomputed otherwise)."""
    ones = g.new_ones(g.shape[0])
    gk = ones @ torch.mul(g, kept, out=buf)            # Σ_n g·z (saved z) or Σ_n g·y, (d_out,)
    if saved_z:
        return gk * inv_norm
    if bias is not None:
        gk = gk - (ones @ g) * bias                    # Σ_n g·(y − b)
    zero = col_scale == 0
    gz = gk / torch.where(zero, torch.ones_like(col_scale), col_scale)
    if bool(zero.any()):                               # z of those columns from x, exactly
        idx = zero.nonzero().squeeze(1)
        z_cols = F.linear(x2, weight_of().index_select(0, idx)).addmm_(u, lora_B.index_select(0, idx).t())
        gz = gz.index_copy(0, idx, ones @ (g.index_select(1, idx) * z_cols))
    return gz * inv_norm


# Per member of a sibling group, from its LowRankOperands: weight (d_out, d_in), bias, lora_A (r, d_in),
# lora_B (d_out, r), magnitude and inv_norm (DoRA's m and 1/‖W + sBA‖_row; None for LoRA). Each member's
# rebuild_weight (a quantised base) travels beside them in `rebuilds`.
_SLOTS = 6


class _LowRankGroup(torch.autograd.Function):
    """Sibling layers that read one input x (attention's q/k/v, the MLP's gate/up) as one autograd node:
    y_i = c_i ⊙ (W_i x + s_i·B_i A_i x) + b_i, with c_i = 1 for LoRA members and m_i/‖W_i + s_iB_iA_i‖ for DoRA.

    Why: with r = 16 each thin (N, d)×(d, r) product runs at ~60% of a big GEMM's speed on CPU, and a layer
    alone needs six of them. Stacked, x·[A_1; …; A_k]ᵀ is one product in forward, and in backward
    Σ_i (g_i B_i)·A_i and the stacked A's gradient are one product each; every input-gradient term accumulates
    into one buffer instead of autograd adding k separate (N, d_in) gradients. Same math as k _LoraLinear /
    _DoraLinear nodes (tests/test_siblings.py checks outputs and every gradient against them).
    """

    @staticmethod
    def forward(ctx, x, scales: tuple, rebuilds: tuple, *flat):
        ctx.set_materialize_grads(False)                   # an output nobody used gets None, not a zero tensor
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        members = [flat[i:i + _SLOTS] for i in range(0, len(flat), _SLOTS)]
        ranks = [m[2].shape[0] for m in members]
        lora_A = torch.cat([m[2] for m in members])       # (Σr, d_in)
        u = F.linear(x2, lora_A)                           # (N, d_in) -> (N, Σr): every member's x Aᵀ at once
        us = u.split(ranks, 1)
        outs, saved = [], []
        for (weight, bias, _, lora_B, magnitude, inv_norm), u_i, s, rebuild in zip(members, us, scales, rebuilds):
            u_i.mul_(s)
            if magnitude is None:
                out, col_scale = _base_onto_lowrank(x2, weight, bias, u_i, lora_B), None
            else:
                col_scale = magnitude * inv_norm           # c, (d_out,)
                out = _base_onto_lowrank(x2, weight, None, u_i, lora_B).mul_(col_scale)
                if bias is not None:
                    out.add_(bias)
            outs.append(out.view(*shape[:-1], out.shape[-1]))
            saved += [_kept_weight(weight, rebuild), bias, lora_B, col_scale, inv_norm,
                      out if magnitude is not None else None]
        ctx.save_for_backward(x2, u, lora_A, *saved)
        ctx.scales, ctx.ranks, ctx.x_shape, ctx.rebuilds = scales, ranks, shape, rebuilds
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, u, lora_A, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad[:2] + ctx.needs_input_grad[3:]  # (x, scales, member 0's six slots, ...)
        us = u.split(ctx.ranks, 1)
        flat_grads = [None] * (len(need) - 2)
        grad_x, gbs = None, []
        for i, (g, s, u_i, rebuild) in enumerate(zip(grads, ctx.scales, us, ctx.rebuilds)):
            weight, bias, lora_B, col_scale, inv_norm, kept = saved[i * _SLOTS:(i + 1) * _SLOTS]
            slot = i * _SLOTS
            if g is None:                                  # this member's output was not used
                gbs.append(u.new_zeros(u.shape[0], ctx.ranks[i]))
                continue
            g = g.reshape(-1, g.shape[-1])
            gs = g if col_scale is None else g * col_scale  # the gradient at z = W x + s·B A x, (N, d_out)
            gbs.append((gs @ lora_B).mul_(s))              # (N, d_out) @ (d_out, r) -> (N, r)
            if need[2 + slot + 3]:
                flat_grads[slot + 3] = (u_i.t() @ gs).t()  # (r, N) @ (N, d_out)
            if need[0]:                                    # Σ_i gs_i W_i, accumulated in one buffer
                weight = _weight_for_backward(weight, rebuild)
                grad_x = torch.mm(gs, weight) if grad_x is None else grad_x.addmm_(gs, weight)
            if bias is not None and need[2 + slot + 1]:
                flat_grads[slot + 1] = g.sum(0)
            if col_scale is not None and need[2 + slot + 4]:  # gs (its own tensor for DoRA) is spent: reuse it
                flat_grads[slot + 4] = _dora_magnitude_grad(g, gs, kept, False, col_scale, inv_norm, bias, x2,
                                                            _weight_source(weight, rebuild), u_i, lora_B)
        gb = torch.cat(gbs, 1)                             # (N, Σr)
        if grad_x is not None:
            grad_x = grad_x.addmm_(gb, lora_A).view(ctx.x_shape)  # + Σ_i gb_i A_i as one (N, Σr) @ (Σr, d_in)
        if any(need[2 + i * _SLOTS + 2] for i in range(len(ctx.ranks))):
            for i, grad_A in enumerate((gb.t() @ x2).split(ctx.ranks, 0)):  # (Σr, N) @ (N, d_in)
                flat_grads[i * _SLOTS + 2] = grad_A
        return (grad_x, None, None, *flat_grads)


def lowrank_group(x: torch.Tensor, members: "list[LowRankOperands]") -> tuple[torch.Tensor, ...]:
    """Outputs of sibling layers reading x, one per member's operands (core/lowrank.py). The training path of
    core.siblings."""
    scales = tuple(float(m.scale) for m in members)
    rebuilds = tuple(m.rebuild_weight for m in members)
    flat = [t for m in members for t in (m.weight, m.bias, m.lora_A, m.lora_B, m.magnitude, m.inv_norm)]
    return _LowRankGroup.apply(x, scales, rebuilds, *flat)


def fused_ok(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """The fused path needs one dtype throughout and no autocast (which would change dtypes mid-kernel)."""
    if torch.is_autocast_enabled(x.device.type):
        return False
    return all(t.dtype == x.dtype for t in tensors if t is not None)


def lora_linear(x, weight, bias: Optional[torch.Tensor], lora_A, lora_B, scale: float,
                rebuild=None) -> torch.Tensor:
    """W x + b + s·B A x. weight is (d_out, d_in) (a transposed view for Conv1D is fine); rebuild: how to get it
    again in backward instead of keeping it (a quantised base)."""
    if weight.requires_grad:  # full fine-tuning of W plus LoRA: let autograd handle W's gradient
        return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_A), lora_B)
    if not torch.is_grad_enabled() or not (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        return _lora_inference(x, weight, bias, lora_A, lora_B, scale)
    return _LoraLinear.apply(x, weight, bias, lora_A, lora_B, scale, rebuild)


def _lora_inference(x, weight, bias, lora_A, lora_B, scale: float) -> torch.Tensor:
    """No autograd. Many rows (N·(d_in + d_out) ≥ 2·d_in·d_out, e.g. a prefill): W + s·B A is formed for this
    call only (r·d_in·d_out flops, a transient d_out×d_in tensor, never kept) and one matmul does the rest —
    fewer flops than N·r·(d_in + d_out) and no N×d pass. Few rows (decoding): the low-rank path."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    d_out, d_in = weight.shape
    if x2.shape[0] * (d_in + d_out) >= 2 * d_in * d_out:
        out = F.linear(x2, torch.addmm(weight, lora_B, lora_A, alpha=scale), bias)
    else:
        out = _base_onto_lowrank(x2, weight, bias, F.linear(x2, lora_A).mul_(scale), lora_B)
    return out.view(*shape[:-1], out.shape[-1])


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, inv_norm, scale: float, rebuild=None) -> torch.Tensor:
    """c ⊙ (W x + s·B A x) + b with c = magnitude · inv_norm (inv_norm = 1/‖W + sBA‖_row, a constant)."""
    if weight.requires_grad:  # W trained too: plain autograd, so W gets its gradient
        z = F.linear(x, weight) + scale * F.linear(F.linear(x, lora_A), lora_B)
        out = z * (magnitude * inv_norm)
        return out if bias is None else out + bias
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad
                                              for t in (x, bias, lora_A, lora_B, magnitude)):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out = _base_onto_lowrank(x2, weight, None, F.linear(x2, lora_A).mul_(scale), lora_B)
        out.mul_(magnitude * inv_norm)
        if bias is not None:
            out.add_(bias)
        return out.view(*shape[:-1], out.shape[-1])
    return _DoraLinear.apply(x, weight, bias, lora_A, lora_B, magnitude, inv_norm, scale, rebuild)
