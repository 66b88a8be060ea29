"""run_continual: one adapter trained on a sequence of tasks, one after the other, and evaluated on every task after
each stage (`peftlab continual`). The continual-learning scenario of seeds/000 §4.3 (MTIL's metrics):

  a[i][j] = the score on task j after stage i (i, j = 1..T)
  Transfer = mean over j ≥ 2 of the mean over i < j of a[i][j]      (tasks not learnt yet: zero-shot transfer)
  Average  = mean over all i, j of a[i][j]
  Last     = mean over j of a[T][j]                                   (after the last stage)
plus each task's score right after learning it, its drop by the end (forgetting of the task), and the base's
general-English perplexity and untrained-task probe before the first and after the last stage.
A method that consolidates tasks (Tuner.consolidates_tasks: EWC-LoRA) gets PeftModel.end_task(batches of the
finished task) after each stage; any other method is sequential fine-tuning of the one adapter.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ...core.io import atomic_write_text
from .. import loop as L
from ..metrics import forgetting_change
from .config import ContinualConfig, JobError, comma_list
from .evaluate import Evaluator, Say, forgetting_probe, quiet
from .inputs import encode, load_base, load_data, output_dir, pick_eval_records
from .methods import method_config
from .run import jsonable, train_config


def mtil_metrics(a: list[list[float]]) -> dict:
    """Transfer, Average and Last of the T × T matrix a[i][j] (see the module docstring)."""
    t = len(a)
    transfer = [sum(a[i][j] for i in range(j)) / j for j in range(1, t)]
    return {"transfer": sum(transfer) / len(transfer) if transfer else None,
            "average": sum(map(sum, a)) / (t * t), "last": sum(a[-1]) / t}


def run_continual(config: ContinualConfig, say: Say = quiet) -> dict:
    """Train config.method on config.tasks in order; the summary `peftlab continual --json` prints (also written
    to OUTPUT/continual.json), with each stage's adapter in OUTPUT/stage-<i>-<task>/."""
    from ... import get_peft_model
    tasks = comma_list(config.tasks)
    if len(tasks) < 2:
        raise JobError("continual needs --tasks A,B[,C...]: at least two built-in tasks, learnt in that order")
    if config.task or config.data:
        raise JobError("continual takes its tasks from --tasks; leave out --task/--data")
    if not config.model:
        raise JobError("continual needs --model")
    unsupported = [flag for flag, on in (("--nproc", (config.nproc or 1) > 1), ("--fsdp", config.fsdp),
                                         ("--resume", config.resume), ("--eval-data", config.eval_data),
                                         ("--eval-every", config.eval_every)) if on]
    if unsupported:
        raise JobError(f"continual does not take {', '.join(unsupported)} (one process; every task is evaluated "
                       f"after each stage)")
    stages = [load_data(dataclasses.replace(config, task=t), "eval") for t in tasks]
    if any(d.kind != "generation" for d in stages):
        raise JobError("continual runs generation tasks (one adapter, exact match on each); "
                       + ", ".join(f"{d.name} is {d.kind}" for d in stages if d.kind != "generation"))
    output = output_dir(config.output, config.method, "continual")
    if (output / "continual.json").exists():
        raise JobError(f"{output} holds a finished continual run (continual.json); choose another --output")
    base, tok = load_base(config.model, config.device, "generation", None, config)
    configs = [dataclasses.replace(config, task=t) for t in tasks]
    evaluators = []
    for c, d in zip(configs, stages):
        records, _ = pick_eval_records(d.eval, c, d.name, True)
        evaluators.append(Evaluator.build(d, tok, c, records))
    encoded = [encode("generation", d.train, tok, c) for c, d in zip(configs, stages)]
    tc0 = train_config(config, output)
    info, cfg = method_config(config, "CAUSAL_LM", tc0.total_steps(len(encoded[0][0])))
    torch.manual_seed(config.seed)
    model = get_peft_model(base, cfg)
    probe = forgetting_probe(stages[0], tok, config, config.forgetting_size) if config.forgetting else None
    before = probe(model) if probe else None
    say(f"peftlab continual: {info.name} on {' -> '.join(tasks)}, {tc0.total_steps(len(encoded[0][0]))} steps each "
        f"-> {output}")
    matrix, stage_rows = [], []
    for i, (task, (examples, collate), c) in enumerate(zip(tasks, encoded, configs), 1):
        stage_dir = output / f"stage-{i}-{task}"
        # no checkpoints per stage (a stage is short; its adapter is saved below), and no resume across stages
        tc = dataclasses.replace(train_config(c, stage_dir), output_dir=None, save_every=None,
                                 progress=bool(config.progress))
        result = L.train(model, examples, collate, tc)
        micro, dev = tc.batch_size // tc.grad_accum, next(model.parameters()).device
        model.end_task({k: v.to(dev) for k, v in collate(examples[s:s + micro]).items()}   # consolidating methods
                       for s in range(0, len(examples), micro))                           # read a few (lazily)
        row = [evaluate(model).get("exact_match", 0.0) for evaluate in evaluators]
        matrix.append(row)
        model.save_pretrained(str(stage_dir / "adapter"))
        stage_rows.append({"stage": i, "task": task, "steps": result["steps"], "train_s": result["elapsed_s"],
                           "train_loss_last": result["loss_last"], "scores": dict(zip(tasks, row))})
        say(f"stage {i} ({task}): " + ", ".join(f"{t} {s:.3f}" for t, s in zip(tasks, row)))
        model.train()
    summary = {"command": "continual", "model": config.model, "method": info.name, "tasks": tasks,
               "matrix": matrix, **mtil_metrics(matrix),
               "learnt": {t: matrix[j][j] for j, t in enumerate(tasks)},
               "forgotten": {t: matrix[j][j] - matrix[-1][j] for j, t in enumerate(tasks)},
               "stages": stage_rows, "trainable_params": model.get_nb_trainable_parameters()[0],
               "forgetting": forgetting_change(before, probe(model)) if probe else None, "output": str(output)}
    atomic_write_text(output / "continual.json", json.dumps(summary, indent=1, default=jsonable))
    say(f"Transfer {summary['transfer']:.3f}, Average {summary['average']:.3f}, Last {summary['last']:.3f}"
        f" -> {output / 'continual.json'}")
    return summary
