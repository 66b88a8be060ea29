"""Mixed-adapter batches: rows grouped by adapter once per forward, then each layer adds every group's update.

`RowGroups` is built once per forward (PeftModel): adapter names -> a code per row, and per adapter its rows as
a slice when they are contiguous (no copy needed) or else an index tensor. Each AdaptedLayer then takes one of
two paths:
- low-rank path, for adapters that implement the low-rank operand protocol (core/lowrank.py): output
  c ⊙ (base(x) − b + s·B A x) + b (LoRA: c = 1; DoRA: c = m/‖W + sBA‖): the factors of the adapters are
  stacked (zero factors for rows on the base model), gathered per row, and applied to all rows at once by
  two batched matmuls accumulated into the base output — no gather or scatter of activations, no per-row
  Python. Used when a row has at least r tokens (else gathering r×(d_in+d_out) weights per row costs more
  than gathering the row's activations, e.g. while decoding one token at a time).
- generic path, for any other adapter (or short rows): each adapter runs once on its rows (a view when they
  are contiguous), and the results are written back with one index_copy.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F

from .tuner import adapted_layers

Rows = Union[slice, torch.Tensor]


class RowGroups:
    """The batch rows of each adapter. Iterating yields (adapter name or None for the base model, rows)."""

    def __init__(self, adapter_names: list[str], device: torch.device, base_name: str = "__base__"):
        self.names = list(dict.fromkeys(adapter_names))            # first-appearance order
        code_of = {n: i for i, n in enumerate(self.names)}
        codes = torch.tensor([code_of[n] for n in adapter_names], dtype=torch.long)  # (n_rows,), on the host
        self.n_rows = len(adapter_names)
        self.codes = codes.to(device)
        self.groups: list[tuple[Optional[str], Rows]] = []
        for i, name in enumerate(self.names):
            rows = (codes == i).nonzero().squeeze(1)
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            sel: Rows = slice(lo, hi) if hi - lo == rows.numel() else rows.to(device)
            self.groups.append((None if name == base_name else name, sel))

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)


@contextlib.contextmanager
def row_groups(model: torch.nn.Module, adapter_names: list[str], device: torch.device) -> Iterator[None]:
    """For one forward: rows grouped by adapter once, and every adapted layer of `model` told the groups."""
    groups = RowGroups(list(adapter_names), device)
    layers = [layer for _, layer in adapted_layers(model)]
    try:
        for layer in layers:
            layer.batch_groups = groups
        yield
    finally:
        for layer in layers:
            layer.batch_groups = None


def _take(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _index(rows: Rows, device) -> torch.Tensor:
    return torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows


def forward_generic(adapters, base_layer, x: torch.Tensor, base: torch.Tensor, groups: RowGroups) -> torch.Tensor:
    """Each adapter once on its own rows (given the base output of those rows); other rows keep `base`."""
    parts, where = [], []
    for name, rows in groups:
        if name is None or name not in adapters:
            continue
        parts.append(adapters[name](_take(x, rows), base_layer, _take(base, rows)))
        where.append(rows)
    if not parts:
        return base
    if torch.is_grad_enabled() and (base.requires_grad or any(p.requires_grad for p in parts)):
        idx = torch.cat([_index(r, base.device) for r in where])
        return base.index_copy(0, idx, torch.cat(parts).to(base.dtype))
    for rows, part in zip(where, parts):  # no autograd: write into the base output in place
        if isinstance(rows, slice):
            base[rows] = part
        else:
            base.index_copy_(0, rows, part.to(base.dtype))
    return base


def lowrank_operands(adapters, groups: RowGroups, base_layer, x: torch.Tensor) -> Optional[dict]:
    """{name: LowRankOperands} for the adapters of this batch, or None if one of them has no low-rank form now
    (or holds it in another dtype than x)."""
    out = {}
    for name, _ in groups:
        if name is None or name not in adapters:
            continue
        ops = adapters[name].lowrank_operands(base_layer)
        if ops is None or ops.lora_A.dtype != x.dtype:
            return None
        out[name] = ops
    return out


def forward_lowrank(x: torch.Tensor, base: torch.Tensor, operands: dict, groups: RowGroups) -> torch.Tensor:
    """out[i] = c_i ⊙ (base[i] − b + s_i·B_i A_i x[i]) + b, each row i with its own adapter's factors.

    Shapes: x (R, T, d_in) after flattening the middle dims, base (R, T, d_out); per adapter A (r, d_in),
    B (d_out, r); stacks (G+1, r_max, ·) with a zero slot G for rows that keep the base output.
    """
    R, d_in, d_out = x.shape[0], x.shape[-1], base.shape[-1]
    x3, base3 = x.reshape(R, -1, d_in), base.reshape(R, -1, d_out)
    names = list(operands)
    r_max = max(op.rank for op in operands.values())
    scaled = any(op.magnitude is not None for op in operands.values())
    bias = next(iter(operands.values())).bias                      # the one base layer's bias
    a_list, b_list, c_list = [], [], []
    for n in names:
        op = operands[n]
        A, B, s, c = op.lora_A, op.lora_B, op.scale, op.column_scale()
        pad = r_max - A.shape[0]
        a_list.append(F.pad(A * s, (0, 0, 0, pad)))                 # (r_max, d_in), scale folded in
        cB = B if c is None else B * c.unsqueeze(1)                 # column scale folded into B's rows
        b_list.append(F.pad(cB, (0, pad)))                          # (d_out, r_max)
        c_list.append(c if c is not None else base.new_ones(d_out))
    a_list.append(x.new_zeros(r_max, d_in))
    b_list.append(x.new_zeros(d_out, r_max))
    c_list.append(base.new_ones(d_out))
    # slot of each adapter of the batch in the stacks; rows of adapters absent here use the zero slot
    slot = torch.tensor([names.index(n) if n in operands else len(names) for n in groups.names],
                        dtype=torch.long, device=x.device)
    row_slot = slot.index_select(0, groups.codes)                   # (R,)
    A_rows = torch.stack(a_list).index_select(0, row_slot)          # (R, r_max, d_in)
    B_rows = torch.stack(b_list).index_select(0, row_slot)          # (R, d_out, r_max)
    u = torch.bmm(x3, A_rows.transpose(1, 2))                       # (R, T, d_in) @ (R, d_in, r) -> (R, T, r)
    inplace = not (torch.is_grad_enabled() and (base.requires_grad or u.requires_grad or B_rows.requires_grad))
    if scaled:
        C = torch.stack(c_list).index_select(0, row_slot).unsqueeze(1)   # (R, 1, d_out)
        if bias is not None:  # c ⊙ (base − b) + b = c ⊙ base + (1 − c) ⊙ b
            shift = (1 - C) * bias
            base3 = base3.mul_(C).add_(shift) if inplace else base3 * C + shift
        else:
            base3 = base3.mul_(C) if inplace else base3 * C
    if inplace:
        return base3.baddbmm_(u, B_rows.transpose(1, 2)).view(base.shape)
    return torch.baddbmm(base3, u, B_rows.transpose(1, 2)).view(base.shape)  # (R, T, r) @ (R, r, d_out)
