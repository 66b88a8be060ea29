"""Training checkpoints that survive interruption: trainable state, optimizer, scheduler, RNG, data position.

Layout under <output>/checkpoints/:
  step-000050/  trainer_state.json       step, data position, RNG states (python, numpy), scheduler, run settings,
                                         the adapters' configs (methods such as AdaLoRA change them while training)
                trainable.safetensors    every trainable parameter and every adapter buffer, by parameter name
                optimizer.safetensors    the optimizer's tensors (+ its param groups in trainer_state.json)
                rng.safetensors          torch (and CUDA) RNG states
                adapter/                 the adapter as save_pretrained writes it (for use; resume does not need it)
  latest                                 the name of the newest complete checkpoint
A checkpoint is written into a hidden temporary directory, fsynced, and renamed into place; `latest` is then
replaced atomically. A crash at any moment leaves the previous checkpoint intact and `latest` pointing at a
complete one. Nothing is pickled: tensors go to safetensors, everything else to JSON.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.io import as_os_error, atomic_write_text

DIR = "checkpoints"
LATEST = "latest"
_ADAPTER_STATE = (".adapters.", ".copies.", ".peftlab_selective.")  # where method state lives (buffers included)
_DERIVED = ("original", "stash")  # selective methods' copies of the base tensors: rebuilt with the model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Everything training changes: trainable parameters, plus buffers inside adapters (AdaLoRA's importance
    EMAs, Child-tuning's mask...). Frozen base tensors are rebuilt from the base model on resume."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out["param:" + n] = p.detach()
    for n, b in model.named_buffers():
        if b is not None and any(k in f".{n}" for k in _ADAPTER_STATE) and n.rsplit(".", 1)[-1] not in _DERIVED:
            out["buffer:" + n] = b.detach()
    return out


@torch.no_grad()
def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    want = {k for k in trainable_state(model) if k.startswith("param:")}
    missing = sorted(want - set(tensors))
    if missing:
        raise ValueError(f"{where} has no values for {len(missing)} trainable tensor(s) of this model, e.g. "
                         f"{missing[0][6:]!r}: it was written by a run with another method or config")
    for key, t in tensors.items():
        kind, _, name = key.partition(":")
        own = (params if kind == "param" else buffers).get(name)
        if own is None:
            raise ValueError(f"{where} holds {name!r}, which this model does not have: it was written by a run "
                             f"with another method or config")
        if own.shape != t.shape:
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)} there but {tuple(own.shape)} in this model")
        own.copy_(t.to(own.dtype))


# -- optimizer state without pickle ----------------------------------------------------------------------------
def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous()
            else:
                plain.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        idx, _, k = key.partition(".")
        state.setdefault(int(idx), {})[k] = t
    for idx, extra in meta.get("plain", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


# -- RNG -------------------------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [version, list(state), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- writing and reading ---------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_st(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors refuses tensors sharing storage (tied weights); give each its own copy.
    seen, clean = set(), {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        clean[k] = v.clone() if key in seen else v
        seen.add(key)
    save_file(clean, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class CheckpointWriteError(OSError):
    """Writing a checkpoint (or the run's adapter) failed, e.g. on a full disk. The message names the file, the
    last good checkpoint (never touched by a failed save) and how to continue."""


def write_failure(path: Path, error: BaseException, output_dir: str | os.PathLike) -> CheckpointWriteError:
    """The one message for a failed save: which file, why, which checkpoint is intact, how to continue."""
    error = as_os_error(error, path)
    reason = error.strerror or str(error)
    try:
        good = latest_checkpoint(output_dir)
    except FileNotFoundError:
        good = None
    intact = (f"the last good checkpoint {good} is intact; continue from it with --resume (the same command and "
              f"--output)" if good else "no earlier checkpoint exists, so the run starts over when rerun")
    space = "free disk space, then " if error.errno == errno.ENOSPC else ""
    return CheckpointWriteError(f"could not write {path} ({reason}); {space}{intact}")


def _put(final: Path, tmp: Path, fname: str, write, output_dir) -> None:
    """write(tmp / fname), naming the file's final place in the error when it fails."""
    try:
        write(tmp / fname)
    except (OSError, SafetensorError) as e:
        # a file inside a folder being written (adapter/adapter_model.safetensors) is named by its final place
        inner = Path(e.filename) if isinstance(e, OSError) and e.filename else None
        shown = final / inner.relative_to(tmp) if inner and tmp / fname in inner.parents else final / fname
        raise write_failure(shown, e, output_dir) from e


def _write_files(tmp: Path, final: Path, model, optimizer, scheduler, state: dict, scaler, save_adapter: bool,
                 output_dir) -> None:
    _put(final, tmp, "trainable.safetensors", lambda p: _save_st(p, trainable_state(model)), output_dir)
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    _put(final, tmp, "optimizer.safetensors", lambda p: _save_st(p, opt_tensors), output_dir)
    rng_tensors, rng_plain = rng_state()
    _put(final, tmp, "rng.safetensors", lambda p: _save_st(p, rng_tensors), output_dir)
    peft_config = getattr(model, "peft_config", None) or {}
    full = dict(state, optimizer=opt_meta, rng=rng_plain, scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else None,
                adapter_configs={n: c.to_dict() for n, c in peft_config.items()})
    _put(final, tmp, "trainer_state.json", lambda p: _write_json(p, full), output_dir)
    if save_adapter and hasattr(model, "save_pretrained") and peft_config:
        _put(final, tmp, "adapter", model.save_pretrained, output_dir)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(obj, indent=1, default=_json_default))
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(output_dir: str | os.PathLike, step: int, model, optimizer, scheduler, state: dict,
                    scaler=None, save_adapter: bool = True, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and make it `latest`; keep the newest `keep` checkpoints (0: all) and the
    best (the lowest eval_loss of a checkpoint written at an evaluation, `state["eval"]`). A failed write raises
    CheckpointWriteError and leaves every earlier checkpoint as it was."""
    root = Path(output_dir) / DIR
    name = f"step-{step:06d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    except OSError as e:
        raise write_failure(root / name, e, output_dir) from e
    try:
        _write_files(tmp, root / name, model, optimizer, scheduler, dict(state, step=step), scaler, save_adapter,
                     output_dir)
        _fsync_dir(tmp)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _put(root, root, LATEST, lambda p: atomic_write_text(p, name + "\n"), output_dir)
    _prune(root, keep, name)
    return root / name


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"cannot store {type(o).__name__} in a checkpoint")


def _eval_loss(path: Path) -> float:
    """The eval_loss recorded with a checkpoint (inf when it was not written at an evaluation)."""
    try:
        value = (json.loads((path / "trainer_state.json").read_text()).get("eval") or {}).get("eval_loss")
    except (OSError, ValueError):
        return math.inf
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def best_checkpoint(root: Path) -> Optional[str]:
    """The checkpoint with the lowest recorded eval_loss (HF Trainer's default metric_for_best_model), or None."""
    scored = [(_eval_loss(p), p.name) for p in sorted(root.glob("step-*")) if p.is_dir()]
    scored = [s for s in scored if s[0] < math.inf]
    return min(scored)[1] if scored else None


def _prune(root: Path, keep: int, newest: str) -> None:
    """Like HF Trainer's save_total_limit: the newest `keep` checkpoints stay, and the newest and the best are
    never removed (so keep=1 with an evaluated best keeps two)."""
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    protected = {newest, best_checkpoint(root)} if keep > 0 else set()
    for p in done[:-keep] if keep > 0 else []:
        if p.name not in protected:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".step-*.tmp"):  # left by a crash mid-write
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    root = Path(output_dir) / DIR
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{marker} names {path.name}, which is missing or incomplete; delete {marker} to "
                                f"start over, or point it at one of {[p.name for p in root.glob('step-*')]}")
    return path


def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler, scaler=None) -> dict:
    """Restore everything save_checkpoint wrote into live objects; returns the trainer state dict."""
    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng_tensors = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is unreadable ({e}); delete it (and {path.parent / LATEST}) to start "
                         f"over") from None
    peft_config = getattr(model, "peft_config", None) or {}
    for name, fields in state.get("adapter_configs", {}).items():
        if name in peft_config:
            # Methods may update their config while training (AdaLoRA's rank_pattern); update it in place, as
            # tuners may hold a reference to the config object.
            for k, v in fields.items():
                if hasattr(peft_config[name], k) and k != "inference_mode":
                    setattr(peft_config[name], k, v)
    load_trainable_state(model, trainable, str(path / "trainable.safetensors"))
    device = next((p.device for p in model.parameters() if p.requires_grad), torch.device("cpu"))
    optimizer.load_state_dict(_join_optimizer({k: v.to(device) if not k.endswith(".step") else v
                                               for k, v in opt_tensors.items()}, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(rng_tensors, state["rng"])
    return state


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines from steps after the checkpoint (they will be redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    path.write_text("".join(line + "\n" for line in keep))
