"""The low-rank operand protocol: how an adapter tells the core "my output is a low-rank update of the base".

An adapter whose output for input x is, right now,

    y = c ⊙ (W x + s·B A x) + b        W (d_out, d_in), A (r, d_in), B (d_out, r), c (d_out,) or 1

describes itself by `LowRankOperands`: LoRA and its variants with c = 1, DoRA with c = m · (1/‖W + sBA‖_row)
(the norm a constant, DoRA §4.3). Code in core that batches or fuses such adapters reads only these operands,
never an adapter's attributes, so it works for any method that implements the protocol:

- sibling fusion (core/siblings.py): layers that read one input tensor train as one autograd node
  (functional.lowrank_group);
- mixed-adapter batches (core/mixed.py): every row's adapter applied by two batched matmuls;
- (not a user of this protocol) the mixtures of experts keep their experts' factors stacked, (E, r, d), and
  compute routed tokens with core/grouped.py's kernels; MoA's heterogeneous slots are parts of one adapter
  per layer, each computed by that adapter's forward.

`Adapter` (core/layer.py) declares both methods with the defaults "no low-rank form" and "never fused", so an
adapter that says nothing is simply computed by its own forward.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Protocol

import torch
import torch.nn as nn


class LowRankOperands(NamedTuple):
    """y = c ⊙ (W x + s·B A x) + b with c = magnitude · inv_norm (DoRA) or 1 (magnitude None)."""
    weight: torch.Tensor                      # W as (d_out, d_in), whatever its storage layout (a view for Conv1D)
    bias: Optional[torch.Tensor]              # b (d_out,) or None
    lora_A: torch.Tensor                      # A (r, d_in)
    lora_B: torch.Tensor                      # B (d_out, r)
    scale: float                              # s
    magnitude: Optional[torch.Tensor] = None  # DoRA's m (d_out,); None: c = 1
    inv_norm: Optional[torch.Tensor] = None   # 1/‖W + sBA‖_row (d_out,), no gradient; with magnitude
    # a quantised base (core/quantized.py): W is a transient dequantised copy and this rebuilds it for backward,
    # so the kernels keep nothing of it; None: W is the layer's own tensor, kept as is
    rebuild_weight: Optional[Callable[[], torch.Tensor]] = None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def column_scale(self) -> Optional[torch.Tensor]:
        """c (d_out,), or None when it is 1."""
        return None if self.magnitude is None else self.magnitude * self.inv_norm

    def needs_grad(self, x: torch.Tensor) -> bool:
        """Whether anything in y = f(x) needs a gradient (else the no-autograd kernels are the faster choice)."""
        return x.requires_grad or any(t is not None and t.requires_grad
                                      for t in (self.bias, self.lora_A, self.lora_B, self.magnitude))


class LowRankAdapter(Protocol):
    """What an adapter implements to be computed by the core's low-rank machinery (see the module docstring)."""

    def lowrank_operands(self, base_layer: nn.Module) -> Optional[LowRankOperands]:
        """This adapter's current output function in low-rank form, or None when it is not of that form now
        (e.g. dropout on the adapter input while training)."""

    def joins_sibling_group(self, x: torch.Tensor, base_layer: nn.Module) -> bool:
        """Cheap: whether a training forward may compute this adapter's output for x with the fused group kernel
        (functional.lowrank_group) from `lowrank_operands`. True implies lowrank_operands is not None."""
