"""The training loop, one for every method: AdamW, warmup + cosine/linear decay, accumulation, clipping, autocast,
checkpoints that survive a kill, a JSONL metrics log and a progress bar.

Methods plug in through the model, never through special cases here: auxiliary losses are already in
`outputs.loss` (PeftModel.forward adds them), a PeftModel's `before_optimizer_step(step)` runs after clipping, before
the update (LoRA-Pro rewrites its gradients there), and its `on_step_end(step)` runs after each optimizer
step, before the gradients are zeroed (AdaLoRA's budget update; HF PEFT's `update_and_allocate` timing).
One TrainState carries the run through setup -> resume -> (micro_step × grad_accum -> optimizer_step ->
after_step) × steps (the shape of torchtune's recipes).
A kill loses at most `save_every` steps: SIGINT/SIGTERM finish the current step, write a checkpoint and stop;
`resume=True` continues from the newest checkpoint and ends with the same weights as an uninterrupted run.
Under torch.distributed (e.g. `peftlab train --nproc 2`, torchrun) the model is wrapped in DDP, or with
fsdp=True its frozen base is sharded by FSDP2 (train/sharding.py); every micro-batch is split across the
processes, and rank 0 alone logs and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..core.model import PeftModel
from . import checkpoint as ckpt
from .data import BatchStream
from .label_loss import gathered_loss, head_of
from .metrics import eval_loss, forward_accepts
from .settings import TrainConfig, TrainingDiverged, TrainingInterrupted, adamw, autocast_for, lr_lambda, set_seed

__all__ = ["LOG_FILE", "TrainConfig", "TrainState", "TrainingDiverged", "TrainingInterrupted", "lr_lambda",
           "method_hooks_callback", "set_seed", "train"]

LOG_FILE = "metrics.jsonl"
# settings a checkpoint written before they existed is taken to have had (their defaults)
RESUME_DEFAULTS = {"group_by_length": None}


def _hf_model(model) -> torch.nn.Module:
    """The Transformers model under a PeftModel (the model itself otherwise)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _enable_gradient_checkpointing(model) -> None:
    from transformers import PreTrainedModel
    hf = _hf_model(model)
    if not isinstance(hf, PreTrainedModel):
        raise ValueError(f"{type(hf).__name__} does not support gradient checkpointing (a Transformers model does)")
    # Non-reentrant checkpointing works with a frozen embedding (no input that requires grad).
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation


def distributed():
    """torch.distributed when this process is one of several, else None."""
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _any(dist, flag: bool, device=None) -> bool:
    """True if the flag is set on any process (every process must take the same branch, or the others hang)."""
    if dist is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _Signals:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps; a second signal stops at once."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class TrainState:
    """One run's state, read and changed by the step functions below (setup, resume, micro_step,
    optimizer_step, after_step); a checkpoint holds what resuming needs of it."""
    config: TrainConfig
    model: torch.nn.Module             # what train() was given; its trainable parameters are updated in place
    net: torch.nn.Module               # the model, or its DDP wrapper (forward passes go through it)
    sharded: bool                      # FSDP2: the frozen base is sharded; trainable gradients averaged by hand
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Optional[torch.amp.GradScaler]  # fp16 only
    stream: BatchStream                # micro-batches; its position is the data's resume state
    collate: Callable
    total: int                         # optimizer steps of the whole run
    device: torch.device
    autocast: Any                      # the autocast context every forward runs in
    dist: Any                          # torch.distributed when several processes train, else None
    rank: int
    world: int
    keep_logits: bool                  # the model's forward takes logits_to_keep
    label_head: Optional[torch.nn.Linear]  # the LM head, when the loss is taken at label positions (label_loss.py)
    pass_positions: bool               # ... and position_ids
    out_dir: Optional[Path]
    save_adapter: bool
    eval_examples: Optional[Sequence[dict]] = None
    eval_fn: Optional[Callable[[torch.nn.Module], dict]] = None
    step: int = 0                      # optimizer steps done
    tokens_seen: int = 0
    elapsed0: float = 0.0              # seconds trained by earlier attempts (resume)
    t0: float = 0.0                    # when this attempt started training
    last_good: Optional[Path] = None   # the newest checkpoint, named when training diverges
    grad_norm: float = float("nan")
    losses: list = field(default_factory=list)   # every step's loss
    window: list = field(default_factory=list)   # losses since the last log line
    win_tokens: int = 0
    win_t: float = 0.0
    aux_window: list = field(default_factory=list)   # auxiliary losses (MoE balance) since the last log line
    evals: list = field(default_factory=list)

    @property
    def log_path(self) -> Optional[Path]:
        return self.out_dir / LOG_FILE if self.out_dir else None


def _wrap_ddp(model, device: torch.device):
    from torch.nn.parallel import DistributedDataParallel
    # Only trainable parameters are synchronised; frozen base buffers are the same everywhere already.
    sync_off = ({"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **sync_off)


def setup(model, train_examples: Sequence[dict], collate, cfg: TrainConfig,
          eval_examples: Optional[Sequence[dict]] = None, eval_fn: Optional[Callable] = None,
          save_adapter: bool = True) -> TrainState:
    """Optimizer, schedule, precision, gradient checkpointing, DDP and the batch stream of a fresh run."""
    device = next(model.parameters()).device
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    if cfg.resume and out_dir is None:
        raise ValueError("resume=True needs output_dir (where the checkpoints are)")
    set_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; wrap it with peftlab.get_peft_model(...) first")
    total = cfg.total_steps(len(train_examples))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total))
    optimizer = adamw(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, warmup, cfg.schedule, cfg.min_lr_ratio))
    autocast, _, needs_scaler = autocast_for(device, cfg.precision)
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    micro = cfg.batch_size // cfg.grad_accum
    dist = distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    if micro % world:
        raise ValueError(f"each micro-batch ({micro} = batch_size / grad_accum) must split evenly over the {world} "
                         f"processes; use a batch size that is a multiple of {world * cfg.grad_accum}")
    sharded = bool(dist and cfg.fsdp)
    if sharded:
        from .sharding import shard_frozen_base
        shard_frozen_base(model)
    net = _wrap_ddp(model, device) if dist and not sharded else model
    return TrainState(cfg, model, net, sharded, params, optimizer, scheduler,
                      torch.amp.GradScaler(device.type) if needs_scaler else None,
                      BatchStream(train_examples, micro, collate, seed=cfg.seed, group_by_length=cfg.group_by_length),
                      collate, total, device, autocast,
                      dist, rank, world, forward_accepts(model, "logits_to_keep"),
                      # FSDP2 gathers the (sharded) head weight inside the forward only: keep the stock loss there
                      None if sharded else head_of(_hf_model(model)),
                      forward_accepts(model, "position_ids"), out_dir, save_adapter, eval_examples, eval_fn)


def resume(state: TrainState) -> None:
    """Continue from the newest checkpoint (resume=True) after checking it was written with the same settings;
    without resume, refuse a directory that already has checkpoints (never mix two runs in one)."""
    cfg, out_dir = state.config, state.out_dir
    if not cfg.resume:
        if out_dir is not None and ckpt.latest_checkpoint(out_dir) is not None:
            raise FileExistsError(f"{out_dir} already has checkpoints from an earlier run; pass --resume to continue "
                                  f"it, or choose another output directory")
        return
    path = ckpt.latest_checkpoint(out_dir)
    if path is None:
        raise FileNotFoundError(f"resume: no checkpoint in {out_dir / ckpt.DIR} (the run wrote none yet); start "
                                f"without --resume")
    saved = ckpt.load_checkpoint(path, state.model, state.optimizer, state.scheduler, state.scaler)
    recorded = {**RESUME_DEFAULTS, **saved["run"]}
    mismatch = {k: (recorded.get(k), v) for k, v in cfg.resume_signature().items()
                if recorded.get(k) != (list(v) if isinstance(v, tuple) else v)}
    if saved["total_steps"] != state.total:
        mismatch["total_steps"] = (saved["total_steps"], state.total)
    if mismatch:
        raise ValueError(f"resume: {path} was written by a run with other settings: "
                         + ", ".join(f"{k}={a!r} there, {b!r} now" for k, (a, b) in mismatch.items())
                         + "; resume with the same settings, or train into a new output directory")
    state.step, state.tokens_seen, state.elapsed0 = saved["step"], saved["tokens_seen"], saved["elapsed_s"]
    state.stream.position = saved["data_position"]
    ckpt.truncate_log(state.log_path, state.step)


def _next_batch(state: TrainState) -> dict:
    """This process's share of the next micro-batch, on the device, trimmed to what the forward needs."""
    batch = {k: v.to(state.device) for k, v in state.stream.next(state.rank, state.world).items()}
    if not state.pass_positions:
        batch.pop("position_ids", None)
    labels = batch.get("labels")
    if state.keep_logits and state.label_head is None and labels is not None and labels.dim() == 2:
        # Only positions that predict a labelled token need logits: with left padding and the loss on
        # completions these are the last few columns (saves the LM head on the prompt). labels: (batch, seq).
        cols = (labels != -100).any(0).nonzero()
        first = int(cols[0]) if len(cols) else 0
        if first >= 1:
            keep = labels.shape[1] - first + 1
            batch["labels"] = labels[:, -keep:]
            batch["logits_to_keep"] = keep
    return batch


def _where(state: TrainState) -> str:
    return f"the last good checkpoint is {state.last_good}" if state.last_good else "no checkpoint was written yet"


def micro_step(state: TrainState, m: int) -> tuple[float, int]:
    """Forward and backward of micro-batch m of the step; (its loss / grad_accum, its tokens). A NaN/inf loss on
    any process stops every process before the backward (the weights never see it)."""
    cfg, dist = state.config, state.dist
    batch = _next_batch(state)
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    # DDP all-reduces gradients on the last micro-batch of a step only (FSDP2 runs: optimizer_step averages them)
    last = m == cfg.grad_accum - 1
    sync = contextlib.nullcontext() if not dist or state.sharded or last else state.net.no_sync()
    gather = (gathered_loss(_hf_model(state.model), state.label_head)
              if state.label_head is not None and batch.get("labels") is not None and batch["labels"].dim() == 2
              else contextlib.nullcontext())
    with sync:
        with state.autocast, gather:
            loss = state.net(**batch).loss
        if isinstance(state.model, PeftModel) and state.model.last_aux_losses:
            state.aux_window.append(sum(float(v) for v in state.model.last_aux_losses.values()))
        if loss is None:
            raise ValueError("the model returned no loss; the batches need labels")
        bad = _any(dist, not bool(torch.isfinite(loss.detach())), state.device)
        if not bad:
            loss = loss / cfg.grad_accum
            (state.scaler.scale(loss) if state.scaler else loss).backward()
    if bad:
        value = float(loss.detach()) if not torch.isfinite(loss.detach()) else "nan/inf on another process"
        raise TrainingDiverged(
            f"the loss became {value} at step {state.step + 1} (micro-batch {state.stream.position}); stopped "
            f"before updating the weights with it; {_where(state)}. Lower the learning rate (now {cfg.lr:g}), "
            f"keep max_grad_norm set, use precision fp32, or check the data")
    return float(loss.detach()), tokens


def optimizer_step(state: TrainState, step_loss: float, step_tokens: int) -> float:
    """Clip, the methods' gradient hook, update, schedule, their per-step hook, zero the gradients; returns the lr."""
    cfg, dist, scaler, optimizer = state.config, state.dist, state.scaler, state.optimizer
    if dist:  # log every process's tokens, and the loss averaged over the processes
        t = torch.tensor([float(step_tokens), step_loss], device=state.device)
        dist.all_reduce(t)
        step_tokens, step_loss = int(t[0].item()), float(t[1].item()) / state.world
    state.tokens_seen += step_tokens
    state.win_tokens += step_tokens
    if state.sharded:
        from .sharding import average_gradients
        average_gradients(state.params, dist, state.world)
    if scaler:
        scaler.unscale_(optimizer)
    if cfg.max_grad_norm:
        state.grad_norm = float(torch.nn.utils.clip_grad_norm_(state.params, cfg.max_grad_norm))
        if not math.isfinite(state.grad_norm) and scaler is None:  # (fp16: the scaler skips such a step)
            raise TrainingDiverged(
                f"the gradient norm became {state.grad_norm} at step {state.step + 1}; stopped before updating the "
                f"weights; {_where(state)}. Lower the learning rate or check the data")
    lr_now = optimizer.param_groups[0]["lr"]
    if isinstance(state.model, PeftModel):  # where HF Trainer's on_pre_optimizer_step runs: after clipping
        state.model.before_optimizer_step(state.step)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    state.scheduler.step()
    if isinstance(state.model, PeftModel):
        state.model.on_step_end(state.step)  # AdaLoRA's budget: after the update, with the gradients still there
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.losses.append(step_loss)
    state.window.append(step_loss)
    return lr_now


def save(state: TrainState) -> Optional[Path]:
    """A checkpoint of the step just done (rank 0 writes; the others wait for it)."""
    if state.out_dir is None:
        return None
    if state.rank != 0:
        state.dist.barrier()  # rank 0 is writing
        return ckpt.latest_checkpoint(state.out_dir)
    extra = {"total_steps": state.total, "data_position": state.stream.position, "tokens_seen": state.tokens_seen,
             "elapsed_s": state.elapsed0 + time.time() - state.t0, "run": state.config.resume_signature(),
             # this step's evaluation, if it had one: checkpoint pruning keeps the best (lowest eval_loss)
             "eval": state.evals[-1] if state.evals and state.evals[-1]["step"] == state.step else None}
    path = ckpt.save_checkpoint(state.out_dir, state.step, state.model, state.optimizer, state.scheduler, extra,
                                state.scaler, save_adapter=state.save_adapter, keep=state.config.keep_checkpoints)
    if state.dist:
        state.dist.barrier()
    return path


def log(state: TrainState, record: dict) -> None:
    if state.log_path is not None and state.rank == 0:
        state.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(state.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def evaluate(state: TrainState) -> dict:
    """eval_loss on eval_examples and eval_fn's metrics now, logged."""
    rec: dict = {"step": state.step}
    if state.eval_examples:
        with state.autocast:
            rec["eval_loss"] = eval_loss(state.model, state.eval_examples, state.collate)
    if state.eval_fn is not None:
        rec.update({k: v for k, v in state.eval_fn(state.model).items() if isinstance(v, (int, float, str))})
    log(state, rec)
    return rec


def _routing_record(state: TrainState) -> dict:
    """Mixtures: the auxiliary loss (already inside "loss") and each adapter's routing since the last log line:
    mean router entropy and the most loaded slot's share (averaged over layers); the statistics are then reset."""
    rec: dict = {}
    if state.aux_window:
        rec["aux_loss"] = sum(state.aux_window) / len(state.aux_window)   # per micro-batch
        state.aux_window = []
    if isinstance(state.model, PeftModel):
        stats = state.model.get_routing_stats()
        routing = {name: {"entropy": g["all"]["mean_entropy"],
                          "max_load": max(g["all"]["mean_load"]) if g["all"]["mean_load"] else None}
                   for name, g in stats.items() if "all" in g}
        if routing:
            rec["routing"] = routing
            state.model.reset_routing_stats()
    return rec


def after_step(state: TrainState, lr_now: float, signals: _Signals, bar) -> None:
    """The cadences: a log line every log_every steps, evaluation every eval_every, a checkpoint every
    save_every; and a checkpoint then TrainingInterrupted when SIGINT/SIGTERM arrived on any process."""
    cfg, step = state.config, state.step
    if step % max(1, cfg.log_every) == 0 or step == state.total:
        now = time.time()
        tps = state.win_tokens / max(now - state.win_t, 1e-9)
        rec = {"step": step, "epoch": round(state.stream.epoch, 4), "loss": sum(state.window) / len(state.window),
               "lr": lr_now, "grad_norm": state.grad_norm, "tokens_per_s": tps,
               "elapsed_s": state.elapsed0 + now - state.t0}
        rec.update(_routing_record(state))
        log(state, rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr_now:.2e}", tok_s=f"{tps:.0f}")
        state.window, state.win_tokens, state.win_t = [], 0, now
    if cfg.eval_every and step % cfg.eval_every == 0 and step < state.total:
        state.evals.append(evaluate(state))
        state.model.train()
    if cfg.save_every and step % cfg.save_every == 0 and step < state.total:
        state.last_good = save(state)
    if _any(state.dist, signals.received is not None, state.device):
        path = save(state)
        name = signal.Signals(signals.received).name if signals.received else "a signal (on another process)"
        raise TrainingInterrupted(f"{name} received: stopped after step {step}/{state.total}"
                                  + (f"; checkpoint {path} (continue with --resume)" if path else ""))


def _finish(state: TrainState) -> dict:
    """Final evaluation and checkpoint; the summary train() returns."""
    wall = time.time() - state.t0
    if state.config.eval_every:
        state.evals.append(evaluate(state))
    state.model.eval()
    if state.out_dir is not None:
        save(state)
    losses, tokens, elapsed = state.losses, state.tokens_seen, state.elapsed0 + wall
    return {"steps": state.step, "total_steps": state.total, "loss_first": losses[0] if losses else None,
            "loss_last": sum(losses[-10:]) / len(losses[-10:]) if losses else None, "losses": losses,
            "train_tokens": tokens, "wall_s": wall, "elapsed_s": elapsed,
            "tokens_per_s": (tokens / elapsed) if tokens else 0.0,
            "trainable_params": sum(p.numel() for p in state.params), "evals": state.evals,
            "grouped_by_length": state.stream.grouped,
            "config": asdict(state.config)}


def train(model, train_examples: Sequence[dict], collate, config: TrainConfig,
          eval_examples: Optional[Sequence[dict]] = None,
          eval_fn: Optional[Callable[[torch.nn.Module], dict]] = None, save_adapter: bool = True) -> dict:
    """Train `model` (a PeftModel, or any module with trainable parameters) in place; returns a summary dict.

    train_examples: encoded examples (data.encode_causal / encode_classification); collate: data.Collator.
    eval_fn(model) -> metrics, called with eval_loss every `eval_every` steps (and at the end if set).
    """
    state = setup(model, train_examples, collate, config, eval_examples=eval_examples, eval_fn=eval_fn,
                  save_adapter=save_adapter)
    resume(state)
    from tqdm.auto import tqdm
    bar = tqdm(total=state.total, initial=state.step, desc="train", disable=not config.progress or state.rank != 0,
               dynamic_ncols=True)
    model.train()
    state.t0 = state.win_t = time.time()
    state.last_good = ckpt.latest_checkpoint(state.out_dir) if state.out_dir is not None else None
    try:
        with _Signals() as signals:
            while state.step < state.total:
                step_loss, step_tokens = 0.0, 0
                for m in range(config.grad_accum):
                    loss, tokens = micro_step(state, m)
                    step_loss, step_tokens = step_loss + loss, step_tokens + tokens
                lr_now = optimizer_step(state, step_loss, step_tokens)
                bar.update(1)
                after_step(state, lr_now, signals, bar)
    finally:
        bar.close()
    return _finish(state)


def method_hooks_callback():
    """An HF `TrainerCallback` that runs peftlab's method hooks under a plain transformers.Trainer at the points
    peftlab's loop does: `PeftModel.before_optimizer_step` after clipping, before the update, and `on_step_end`
    after the optimizer step, before the gradients are zeroed. `peftlab.Trainer` adds it by itself."""
    from .hf_trainer import MethodHooks
    return MethodHooks()
