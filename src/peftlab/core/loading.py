"""Putting saved tensors into a model: the key and shape checks, and the one error for a file from another model.

Every loader (layer adapters, base-layer tensors, heads and biases, prompt tables, selective entries, VeRA's
shared projections) goes through these, so a user who loads an adapter saved for another base model always
reads the same sentence: which module, which tensor, the shape in the file and the shape this model needs.
"""
from __future__ import annotations

from typing import Mapping

import torch

MISMATCH = "adapter does not fit this base model"


def mismatch(where: str, detail: str) -> ValueError:
    """The error for a saved tensor this model cannot take; `where` names the module (or tensor)."""
    return ValueError(f"{MISMATCH}: {where}: {detail}")


def check_shape(where: str, key: str, saved: torch.Tensor, needed: torch.Tensor, hint: str = "") -> None:
    if tuple(saved.shape) != tuple(needed.shape):
        raise mismatch(where, f"{key} has shape {tuple(saved.shape)} in the file, but this model needs "
                              f"{tuple(needed.shape)}" + (f" ({hint})" if hint else ""))


def check_keys(where: str, saved: Mapping[str, object], own: Mapping[str, object], owner: str = "",
               allow_missing: bool = False) -> None:
    """The file's keys for one module against the module's own: none missing (unless allowed), none extra."""
    missing = [] if allow_missing else sorted(set(own) - set(saved))
    if missing:
        raise KeyError(f"adapter file has no {', '.join(missing)} for module {where}")
    unexpected = sorted(set(saved) - set(own))
    if unexpected:
        which = f"this {owner}" if owner else "it"
        raise KeyError(f"adapter file has {', '.join(unexpected)} for module {where}, which {which} does not have"
                       f" (expected {', '.join(sorted(own)) or 'nothing'})")


def copy_checked(where: str, saved: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], owner: str = "",
                 hint: str = "", allow_missing: bool = False) -> None:
    """Check keys and shapes, then copy each saved tensor into the module's own (cast to its dtype)."""
    check_keys(where, saved, own, owner, allow_missing)
    for key, t in saved.items():
        check_shape(where, key, t, own[key], hint)
    with torch.no_grad():
        for key, t in saved.items():
            own[key].copy_(t.to(own[key].dtype))
