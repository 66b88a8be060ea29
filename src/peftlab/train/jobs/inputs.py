"""What a job reads: its data (a built-in task or JSONL files), the base model and tokenizer, encoded examples."""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import data as D
from .config import DataOptions, JobError

# JSONL format (train/data.py) -> what the job does with it
KINDS = {"prompt-completion": "generation", "text": "lm", "classification": "classification"}


@dataclass
class JobData:
    kind: str                  # generation | lm | classification | multiple-choice
    name: str                  # task name or data file
    train: list
    eval: list
    labels: Optional[list] = None   # classification label names; index = class id
    task: Any = None           # the built-in Task, when the data is one


def sample(records: Sequence, n: int, seed: int) -> list:
    """A fixed sample of n records in their order (all of them when n is 0 or at least their number)."""
    if not n or n >= len(records):
        return list(records)
    idx = sorted(random.Random(f"eval-{seed}").sample(range(len(records)), n))
    return [records[i] for i in idx]


TASK_EVAL_SIZE = 200  # a built-in task's held-out examples scored by default (a fixed sample)


def pick_eval_records(records: Sequence, config: DataOptions, name: str, from_task: bool) -> tuple[list, str]:
    """The held-out records a job scores, and a line saying which: a built-in task's fixed sample of
    TASK_EVAL_SIZE unless --eval-size says otherwise; a data file whole unless --eval-size N asks for a sample."""
    n = config.eval_size if config.eval_size is not None else (TASK_EVAL_SIZE if from_task else 0)
    chosen = sample(records, n, config.seed)
    if len(chosen) == len(records):
        return chosen, f"evaluating on all {len(records)} held-out examples of {name}"
    return chosen, (f"evaluating on a fixed sample of {len(chosen)} of the {len(records)} held-out examples of "
                    f"{name} (--eval-size N for another size, 0 for all)")


def load_data(config: DataOptions, split: str = "eval", eval_data: Optional[str] = None) -> JobData:
    """The task's training records and its `split`, or the JSONL file (and eval_data, a held-out file)."""
    if bool(config.task) == bool(config.data):
        raise JobError("give exactly one of --task NAME (built-in) or --data FILE.jsonl")
    if config.task:
        from ..tasks import get_task
        t = get_task(config.task)
        return JobData(t.kind, t.name, t.train, t.split(split), t.labels, t)
    records = D.read_jsonl(config.data)
    fmt = D.data_format(records, str(config.data))
    eval_records = []
    if eval_data:
        eval_records = D.read_jsonl(eval_data)
        efmt = D.data_format(eval_records, str(eval_data))
        if efmt != fmt:
            raise D.DataError(f"{eval_data}: {efmt!r} data, but {config.data} is {fmt!r} data; use one format")
    kind = KINDS[fmt]
    labels = D.label_names(records) if kind == "classification" else None
    return JobData(kind, str(config.data), records, eval_records, labels)


def device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise JobError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_base(model: str, device_name: str, kind: str, labels: Optional[list] = None, options=None):
    """(model, tokenizer): a sequence-classification model with a head of len(labels) for classification, a
    causal LM otherwise; quantised by bitsandbytes when options (ModelOptions) say `quantize`."""
    from ...models import QUANTIZE, load_model
    task = "seq-cls" if kind == "classification" else "causal-lm"
    quant = {}
    if options is not None and options.quantize:
        if options.quantize not in QUANTIZE:
            raise JobError(f"--quantize {options.quantize}: expected one of {', '.join(QUANTIZE)}")
        if options.compute_dtype is not None and options.compute_dtype not in COMPUTE_DTYPES:
            raise JobError(f"--compute-dtype {options.compute_dtype}: expected one of {', '.join(COMPUTE_DTYPES)}")
        quant = dict(quantize=options.quantize, double_quant=bool(options.double_quant),
                     compute_dtype=COMPUTE_DTYPES.get(options.compute_dtype), device=device(device_name))
    base, tok = load_model(model, task=task, num_labels=len(labels) if labels else None, **quant)
    if labels:
        base.config.id2label = dict(enumerate(labels))
        base.config.label2id = {n: i for i, n in enumerate(labels)}
    # bitsandbytes places a quantised model while loading it; transformers refuses to move one afterwards
    return (base if quant else base.to(device(device_name))), tok


QUANT_OPTIONS = ("quantize", "double_quant", "compute_dtype")


def recorded_run(adapter: Optional[str]) -> dict:
    """The run.json of the train run that wrote this adapter (in the run directory given, or above its adapter/);
    {} for an adapter that did not come from `peftlab train` or whose run.json cannot be read."""
    if not adapter:
        return {}
    for run_json in (Path(adapter) / "run.json", Path(adapter).parent / "run.json"):
        if run_json.is_file():
            try:
                recorded = json.loads(run_json.read_text())
            except (OSError, ValueError):
                return {}
            return recorded if isinstance(recorded, dict) else {}
    return {}


def with_run_defaults(config):
    """eval/merge options left unset taken from the train run that wrote config.adapter: its base model, its task
    (eval, when neither --task nor --data is given) and its quantisation, so `peftlab eval --adapter RUN` evaluates
    a (Q)LoRA run on the base and task it was trained on. Options given on the command line win."""
    recorded = recorded_run(config.adapter)
    if not recorded:
        return config
    fill = {}
    if not config.model and recorded.get("model"):
        fill["model"] = recorded["model"]
    from ..tasks import TASKS
    if isinstance(config, DataOptions) and not (config.task or config.data) and recorded.get("task") in TASKS:
        fill["task"] = recorded["task"]   # a built-in task; a run on a --data file records the file's path
    if not config.quantize and recorded.get("quantize"):
        fill.update({k: recorded[k] for k in QUANT_OPTIONS if k in recorded})
    return dataclasses.replace(config, **fill)


def encode(kind: str, records: Sequence[dict], tok, config: DataOptions, labels: Optional[list] = None):
    """(encoded examples, collator); causal LMs pad on the left, so generation continues right after each prompt."""
    if kind == "classification":
        return D.encode_classification(records, tok, labels, config.max_length), D.Collator(tok.pad_token_id, "right")
    return (D.encode_causal(records, tok, config.max_length, bool(config.chat_template)),
            D.Collator(tok.pad_token_id, "left"))


def adapter_directory(path: Optional[str]) -> Optional[str]:
    """--adapter: an adapter directory, or a train run's --output, whose adapter/ holds the adapter."""
    from ...core.config import CONFIG_NAME
    if not path:
        return None
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return str(p)
    if (p / "adapter" / CONFIG_NAME).is_file():
        return str(p / "adapter")
    if (p / "model" / "config.json").is_file():
        raise JobError(f"{path} is a run whose method saves the whole model ({p / 'model'}): give that directory as "
                       f"--model, without --adapter")
    raise JobError(f"--adapter {path}: no {CONFIG_NAME} there, nor in {p / 'adapter'}; give an adapter directory or "
                   f"the --output directory of a `peftlab train` run")


def output_dir(output: Optional[str], method: str, data_name: str) -> Path:
    return Path(output or f"peftlab-runs/{method}-{Path(data_name).stem}")
