"""Selective methods (BitFit, LN-tuning, RoCoFT, Child-tuning): train part of the model's own tensors; nothing wrapped.

A method only says *what* it selects (`SelectiveTuner.select` -> `Selection`s); everything else lives here once.
The change lives in the model's own tensors, so the semantics are:
- always "merged": the tensors hold the tuned values; merge_adapter()/unmerge_adapter() change nothing, and
  merge_and_unload() keeps the tuned values and drops the bookkeeping;
- a copy of the original selected values is kept: disable_adapter(), an inactive adapter, unload() and
  delete_adapter() put the originals back (leaving the context / re-activating swaps the tuned ones back in);
- the saved adapter holds only the selected values (and, for a partial selection, its rows/columns/mask).
Kinds of selection on one parameter:
- "whole": the parameter itself trains (BitFit's biases, norm weights); "new": a zero bias BitFit added;
- "rows" / "cols" / "mask": part of a Linear/Conv1D weight (RoCoFT rows or columns, Child-tuning's mask). The
  selected values are a small Parameter P; the weight holds a copy of P (written whenever the layer runs or its
  state_dict is read, so right after an optimizer step `module.weight` itself can lag until then), and
  `_RouteGrad` sends the weight-gradient of exactly those entries to P. So the trainable count, optimizer
  state and weight decay cover only the selected values, never the rest of W.
Two adapters may not select the same tensor (both would train it in place); that is refused with a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn

from .loading import check_shape, mismatch
from .quantized import is_quantized, refuse_quantized_weight, weight_dtype
from .tuner import Tuner

SLOT = "peftlab_selective"          # the ModuleDict a selected module carries: adapter -> param -> Entry
PARTIAL = ("rows", "cols", "mask")


@dataclass
class Selection:
    module: str                         # module name in the model
    param: str = "weight"               # parameter of that module
    kind: str = "whole"                 # "whole" | "new" | "rows" | "cols" | "mask"
    index: Optional[torch.Tensor] = None  # rows/cols: long (k,); mask: bool (d_out, d_in); None: filled on load


def weight_view(module: nn.Module, param: str, fan_in_fan_out: bool) -> torch.Tensor:
    """The parameter's data as (d_out, d_in), whatever its storage layout (Conv1D stores d_in×d_out)."""
    data = getattr(module, param).data
    return data.t() if fan_in_fan_out else data


def _gather(view: torch.Tensor, kind: str, index: torch.Tensor) -> torch.Tensor:
    if kind == "rows":
        return view[index]                       # (k, d_in)
    if kind == "cols":
        return view[:, index]                    # (d_out, k)
    return view[index]                           # mask -> (nnz,), row-major order


def _scatter(view: torch.Tensor, kind: str, index: torch.Tensor, values: torch.Tensor) -> None:
    values = values.to(view.dtype)
    if kind == "cols":
        view[:, index] = values
    else:
        view[index] = values


class _RouteGrad(torch.autograd.Function):
    """Identity on the layer output y (marked dirty, no copy); backward sends dL/dW at the selected entries to P.

    y = x Wᵀ with W[sel] = P, so dL/dP = (gᵀ x)[sel]: rows (k, N)@(N, d_in), cols (d_out, N)@(N, k), a mask the
    dense (d_out, N)@(N, d_in) product gathered at the mask (what full fine-tuning of W would compute); for a
    mask, `index` is its flat row-major positions (nnz,), so the gather costs O(nnz).
    """

    @staticmethod
    def forward(ctx, y, x, values, kind, index):
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, index)
        ctx.kind, ctx.dtype = kind, values.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        x, index = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[2]:
            g2 = g.reshape(-1, g.shape[-1])
            x2 = x.reshape(-1, x.shape[-1]).to(g2.dtype)
            if ctx.kind == "rows":
                grad = g2[:, index].t() @ x2
            elif ctx.kind == "cols":
                grad = g2.t() @ x2[:, index]
            else:
                grad = (g2.t() @ x2).view(-1).index_select(0, index)
            grad = grad.to(ctx.dtype)
        return g, None, grad, None, None


class Entry(nn.Module):
    """One adapter's selection on one parameter: the original values, and P for a partial selection."""

    def __init__(self, peft_type: str, module_name: str, param: str, kind: str, original: torch.Tensor,
                 index: Optional[torch.Tensor] = None, fan_in_fan_out: bool = False, pending: bool = False):
        super().__init__()
        self.peft_type, self.module_name, self.param, self.kind = peft_type, module_name, param, kind
        self.fan_in_fan_out, self.pending = fan_in_fan_out, pending
        self.applied = True      # at creation the tensor holds the original = tuned values
        self.active, self.disabled = True, False
        self.register_buffer("original", original.detach().clone(), persistent=False)
        self.register_buffer("stash", None, persistent=False)      # tuned whole tensor while not applied
        if kind in PARTIAL:
            self.register_buffer("index", index, persistent=False)
            self.register_buffer("flat", None, persistent=False)
            self._index_changed()
            self.values = nn.Parameter(original.detach().clone())
        self._synced = None

    def _index_changed(self) -> None:
        """A mask's selected positions as flat indices, row-major in (d_out, d_in): O(nnz) reads and writes."""
        self.flat = self.index.reshape(-1).nonzero().view(-1) if self.kind == "mask" else None

    def _write(self, module: nn.Module, values: torch.Tensor) -> None:
        p = getattr(module, self.param).data
        if self.kind == "mask" and p.is_contiguous():
            flat = self.flat
            if self.fan_in_fan_out:   # storage is (d_in, d_out): (o, i) lives at i·d_out + o
                d_out, d_in = self.index.shape
                flat = (flat % d_in) * d_out + flat // d_in
            p.view(-1).index_copy_(0, flat, values.to(p.dtype))
        else:
            _scatter(weight_view(module, self.param, self.fan_in_fan_out), self.kind, self.index, values)

    # -- moving values between the model's tensor and this entry ----------------------------------------
    def tuned(self, module: nn.Module) -> torch.Tensor:
        if self.kind in PARTIAL:
            return self.values
        return getattr(module, self.param) if self.applied else self.stash

    def sync(self, module: nn.Module) -> None:
        """Write P into the weight if P changed since the last write (an optimizer step, a load)."""
        key = (self.values._version, self.values.data_ptr())
        if self._synced != key:
            with torch.no_grad():
                self._write(module, self.values)
            self._synced = key

    @torch.no_grad()
    def set_applied(self, module: nn.Module, applied: bool) -> None:
        if applied == self.applied:
            return
        if self.kind in PARTIAL:
            self._write(module, self.values if applied else self.original)
            self._synced = None
        else:
            p = getattr(module, self.param)
            if applied:
                p.data.copy_(self.stash)
                self.stash = None
            else:
                self.stash = p.data.clone()
                p.data.copy_(self.original)
        self.applied = applied

    def refresh(self, module: nn.Module) -> None:
        self.set_applied(module, self.active and not self.disabled)

    @torch.no_grad()
    def load(self, module: nn.Module, values: torch.Tensor, index: Optional[torch.Tensor] = None) -> None:
        if self.kind in PARTIAL:
            if index is not None and (self.pending or not torch.equal(index.to(self.index.device), self.index)):
                applied = self.applied
                self.set_applied(module, False)           # originals back before selecting other entries
                index = index.to(self.index.device)
                self.index = index
                self._index_changed()
                self.original = _gather(weight_view(module, self.param, self.fan_in_fan_out), self.kind, index).clone()
                self.values.data = self.original.clone()  # same Parameter object: requires_grad is kept
                self.pending = False
                self.set_applied(module, applied)
            self.values.copy_(values)
            self._synced = None
            if self.applied:
                self.sync(module)
        else:
            (getattr(module, self.param).data if self.applied else self.stash).copy_(values)


def _pre_hook(module: nn.Module, args) -> None:
    for entries in module._modules[SLOT].values():
        for e in entries.values():
            if e.kind in PARTIAL and e.applied:
                if e.pending:
                    raise RuntimeError(
                        f"{e.peft_type} adapter on {e.module_name} has no selection yet: it was created without its "
                        f"data-driven mask. Compute it first (e.g. peftlab.methods.child_tuning.compute_fisher_mask"
                        f"(model, config, data) before get_peft_model) or load a saved adapter.")
                e.sync(module)


def _state_hook(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    """state_dict() sees the tuned values even before the next forward (e.g. right after an optimizer step)."""
    for entries in module._modules[SLOT].values():
        for e in entries.values():
            if e.kind in PARTIAL and e.applied and not e.pending:
                e.sync(module)


def _post_hook(module: nn.Module, args, output):
    if not torch.is_grad_enabled():
        return output
    for entries in module._modules[SLOT].values():
        for e in entries.values():
            if e.kind in PARTIAL and e.applied and e.values.requires_grad:
                if not args:
                    raise RuntimeError(f"{e.module_name} was called without a positional input; selective "
                                       f"partial-weight training needs the layer input")
                output = _RouteGrad.apply(output, args[0], e.values, e.kind, e.flat if e.kind == "mask" else e.index)
    return output


def _slot(module: nn.Module, create: bool = False) -> Optional[nn.ModuleDict]:
    slot = module._modules.get(SLOT)
    if slot is None and create:
        slot = nn.ModuleDict()
        module.add_module(SLOT, slot)
    return slot


def _set_hooks(module: nn.Module) -> None:
    """Hooks exist exactly while the module has a partial selection (deepcopy-safe: found by function identity)."""
    slot = _slot(module)
    want = slot is not None and any(e.kind in PARTIAL for d in slot.values() for e in d.values())
    have = any(h is _pre_hook for h in module._forward_pre_hooks.values())
    if want and not have:
        module.register_forward_pre_hook(_pre_hook)
        module.register_forward_hook(_post_hook)
        module.register_state_dict_pre_hook(_state_hook)
    elif have and not want:
        for hooks, fn in ((module._forward_pre_hooks, _pre_hook), (module._forward_hooks, _post_hook),
                          (module._state_dict_pre_hooks, _state_hook)):
            for k in [k for k, h in hooks.items() if h is fn]:
                del hooks[k]


class SelectiveTuner(Tuner):
    """The Tuner protocol for selective methods. Subclasses set `peft_type`, implement `select`, and may rename
    saved keys (`whole_key`, `partial_prefix`)."""
    peft_type: str = ""
    # partial selections save `<module>.<prefix>_values` and `..._index` (rows/cols) or `..._positions` (a mask: the
    # flat row-major positions of its True entries, int32 below 2³¹ elements; files before this hold a dense
    # bool `..._mask`, one byte per weight, which loading still accepts)
    partial_prefix: str = "selected"

    def select(self, model: nn.Module, config) -> list[Selection]:
        raise NotImplementedError

    def whole_key(self, entry: Entry) -> str:
        return f"{entry.module_name}.{entry.param}"

    def partial_keys(self, entry: Entry) -> tuple[str, str]:
        idx = "positions" if entry.kind == "mask" else "index"
        return f"{entry.module_name}.{self.partial_prefix}_values", f"{entry.module_name}.{self.partial_prefix}_{idx}"

    # -- the protocol ----------------------------------------------------------------------------------
    def inject(self, model: nn.Module, config, adapter_name: str) -> None:
        selections = self.select(model, config)
        added: list[tuple[nn.Module, str]] = []
        try:
            for sel in selections:
                added.append(self._add(model, sel, adapter_name))
        except Exception:
            for module, key in added:    # never leave half an adapter behind
                self._drop(module, adapter_name, key, restore=True)
            raise

    def _add(self, model: nn.Module, sel: Selection, adapter_name: str) -> tuple[nn.Module, str]:
        module = model.get_submodule(sel.module)
        slot = _slot(module, create=True)
        for other, entries in slot.items():
            if sel.param.replace(".", "_") in entries:
                raise ValueError(
                    f"{sel.module}.{sel.param} is already selected by adapter {other!r} "
                    f"({entries[sel.param.replace('.', '_')].peft_type}); selective methods train the model's own "
                    f"tensors in place, so two adapters cannot share one. delete_adapter({other!r}) or "
                    f"merge_and_unload() first, or exclude this module.")
        if sel.param == "weight":
            refuse_quantized_weight(self.peft_type, sel.module, module)
        if sel.kind == "new":
            if getattr(module, sel.param, None) is not None:
                raise ValueError(f"{sel.module} already has a {sel.param}; nothing to add")
            ref = module.weight
            size = ref.shape[1] if _is_conv1d(module) else module.out_features if isinstance(module, nn.Linear) \
                else ref.shape[0]  # out_features: a quantised weight is stored packed
            dtype = weight_dtype(module) if is_quantized(module) else ref.dtype
            module.register_parameter(sel.param, nn.Parameter(
                torch.zeros(size, dtype=dtype, device=ref.device), requires_grad=False))
        fifo = _is_conv1d(module)
        if sel.kind in PARTIAL:
            view = weight_view(module, sel.param, fifo)
            index = sel.index
            if index is None:   # pending: an empty selection of the right kind until a saved one is loaded
                index = (torch.zeros(view.shape, dtype=torch.bool) if sel.kind == "mask"
                         else torch.zeros(0, dtype=torch.long))
            index = index.to(view.device)
            entry = Entry(self.peft_type, sel.module, sel.param, sel.kind, _gather(view, sel.kind, index), index,
                          fifo, pending=sel.index is None)
        else:
            entry = Entry(self.peft_type, sel.module, sel.param, sel.kind, getattr(module, sel.param).data)
        entry.to(getattr(module, sel.param).device)
        if adapter_name not in slot:
            slot[adapter_name] = nn.ModuleDict()
        key = sel.param.replace(".", "_")
        slot[adapter_name][key] = entry
        _set_hooks(module)
        return module, key

    def _drop(self, module: nn.Module, adapter_name: str, key: str, restore: bool) -> None:
        slot = _slot(module)
        entry = slot[adapter_name][key]
        if restore:
            entry.disabled, entry.active = True, False
            entry.refresh(module)
        elif entry.kind in PARTIAL and entry.applied:
            entry.sync(module)
        if entry.kind == "new" and restore:
            module.register_parameter(entry.param, None)
        elif entry.kind not in PARTIAL:
            getattr(module, entry.param).requires_grad_(False)   # a plain, frozen model tensor again
        del slot[adapter_name][key]
        if not len(slot[adapter_name]):
            del slot[adapter_name]
        if not len(slot):
            del module._modules[SLOT]
        _set_hooks(module)

    def entries(self, model: nn.Module, adapter_name: Optional[str] = None
                ) -> Iterator[tuple[nn.Module, str, str, Entry]]:
        for module in list(model.modules()):
            slot = _slot(module)
            if slot is None:
                continue
            for name, entries in list(slot.items()):
                if adapter_name is not None and name != adapter_name:
                    continue
                for key, e in list(entries.items()):
                    if e.peft_type == self.peft_type:
                        yield module, name, key, e

    def export_state(self, model, adapter_name, config):
        out = {}
        for module, _, _, e in self.entries(model, adapter_name):
            if e.kind in PARTIAL:
                vkey, ikey = self.partial_keys(e)
                out[vkey] = e.values.detach()
                out[ikey] = e.index if e.kind != "mask" else \
                    e.flat.to(torch.int32 if e.index.numel() < 2 ** 31 else torch.int64)
            else:
                out[self.whole_key(e)] = e.tuned(module).detach()
        return out

    def import_state(self, model, adapter_name, config, tensors):
        tensors = dict(tensors)
        for module, _, _, e in list(self.entries(model, adapter_name)):
            if e.kind in PARTIAL:
                vkey, ikey = self.partial_keys(e)
                legacy = f"{e.module_name}.{self.partial_prefix}_mask"
                if e.kind == "mask" and ikey not in tensors and legacy in tensors:
                    ikey = legacy                 # a file written before masks were saved as positions
                elif e.kind == "mask" and ikey in tensors:
                    tensors[ikey] = _mask_from_positions(e, module, tensors[ikey])
                missing = [k for k in (vkey, ikey) if k not in tensors]
                if missing:
                    raise KeyError(f"adapter file has no {', '.join(missing)} (a {self.peft_type} adapter on "
                                   f"{e.module_name}); was it saved with other target_modules?")
                values, index = tensors.pop(vkey), tensors.pop(ikey)
                want = torch.Size([int(index.sum())]) if e.kind == "mask" else None
                _check_partial(e, module, values, index, want)
                e.load(module, values, index)
            else:
                key = self.whole_key(e)
                if key not in tensors:
                    raise KeyError(f"adapter file has no {key} (a {self.peft_type} adapter on {e.module_name})")
                t = tensors.pop(key)
                own = getattr(module, e.param)
                check_shape(e.module_name, key, t, own)
                e.load(module, t)
        if tensors:
            raise KeyError(f"adapter file has {len(tensors)} tensor(s) no selected parameter of this model owns, "
                           f"e.g. {sorted(tensors)[0]!r} (was it saved for another model or other targets?)")

    def adapter_parameters(self, model, adapter_name):
        for module, _, _, e in self.entries(model, adapter_name):
            yield e.values if e.kind in PARTIAL else getattr(module, e.param)

    def set_active(self, model, names):
        for module, name, _, e in self.entries(model):
            e.active = name in names
            e.refresh(module)

    def set_disabled(self, model, disabled):
        for module, _, _, e in self.entries(model):
            e.disabled = disabled
            e.refresh(module)

    def remove(self, model, adapter_name):
        for module, name, key, _ in list(self.entries(model, adapter_name)):
            self._drop(module, name, key, restore=True)

    def unload(self, model):
        """The base model back: every selected tensor gets its original values (added biases are removed)."""
        for module, name, key, _ in list(self.entries(model)):
            self._drop(module, name, key, restore=True)

    def merge_and_unload(self, model):
        """Keep the tuned values of applied adapters in the model's tensors (they are already there)."""
        for module, name, key, e in list(self.entries(model)):
            self._drop(module, name, key, restore=not e.applied)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _mask_from_positions(e: Entry, module: nn.Module, positions: torch.Tensor) -> torch.Tensor:
    """The bool mask (d_out, d_in) whose True entries are at the saved flat row-major positions, which must be
    strictly increasing (the order the values were saved in) and inside the weight."""
    shape = weight_view(module, e.param, e.fan_in_fan_out).shape
    numel = shape[0] * shape[1]
    p = positions.long().reshape(-1)
    if positions.dim() != 1 or positions.dtype.is_floating_point or (
            len(p) and (int(p[0]) < 0 or int(p[-1]) >= numel or bool((p[1:] <= p[:-1]).any()))):
        raise mismatch(e.module_name, f"the file's mask positions {tuple(positions.shape)} {positions.dtype} are not "
                                      f"strictly increasing flat positions inside a {tuple(shape)} weight")
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[p] = True
    return mask.view(shape)


def _check_partial(e: Entry, module: nn.Module, values, index, want_numel) -> None:
    view_shape = tuple(weight_view(module, e.param, e.fan_in_fan_out).shape)
    if e.kind == "mask":
        ok = tuple(index.shape) == view_shape and index.dtype == torch.bool and tuple(values.shape) == tuple(want_numel)
        need = f"a bool mask {view_shape} and one value per True entry"
    else:
        size = view_shape[0] if e.kind == "rows" else view_shape[1]
        expect = (len(index), view_shape[1]) if e.kind == "rows" else (view_shape[0], len(index))
        ok = (index.dim() == 1 and tuple(values.shape) == expect and (e.pending or len(index) == len(e.index))
              and (len(index) == 0 or int(index.max()) < size))
        need = f"{len(e.index)} {e.kind} of a {view_shape} weight"
    if not ok:
        raise mismatch(e.module_name, f"the file holds values {tuple(values.shape)} with index "
                                      f"{tuple(index.shape)}, but this model needs {need}")
