"""Calibration data for data-driven methods (CorDA's covariances, EVA's PCA, Child-tuning's Fisher mask): one way to
feed a model, and one way to see what its target layers read (InputHook).

Accepted `data`: a DataLoader or any iterable of batch dicts ({"input_ids": (B, T), "attention_mask": ...}),
a dataset or list of rows ({"input_ids": [ids...]} or plain texts with a `tokenizer`), a (N, T) tensor of token
ids, or a single batch dict. Rows are padded into batches of `batch_size` with an attention mask.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn


def _as_row(item: Any, tokenizer) -> Optional[dict]:
    """One sample as {"input_ids": 1-D long tensor, ...}, or None if `item` is already a batch."""
    if isinstance(item, str):
        if tokenizer is None:
            raise ValueError("calibration data holds texts; pass tokenizer=... so they can be tokenized")
        return {"input_ids": torch.tensor(tokenizer(item)["input_ids"], dtype=torch.long)}
    if isinstance(item, torch.Tensor):
        return {"input_ids": item.long()} if item.dim() == 1 else None
    if isinstance(item, dict):
        ids = item.get("input_ids")
        if ids is None and "text" in item:
            return _as_row(item["text"], tokenizer)
        if ids is None:
            raise ValueError(f"a calibration item has no 'input_ids' (keys: {sorted(item)})")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            return None
        out = {}
        for k, v in item.items():
            if isinstance(v, (list, tuple)) and v and isinstance(v[0], int) or isinstance(v, torch.Tensor):
                out[k] = torch.as_tensor(v)
            elif k == "labels" and isinstance(v, int):
                out[k] = torch.tensor(v)
        return out
    if isinstance(item, (list, tuple)) and item and isinstance(item[0], int):
        return {"input_ids": torch.tensor(item, dtype=torch.long)}
    raise TypeError(f"cannot use a {type(item).__name__} as calibration data; give batch dicts with input_ids, "
                    f"rows of token ids, texts (with tokenizer=...), or a (N, T) tensor of token ids")


def _collate(rows: list[dict], pad_id: int) -> dict:
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):   # right padding; the mask tells every consumer which tokens are real
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n] = r["input_ids"], 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if all("labels" in r for r in rows):
        if rows[0]["labels"].dim() == 0:
            batch["labels"] = torch.stack([r["labels"] for r in rows])
        else:
            labels = torch.full((len(rows), length), -100, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, : len(r["labels"])] = r["labels"]
            batch["labels"] = labels
    return batch


def iter_batches(data: Any, *, batch_size: int = 8, tokenizer=None, max_samples: Optional[int] = None,
                 pad_id: Optional[int] = None) -> Iterator[dict]:
    """Yield batch dicts from any of the accepted forms, stopping after `max_samples` samples."""
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    if isinstance(data, torch.Tensor):
        data = [{"input_ids": data[i: i + batch_size]} for i in range(0, len(data), batch_size)] if data.dim() == 2 \
            else [data]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, Iterable):
        raise TypeError(f"calibration data must be iterable (a DataLoader, a dataset, a list); got "
                        f"{type(data).__name__}")
    seen, rows = 0, []
    for item in data:
        if max_samples is not None and seen >= max_samples:
            break
        row = _as_row(item, tokenizer)
        if row is None:                       # already a batch
            batch = {k: v for k, v in item.items() if isinstance(v, torch.Tensor)}
            if max_samples is not None and seen + len(batch["input_ids"]) > max_samples:
                batch = {k: v[: max_samples - seen] for k, v in batch.items()}
            seen += len(batch["input_ids"])
            yield batch
            continue
        rows.append(row)
        seen += 1
        if len(rows) == batch_size:
            yield _collate(rows, pad_id)
            rows = []
    if rows:
        yield _collate(rows, pad_id)


def model_inputs(model: nn.Module, batch: dict, device: torch.device) -> dict:
    """The batch's tensors the model's forward accepts, on its device."""
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    return {k: v.to(device) for k, v in batch.items() if takes_any or k in params}


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class InputHook:
    """A forward hook that hands one layer's input to `sink`, as `prepare(args, context, name)` makes it. `context`
    is what the caller sets per batch (a mask, chosen positions) for `prepare` to read."""

    def __init__(self, name: str, prepare: Callable, sink: Callable):
        self.name, self.prepare, self.sink = name, prepare, sink
        self.context = None

    @torch.no_grad()
    def __call__(self, module, args, output) -> None:
        self.sink(self.prepare(args, self.context, self.name))


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Under torch.distributed, every rank's rows concatenated (each rank must have seen different batches)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return x
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.detach().cpu())
    return torch.cat(parts).to(x.device)
