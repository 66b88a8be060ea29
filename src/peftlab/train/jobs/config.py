"""Job options: one dataclass per command (train, eval, merge) whose fields are that command's flags and YAML keys.

The command line takes its defaults from these classes, so `peftlab train --help`, a YAML --config file and
`JobConfig()` in Python agree by construction (docs/DESIGN.md, "The command line").
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union


class JobError(ValueError):
    """A job asked for wrongly (a missing or conflicting option, a setting the method lacks): the user's to fix.
    The command line reports it as a usage error (exit code 2)."""


def comma_list(value: Optional[str]) -> list[str]:
    """A comma-separated option ("a, b,c") as its non-empty items; [] for None or ""."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def option_key(name: Any) -> str:
    """`--batch-size`, `batch-size` and `batch_size` name the same option."""
    return str(name).lstrip("-").replace("-", "_")


def check_keys(d: dict, known: set[str]) -> dict:
    """`d` with its keys spelled as fields; an unknown key is refused with the nearest known one named."""
    out = {}
    for k, v in d.items():
        key = option_key(k)
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            raise JobError(f"unknown key {k!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                           + f"; keys mirror the flags: {', '.join(sorted(known))}")
        out[key] = v
    return out


def read_yaml_mapping(path: Any, what: str) -> dict:
    """A --config YAML file holding one mapping (of `what`: flag names, bench keys) -> that mapping."""
    import yaml
    p = Path(path)
    if not p.is_file():
        raise JobError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise JobError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise JobError(f"--config {path}: expected a mapping of {what} to values")
    return data


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """YAML 1.1 reads `lr: 1e-3` as a string (its floats need a dot); a numeric option takes it as the number."""
    kinds = set(typing.get_args(hint)) or {hint}
    if isinstance(value, str) and not kinds & {str, Any}:
        for kind in (int, float):
            if kind in kinds:
                try:
                    return kind(value)
                except ValueError:
                    raise JobError(f"{name}: expected a number, got {value!r}") from None
    return value


@dataclass
class ModelOptions:
    model: Optional[str] = None        # an embedded model name (smollm2-135m, minilm-l6) or a local HF directory
    device: str = "auto"               # auto (CUDA if available) | cpu | cuda | cuda:N
    seed: int = 0
    quantize: Optional[str] = None     # nf4 | fp4 | int8: the base's linear layers quantised by bitsandbytes (QLoRA);
                                       # eval/merge of a train run's --output default to the run's
    double_quant: bool = True          # 4-bit: quantise the block scales too (~0.37 bits/weight saved)
    compute_dtype: Optional[str] = None  # 4-bit layers' matmul dtype: float32 | bfloat16 | float16 (default float32)

    @classmethod
    def fields(cls) -> dict[str, Any]:
        """Field name -> default."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict):
        """From the spellings of a YAML --config file or the flags (`batch-size` or `batch_size`); unknown keys are
        refused with a near match named, numbers given as strings are read as numbers."""
        hints = typing.get_type_hints(cls)
        values = check_keys(d, set(cls.fields()))
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DataOptions(ModelOptions):
    task: Optional[str] = None         # a built-in task: wordnet-antonyms, wordnet-supersense, wordnet-definitions
    data: Optional[str] = None         # JSONL: {"prompt","completion"}, {"text"} or {"text","label"} per line
    max_length: int = 512              # tokens per example
    chat_template: bool = False        # wrap prompts in the model's chat template (instruct models)
    eval_size: Optional[int] = None    # held-out examples evaluated: a fixed sample of N (0 = all); None: a built-in
                                       # task's fixed sample of 200, a data file whole (pick_eval_records)
    max_new_tokens: Optional[int] = None  # generation length for exact match (default: the task's, else 32)
    eval_batch_size: int = 64


@dataclass
class JobConfig(DataOptions):
    """A training run: what `peftlab train` takes (run it with run_job)."""
    method: str = "lora"               # registry name (peftlab methods)
    eval_data: Optional[str] = None    # held-out JSONL of the same format as data
    output: Optional[str] = None       # run directory (adapter/, checkpoints/, metrics.jsonl, run.json)
    steps: Optional[int] = None        # optimizer steps; or
    epochs: Optional[float] = None     # passes over the training data (default 1 when steps is not given)
    lr: Optional[float] = None         # None: the method's default_lr
    batch_size: int = 8                # examples per optimizer step
    grad_accum: int = 1                # micro-batches per step (batch_size is split into them)
    r: Optional[int] = None            # the method's rank field (MethodInfo.rank_field)
    alpha: Optional[float] = None      # its alpha field
    dropout: Optional[float] = None    # its dropout field
    target_modules: Union[str, list, None] = None  # "a,b", a regex, "all-linear", or a list of names
    set: Union[list, dict, None] = None  # any method config field: ["FIELD=VALUE", ...] or {FIELD: VALUE}
    schedule: str = "cosine"           # cosine | linear | constant
    warmup: Optional[int] = None       # warmup steps (default 5% of the steps)
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0  # 0 or None: no clipping
    precision: str = "auto"            # auto | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    group_by_length: Optional[bool] = None  # batches of similar-length examples (train/data.BatchStream);
    #                                         None: only when random batches would be >= 25% padding
    eval_every: Optional[int] = None   # evaluate every N steps
    save_every: Optional[int] = 50     # checkpoint every N steps (also at the end and on SIGINT/SIGTERM)
    keep_checkpoints: int = 2          # newest checkpoints kept (0: all); the newest and the best are never removed
    log_every: int = 10
    resume: bool = False               # continue from the newest checkpoint in output
    nproc: int = 1                     # processes (data parallel; run_job itself is one of them, under torchrun)
    fsdp: bool = False                 # with several processes: shard the frozen base with FSDP2 (else DDP)
    loftq: bool = False                # with quantize nf4/fp4 and a LoRA method: start the adapter at one LoftQ step,
    #                                    quantised base + adapter ≈ the unquantised weights (replace_lora_weights_loftq)
    eval_before: bool = True           # evaluate the task before training too
    forgetting: bool = True            # general-English perplexity and an untrained task, before and after
    forgetting_size: int = 100         # questions of the untrained task in the forgetting probe
    progress: bool = True


@dataclass
class EvalConfig(DataOptions):
    """An evaluation: what `peftlab eval` takes (run it with run_eval)."""
    adapter: Optional[str] = None      # adapter directory, or a train run's --output (its adapter/); None: the base
    split: str = "eval"                # built-in tasks: eval | test
    few_shot: int = 0                  # generation tasks: k training examples before each prompt
    forgetting: bool = False           # also run the forgetting probe
    forgetting_size: int = 100


@dataclass
class ContinualConfig(JobConfig):
    """A sequence of tasks learnt one after the other by one adapter: what `peftlab continual` takes (run it with
    run_continual); the training options apply to every stage."""
    tasks: Optional[str] = None        # comma-separated built-in tasks, in the order they are learnt


@dataclass
class ComposeConfig(DataOptions):
    """One adapter built from several without gradient training: what `peftlab compose smile|lorahub` takes (run it
    with run_compose). smile: SVD experts of the sources behind an SVD gate (methods/smile.py); lorahub: the
    weights of a linear composition of LoRA adapters searched on a few examples of the new task (--task/--data;
    methods/lora/lorahub.py)."""
    adapters: Optional[str] = None     # comma-separated LoRA adapter directories (or train runs' --output)
    models: Optional[str] = None       # smile: comma-separated fine-tuned model directories of the same base
    output: Optional[str] = None       # directory for the composed adapter
    k: Optional[int] = None            # smile: expert rank (default: the sources' largest LoRA rank)
    gate_k: int = 4                    # smile: right singular vectors per expert in the gate
    top_k: int = 1                     # smile: experts per token
    shots: int = 5                     # lorahub: examples of the new task the weights are fitted on
    budget: int = 40                   # lorahub: evaluations of the few-shot objective
    l1: float = 0.05                   # lorahub: the objective's l1 · Σ|w| term
    clusters: Optional[int] = None     # ttmm: clusters of the training prompts, one LoRA trained on each
    steps: Optional[int] = None        # ttmm --clusters: each expert's optimizer steps (default: one epoch)
    batch_size: int = 8                # ttmm --clusters: each expert's batch
    lr: Optional[float] = None         # ttmm --clusters: each expert's learning rate (default LoRA's)
    r: int = 8                         # ttmm --clusters: each expert's LoRA rank (all linear layers)
    beta: float = 0.2                  # ttmm: the merge kernel's width
    tau: float = 0.01                  # ttmm: weights at most tau leave an expert out
    encoder: str = "minilm-l6"         # ttmm: the sentence encoder of prompts and centroids


@dataclass
class MergeConfig(ModelOptions):
    """A merge: what `peftlab merge` takes (run it with run_merge). seed is unused; the model options are shared."""
    adapter: Optional[str] = None      # adapter directory, or a train run's --output (its adapter/)
    output: Optional[str] = None       # directory for the merged Transformers model
    requantize: bool = False           # a quantised base: quantise the merged weights again (default: save dense)
