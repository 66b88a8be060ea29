"""Sibling fusion: adapted layers that read the same input tensor (q/k/v, gate/up) train as one autograd node.

Which layers are siblings is learned, not assumed: during one training forward the layers record the input
tensor each was called with, and consecutive calls on the very same tensor form a group. From the next
forward on, the group's first layer (the leader) computes every member's output in one call of
`functional.lowrank_group` and leaves the others' outputs waiting; each follower takes its output only if it
is called with that same tensor, unmodified (identity and version checked), and otherwise computes its own.
So a wrong guess costs time, never correctness.

The plan changes only when a forward of the PeftModel begins (or a `forward_pass()` block, for code that calls
the inner model directly), never inside one, so a gradient-checkpointing recomputation (which re-runs layers
during backward) makes the same choices as the forward it repeats.
Only the autograd path is fused; inference, torch.compile, mixed-adapter batches, merged or several active
adapters all take the ordinary per-layer path.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator, Optional

import torch

from .functional import lowrank_group


class SiblingFusion:
    def __init__(self) -> None:
        self.followers: dict = {}                  # leader AdaptedLayer -> [follower AdaptedLayer, ...]
        self._relearn = True                       # the next forward records which layers share an input
        self._attached = False                     # every adapted layer of the model points here
        self._recorded: Optional[list[list]] = None  # groups seen by the recording forward, committed next
        self._recording = False                    # only inside that forward, not in a recomputation after it
        self._last = None                          # (x, x._version) of the last recorded call
        self._waiting: dict = {}                   # follower -> (x, x._version, output computed by the leader)

    def reset(self) -> None:
        """Adapters or layers changed: forget the groups and learn them again in the next forward."""
        self.followers, self._relearn, self._attached = {}, True, False

    def begin(self, model: torch.nn.Module) -> None:
        """Called when a PeftModel forward starts: commit what the previous forward recorded, maybe record anew."""
        if torch.compiler.is_compiling():
            return
        self._waiting.clear()
        if self._recorded:
            self._commit(self._recorded)
        elif self._recorded is not None:           # that forward fused nothing it could see (an inference pass)
            self._relearn = True
        self._recorded = None
        if self._relearn:
            if not self._attached:
                from .tuner import adapted_layers
                for _, layer in adapted_layers(model):
                    layer.siblings = self
                self._attached = True
            self.followers, self._relearn, self._recorded, self._recording = {}, False, [], True

    @contextlib.contextmanager
    def forward_pass(self, model: torch.nn.Module) -> Iterator[None]:
        """Brackets one forward of `model` (what PeftModel.forward does); for code that calls the inner
        Transformers model directly, which otherwise never fuses."""
        self.begin(model)
        try:
            yield
        finally:
            self.end()

    def end(self) -> None:
        if torch.compiler.is_compiling():
            return
        if self._waiting:                          # a follower was not called: the plan no longer fits the model
            self._relearn = True
            self._waiting.clear()                  # release the graphs of outputs nobody asked for
        self._recording, self._last = False, None

    def _commit(self, groups: list[list]) -> None:
        counts = Counter(id(layer) for g in groups for layer in g)
        # a layer seen in two groups (shared weights called twice) or twice in one group is left unfused
        self.followers = {g[0]: g[1:] for g in groups if len(g) > 1 and all(counts[id(m)] == 1 for m in g)}

    def forward(self, layer, x: torch.Tensor) -> Optional[torch.Tensor]:
        """`layer`'s output for x through its group, or None: the caller computes it the ordinary way."""
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        if self._waiting:
            hit = self._waiting.pop(layer, None)
            if hit is not None:
                if hit[0] is x and hit[1] == x._version:
                    return hit[2]
                self._relearn = True               # called on another input than its leader's: learn again
        if self._recording:
            self._record(layer, x)
            return None
        followers = self.followers.get(layer)
        if not followers:
            return None
        adapters = [layer.sibling_adapter(x)] + [f.sibling_adapter(x) for f in followers]
        if any(a is None for a in adapters):
            return None
        members = [a.lowrank_operands(m.base_layer) for a, m in zip(adapters, [layer, *followers])]
        if any(m is None for m in members):
            return None
        outs = lowrank_group(x, members)
        for follower, out in zip(followers, outs[1:]):
            self._waiting[follower] = (x, x._version, out)
        return outs[0]

    def _record(self, layer, x: torch.Tensor) -> None:
        if layer.sibling_adapter(x) is None:
            return
        if self._last is not None and self._last[0] is x and self._last[1] == x._version:
            self._recorded[-1].append(layer)
        else:
            self._recorded.append([layer])
        self._last = (x, x._version)
