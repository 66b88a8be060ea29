"""run_job: a whole training run from one JobConfig, what `peftlab train` does (and returns under --json).

Data -> base model -> method config (calibrated for data-driven methods) -> get_peft_model -> evaluation before
-> train (train/loop.py) -> evaluation and forgetting probe after -> adapter (or whole model) and run.json.
Under torch.distributed every process runs run_job: all train, rank 0 alone evaluates, speaks and saves.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ...core.io import atomic_write_text
from ...core.registry import MethodInfo, get_method
from .. import loop as L
from ..metrics import forgetting_change
from .config import JobConfig, JobError
from .evaluate import Evaluator, Say, fmt_metrics, forgetting_probe, quiet, routed_evaluation
from .inputs import QUANT_OPTIONS, JobData, device, encode, load_base, load_data, output_dir, pick_eval_records
from .methods import calibrate, method_config

BEFORE_FILE = "before.json"   # the untrained model's scores, kept so a resumed run reports the same "before"


@dataclass
class PreparedJob:
    """A train job ready to run: the adapted model and everything its training and evaluation read."""
    config: JobConfig
    data: JobData
    output: Path
    info: MethodInfo
    model: Any                 # the PeftModel (get_peft_model of the base)
    tok: Any
    train_config: L.TrainConfig
    train_examples: list
    collate: Any
    eval_records: list
    trainable_params: int
    total_params: int
    rank: int = 0              # this process's rank under torch.distributed (0 alone)
    started: float = 0.0       # time.time() when the job began (the summary's wall_s counts from it)


def init_distributed(device_name: str) -> tuple[int, str]:
    """Join the process group when started by torchrun (`peftlab train --nproc N` relaunches under it);
    returns (rank, the device this process uses: its own GPU on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, device_name
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device(device_name).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), device_name


def end_distributed(finished: bool) -> None:
    """Leave the process group init_distributed joined. Without this each process exits with gloo's threads still
    running, and a process that exits first (the ranks other than 0 finish before rank 0 has evaluated and saved)
    can die in C++'s `terminate called without an active exception`, failing the run. A finished run first waits
    for every rank, so none tears down the connections another still uses; a failed one does not wait (the
    others may never arrive)."""
    dist = L.distributed()
    if dist is None:
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    dist = L.distributed()
    if dist is not None:
        dist.barrier()


def train_config(config: JobConfig, output: Path) -> L.TrainConfig:
    return L.TrainConfig(output_dir=str(output), steps=config.steps, epochs=config.epochs,
                         batch_size=config.batch_size, grad_accum=config.grad_accum,
                         lr=config.lr if config.lr is not None else get_method(config.method).default_lr,
                         weight_decay=config.weight_decay, schedule=config.schedule, warmup_steps=config.warmup,
                         max_grad_norm=config.max_grad_norm or None, precision=config.precision,
                         gradient_checkpointing=bool(config.gradient_checkpointing), fsdp=bool(config.fsdp),
                         group_by_length=config.group_by_length,
                         eval_every=config.eval_every,
                         save_every=config.save_every, keep_checkpoints=config.keep_checkpoints,
                         log_every=config.log_every, seed=config.seed,
                         resume=bool(config.resume), progress=bool(config.progress))


# the methods whose adapters are plain LoRA A, B on every layer (what LoftQ sets)
LOFTQ_METHODS = ("lora", "rslora", "lora-dropout", "lora-fa")


def _check(config: JobConfig) -> None:
    if not config.model:
        raise JobError("train needs --model (an embedded name or a local model directory)")
    if config.steps is not None and config.epochs is not None:
        raise JobError("give --steps or --epochs, not both")
    if (config.nproc or 1) > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise JobError(f"nproc={config.nproc}: run_job is one process; start {config.nproc} of them with torchrun "
                       f"(or `peftlab train --nproc {config.nproc}`, which does)")
    if config.loftq and (config.quantize not in ("nf4", "fp4") or config.method not in LOFTQ_METHODS):
        raise JobError(f"--loftq starts a LoRA on a 4-bit base (--quantize nf4 or fp4, --method "
                       f"{'/'.join(LOFTQ_METHODS)}); got --quantize {config.quantize} --method {config.method}")
    if config.fsdp and int(os.environ.get("WORLD_SIZE", "1")) <= 1 and (config.nproc or 1) <= 1:
        raise JobError("--fsdp shards the frozen base over several processes: add --nproc N (N >= 2), or start the "
                       "processes with torchrun")


def _init_loftq(model, config: JobConfig, say: Say) -> None:
    from ...methods.lora import replace_lora_weights_loftq
    from ...models import model_path
    replace_lora_weights_loftq(model, str(model_path(config.model, fetch=False)), match_scaling=True)
    say("LoftQ: each adapter starts at the rank-r part of (unquantised − quantised) weight")


def prepare_job(config: JobConfig, say: Say = quiet) -> PreparedJob:
    """Join the process group (under torchrun), load the data and the base model, build and calibrate the method's
    config, and adapt the model. `run_prepared` then runs it; code that needs the trained model (the demo, the
    bench) keeps the PreparedJob, whose `.model` is trained in place."""
    from ... import get_peft_model
    from ..checkpoint import latest_checkpoint
    _check(config)
    started = time.time()
    rank, dev = init_distributed(config.device)
    config = dataclasses.replace(config, device=dev)
    say = say if rank == 0 else quiet
    torch.manual_seed(config.seed)
    get_method(config.method)  # an unknown method fails before any data or model is loaded
    data = load_data(config, eval_data=config.eval_data)
    output = output_dir(config.output, config.method, data.name)
    say(f"peftlab train: {config.method} on {data.name} ({data.kind}, {len(data.train)} training examples) "
        f"-> {output}")
    if not config.resume and latest_checkpoint(output) is not None:
        raise JobError(f"{output} already has checkpoints from an earlier run; add --resume to continue it, or "
                       f"choose another --output")
    base, tok = load_base(config.model, config.device, data.kind, data.labels, config)
    if config.quantize:  # HF PEFT's preparation: base frozen, half-precision leftovers in fp32
        from ...helpers import prepare_model_for_kbit_training
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        say(f"base quantised by bitsandbytes: {config.quantize}"
            f"{' with double quantisation' if config.double_quant and config.quantize != 'int8' else ''}")
    train_ex, collate = encode(data.kind, data.train, tok, config, data.labels)
    eval_records, which = pick_eval_records(data.eval, config, config.eval_data or data.name,
                                             data.task is not None)
    if data.eval:
        say(which)
    tc = train_config(config, output)
    total = tc.total_steps(len(train_ex))
    info, cfg = method_config(config, "SEQ_CLS" if data.kind == "classification" else "CAUSAL_LM", total)
    calibrate(cfg, base, tok, train_ex, collate, tc.batch_size // tc.grad_accum)
    torch.manual_seed(config.seed)
    pm = get_peft_model(base, cfg)
    if config.loftq and not config.resume:  # a resumed run reads its trained A, B from the checkpoint instead
        _init_loftq(pm, config, say)
    if config.fsdp:   # what FSDP2 cannot shard is refused before any training (L.train would refuse it too)
        from ..sharding import check_shardable
        try:
            check_shardable(pm)
        except ValueError as e:
            raise JobError(str(e)) from None
    trainable, n_all = pm.get_nb_trainable_parameters()
    say(f"method {info.name} ({info.category}): {trainable:,} trainable of {n_all:,} parameters "
        f"({100 * trainable / n_all:.3f}%), {total} steps of {tc.batch_size}")
    return PreparedJob(config, data, output, info, pm, tok, tc, train_ex, collate, eval_records, trainable, n_all,
                       rank, started)


def _before(job: PreparedJob, evaluate: Evaluator, probe) -> dict:
    """The untrained model's scores (measured once: a resumed run reads the first attempt's)."""
    path = job.output / BEFORE_FILE
    if job.config.resume and path.is_file():
        return json.loads(path.read_text())
    before = {"eval": evaluate(job.model) if job.config.eval_before else None,
              "forgetting": probe(job.model) if probe else None}
    job.output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(before, indent=1))
    return before


def _train(job: PreparedJob, evaluate: Optional[Evaluator] = None) -> dict:
    """train/loop.py's train(); with `evaluate` (rank 0), also eval_loss on the encoded held-out records (none for
    multiple choice, whose records are questions, not training examples) and evaluate() every eval_every steps."""
    records = job.eval_records if evaluate is not None and job.data.kind != "multiple-choice" else []
    eval_ex = encode(job.data.kind, records, job.tok, job.config, job.data.labels)[0] if records else None
    return L.train(job.model, job.train_examples, job.collate, job.train_config, eval_examples=eval_ex,
                   eval_fn=evaluate if job.config.eval_every else None, save_adapter=job.info.saves == "adapter")


def _summary(job: PreparedJob, result: dict, before: dict, after: dict) -> dict:
    tc = job.train_config
    return {"command": "train", "model": job.config.model, "method": job.info.name, "task": job.data.name,
            **{k: getattr(job.config, k) for k in QUANT_OPTIONS}, "loftq": job.config.loftq,
            "kind": job.data.kind, "steps": result["steps"], "batch_size": tc.batch_size, "lr": tc.lr,
            "trainable_params": job.trainable_params, "total_params": job.total_params,
            "train_loss_first": result["loss_first"], "train_loss_last": result["loss_last"],
            "train_tokens": result["train_tokens"], "tokens_per_s": result["tokens_per_s"],
            "grouped_by_length": result["grouped_by_length"],
            "train_s": result["elapsed_s"], "eval_before": before["eval"], "eval": after}


def save_result(job: PreparedJob) -> Path:
    """The adapter directory, or (a method that changes the whole model: MethodInfo.saves == "model") a plain
    Transformers model with its tokenizer; label names beside either."""
    from ..checkpoint import write_failure
    from ..data import save_labels
    if job.info.saves == "model":
        target = job.output / "model"
        job.model.merge_and_unload().save_pretrained(str(target))
        job.tok.save_pretrained(str(target))
    else:
        target = job.output / "adapter"
        try:
            job.model.save_pretrained(str(target))
        except OSError as e:  # a full disk: name the file and the checkpoint to resume from
            raise write_failure(Path(e.filename or target), e, job.output) from e
    if job.data.labels:
        save_labels(target, job.data.labels)
    return target


def _forgetting(job: PreparedJob, after: Optional[dict], before: dict, say: Say) -> Optional[dict]:
    if after is None:
        if job.config.forgetting:
            say("forgetting:      not measured (a classification model has no language-modelling head)")
        return None
    change = forgetting_change(before["forgetting"], after)
    say("forgetting:      " + ", ".join(f"{k} {v['before']:.4g} -> {v['after']:.4g}" for k, v in change.items()))
    return change


def run_job(config: JobConfig, say: Say = quiet) -> dict:
    """Train as `config` says; returns the summary `peftlab train --json` prints (also written to run.json).

    say(*parts) receives the human-readable progress lines (rank 0 only). Raises JobError for options the user
    must change, TrainingDiverged (NaN/inf) and TrainingInterrupted (SIGINT/SIGTERM, after a checkpoint).
    On processes other than rank 0 it trains and returns {}."""
    return run_prepared(prepare_job(config, say), say)


def run_prepared(job: PreparedJob, say: Say = quiet) -> dict:
    """Evaluate before, train, evaluate and probe forgetting after, save; the summary (rank 0; {} elsewhere).
    Under DDP the other ranks only train; under FSDP (config.fsdp) every forward needs every rank, so they also
    run the evaluations after training in lockstep with rank 0, which alone reports and saves."""
    config = job.config
    lockstep = bool(config.fsdp) and L.distributed() is not None
    if job.rank and not lockstep:  # evaluation and saving happen on rank 0; the other processes only train
        barrier()
        _train(job)
        return {}
    evaluate = Evaluator.build(job.data, job.tok, config, job.eval_records)
    probe = forgetting_probe(job.data, job.tok, config, config.forgetting_size) if config.forgetting else None
    before = _before(job, evaluate, probe) if job.rank == 0 else None   # the base is not sharded yet
    if before and before["eval"]:
        say(f"before training: {fmt_metrics(before['eval'])}")
    barrier()
    result = _train(job, evaluate)
    after, routing = routed_evaluation(evaluate, job.model, job.data.name)
    forgotten = probe(job.model) if probe else None
    if job.rank:
        return {}
    say(f"after training:  {fmt_metrics(after)}" if job.eval_records else
        "after training:  no held-out data to evaluate on (give --eval-data FILE.jsonl)")
    summary = _summary(job, result, before, after)
    if routing:
        summary["routing"] = routing
    summary["forgetting"] = _forgetting(job, forgotten, before, say)
    summary["saved"] = str(save_result(job))
    summary["wall_s"] = time.time() - job.started
    atomic_write_text(job.output / "run.json", json.dumps(summary, indent=1, default=jsonable))
    say(f"saved {summary['saved']} ({result['tokens_per_s']:.0f} tokens/s, {summary['wall_s']:.0f} s)")
    return summary


def jsonable(o):
    """json.dumps default for summaries: tensors/numpy scalars as numbers, paths as strings, sets as lists."""
    if isinstance(o, (torch.Tensor, np.generic)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
