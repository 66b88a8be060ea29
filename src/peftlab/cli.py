"""The `peftlab` command line: methods, models, train, eval, merge (docs/DESIGN.md, "The command line").

Every command takes --json (its metrics as one JSON object on the last line of stdout; human-readable lines go
to stderr then) and --config FILE.yaml, whose keys mirror the long flags (`batch-size: 16` or `batch_size: 16`;
flags given on the command line win). Exit codes: 0 done, 1 error, 2 usage error, 3 training diverged (NaN/inf),
130 interrupted (a checkpoint was written; continue with --resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

EXIT_ERROR, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 1, 2, 3, 130


class UsageError(Exception):
    pass


# -- option tables: one place for argparse, defaults and YAML keys -------------------------------------------------
def _opt(*flags, default=None, **kw):
    return flags, default, kw


COMMON = [
    _opt("--config", help="YAML file whose keys mirror these flags"),
    _opt("--json", action="store_true", default=False, help="print the metrics as one JSON object on the last line"),
]
MODEL = [
    _opt("--model", help="embedded model name (smollm2-135m, minilm-l6) or a local Hugging Face model directory"),
    _opt("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N"),
    _opt("--seed", type=int, default=0),
]
DATA = [
    _opt("--task", help="built-in task: wordnet-antonyms, wordnet-supersense, wordnet-definitions"),
    _opt("--data", help='JSONL file: {"prompt","completion"}, {"text"} or {"text","label"} per line'),
    _opt("--max-length", type=int, default=512, help="tokens per example"),
    _opt("--chat-template", action=argparse.BooleanOptionalAction, default=False,
         help="wrap prompts in the model's chat template (instruct models)"),
    _opt("--eval-size", type=int, default=200, help="held-out examples to evaluate (a fixed sample; 0 = all)"),
    _opt("--max-new-tokens", type=int, default=None, help="generation length for exact-match scoring"),
    _opt("--eval-batch-size", type=int, default=64),
]
TRAIN = [
    _opt("--method", default="lora", help="registry name (peftlab methods)"),
    _opt("--eval-data", help="held-out JSONL of the same format as --data"),
    _opt("--output", help="run directory (adapter/, checkpoints/, metrics.jsonl, run.json)"),
    _opt("--steps", type=int, help="optimizer steps"),
    _opt("--epochs", type=float, help="passes over the training data (default 1 if --steps is not given)"),
    _opt("--lr", type=float, help="learning rate (default: the method's, see `peftlab methods --json`)"),
    _opt("--batch-size", type=int, default=8, help="examples per optimizer step"),
    _opt("--grad-accum", type=int, default=1, help="micro-batches per step (batch-size is split into them)"),
    _opt("--r", type=int, help="rank, for methods that have one (r, rank or init_r)"),
    _opt("--alpha", type=float, help="scaling numerator (lora_alpha / alpha)"),
    _opt("--dropout", type=float, help="adapter dropout (lora_dropout, ...)"),
    _opt("--target-modules", help='comma-separated module names, a regex, or "all-linear"'),
    _opt("--set", action="append", metavar="FIELD=VALUE", help="any method config field (repeatable)"),
    _opt("--schedule", default="cosine", choices=["cosine", "linear", "constant"]),
    _opt("--warmup", type=int, help="warmup steps (default 5%% of the steps)"),
    _opt("--weight-decay", type=float, default=0.0),
    _opt("--max-grad-norm", type=float, default=1.0),
    _opt("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"]),
    _opt("--gradient-checkpointing", action="store_true", default=False),
    _opt("--eval-every", type=int, help="evaluate every N steps"),
    _opt("--save-every", type=int, default=50, help="checkpoint every N steps (also at the end and on SIGINT/TERM)"),
    _opt("--log-every", type=int, default=10),
    _opt("--resume", action="store_true", default=False, help="continue from the newest checkpoint in --output"),
    _opt("--nproc", type=int, default=1, help="processes (data parallel)"),
    _opt("--eval-before", action=argparse.BooleanOptionalAction, default=True,
         help="evaluate the task before training too"),
    _opt("--forgetting", action=argparse.BooleanOptionalAction, default=True,
         help="measure general-English perplexity and an untrained task before and after training"),
    _opt("--forgetting-size", type=int, default=100, help="questions of the untrained task in the forgetting probe"),
    _opt("--progress", action=argparse.BooleanOptionalAction, default=True),
]
EVAL = [
    _opt("--adapter", help="adapter directory (omit to evaluate the base model)"),
    _opt("--split", default="eval", choices=["eval", "test"], help="built-in tasks: which held-out split"),
    _opt("--few-shot", type=int, default=0, help="generation tasks: k training examples before each prompt"),
    _opt("--forgetting", action=argparse.BooleanOptionalAction, default=False,
         help="also run the forgetting probe (general-English perplexity, untrained task)"),
    _opt("--forgetting-size", type=int, default=100),
]
MERGE = [
    _opt("--adapter", help="adapter directory"),
    _opt("--output", help="directory for the merged Transformers model"),
]
TABLES = {"train": MODEL + DATA + TRAIN, "eval": MODEL + DATA + EVAL, "merge": MODEL + MERGE, "methods": [],
          "models": []}


def _dest(flags) -> str:
    return flags[0].lstrip("-").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning: train, evaluate and "
                                "merge adapters for Transformers models.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"peftlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    helps = {"methods": "list the registered methods", "models": "list the embedded models, or fetch one",
             "train": "fine-tune a model with a method on a task or JSONL data",
             "eval": "evaluate a model (with an adapter) on a task or JSONL data",
             "merge": "merge an adapter into its base model and save a plain Transformers model"}
    for name in ("methods", "models", "train", "eval", "merge"):
        sp = sub.add_parser(name, help=helps[name], description=helps[name])
        if name == "models":
            sp.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
            sp.add_argument("name", nargs="?", help="model to fetch")
            sp.add_argument("--force", action="store_true", help="fetch again even if cached")
        for flags, default, kw in COMMON + TABLES[name]:
            kw = dict(kw)
            if default is not None and "help" in kw and kw.get("action") != "store_true":
                kw["help"] += f" (default: {default})"
            sp.add_argument(*flags, default=None, **kw)  # None = not given: YAML and defaults fill it in
    return p


def resolve(command: str, ns: argparse.Namespace) -> dict:
    """Defaults < YAML --config < flags given on the command line."""
    table = COMMON + TABLES[command]
    opts = {_dest(f): d for f, d, _ in table}
    given = {k: v for k, v in vars(ns).items() if v is not None}
    if given.get("config"):
        opts.update(_read_yaml(given["config"], {_dest(f) for f, _, _ in table}))
    opts.update({k: v for k, v in given.items() if k != "command"})
    return opts


def _read_yaml(path: str, known: set[str]) -> dict:
    import yaml
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    out = {}
    for k, v in data.items():
        key = str(k).lstrip("-").replace("-", "_")
        if key not in known or key == "config":
            import difflib
            near = difflib.get_close_matches(key, sorted(known), n=1)
            raise UsageError(f"--config {path}: unknown key {k!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                             + f"; keys mirror the flags: {', '.join(sorted(known - {'config'}))}")
        if key == "set" and isinstance(v, dict):  # `set: {r: 16}` as well as `set: ["r=16"]`
            v = [f"{a}={json.dumps(b) if not isinstance(b, str) else b}" for a, b in v.items()]
        out[key] = v
    return out


# -- output ------------------------------------------------------------------------------------------------------
class Out:
    """Human lines to stdout, or to stderr under --json (stdout then carries only the JSON object)."""

    def __init__(self, as_json: bool):
        self.as_json, self.quiet = as_json, False

    def say(self, *parts) -> None:
        if not self.quiet:
            print(*parts, file=sys.stderr if self.as_json else sys.stdout, flush=True)

    def result(self, obj: dict) -> None:
        if self.as_json and not self.quiet:
            print(json.dumps(obj, default=_jsonable), flush=True)


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


# -- methods / models ------------------------------------------------------------------------------------------
def cmd_methods(o: dict, out: Out) -> dict:
    from .core.registry import list_methods
    rows = sorted((m.as_dict() for m in list_methods()), key=lambda d: (d["category"], d["name"]))
    out.say(f"{'name':<20}{'category':<17}{'kind':<14}{'mergeable':<11}{'HF PEFT':<9}{'lr':<8}description")
    for d in rows:
        out.say(f"{d['name']:<20}{d['category']:<17}{d['kind']:<14}{'yes' if d['mergeable'] else 'no':<11}"
                f"{'yes' if d['hf_peft_compatible'] else 'no':<9}{d['default_lr']:<8g}{d['description']}")
    return {"methods": rows}


def cmd_models(o: dict, out: Out) -> dict:
    from . import models
    if o.get("action") == "fetch":
        if not o.get("name"):
            raise UsageError(f"peftlab models fetch NAME: name one of {', '.join(models.EMBEDDED_MODELS)}")
        t = time.time()
        path = models.fetch_model(o["name"], force=bool(o.get("force")))
        out.say(f"{o['name']}: {path} ({time.time() - t:.0f} s)")
        return {"name": o["name"], "path": str(path), "seconds": round(time.time() - t, 1)}
    rows = models.list_models()
    for r in rows:
        out.say(f"{r['name']:<14}{'fetched' if r['fetched'] else 'not fetched':<13}{r['description']}")
    out.say("Any local Hugging Face model directory works as --model too.")
    return {"models": rows}


# -- data and models for train/eval ----------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
    kind: str                  # generation | lm | classification | multiple-choice
    name: str                  # task name or data file
    train: list
    eval: list
    labels: Optional[list] = None
    task: Any = None


def _sample(records: list, n: int, seed: int) -> list:
    if not n or n >= len(records):
        return list(records)
    idx = sorted(random.Random(f"eval-{seed}").sample(range(len(records)), n))
    return [records[i] for i in idx]


def load_job(o: dict, split: str = "eval") -> Job:
    from .train import data as D
    if bool(o.get("task")) == bool(o.get("data")):
        raise UsageError("give exactly one of --task NAME (built-in) or --data FILE.jsonl")
    if o.get("task"):
        from .train.tasks import get_task
        t = get_task(o["task"])
        kind = t.kind
        return Job(kind, t.name, t.train, t.split(split), t.labels, t)
    records = D.read_jsonl(o["data"])
    fmt = D.data_format(records, str(o["data"]))
    kind = {"prompt-completion": "generation", "text": "lm", "classification": "classification"}[fmt]
    eval_records = []
    if o.get("eval_data"):
        eval_records = D.read_jsonl(o["eval_data"])
        efmt = D.data_format(eval_records, str(o["eval_data"]))
        if efmt != fmt:
            raise D.DataError(f"{o['eval_data']}: {efmt!r} data, but {o['data']} is {fmt!r} data; use one format")
    labels = D.label_names(records) if kind == "classification" else None
    return Job(kind, str(o["data"]), records, eval_records, labels)


def load_base(o: dict, kind: str, num_labels: Optional[int] = None, labels: Optional[list] = None):
    from .models import load_model
    task = "seq-cls" if kind == "classification" else "causal-lm"
    model, tok = load_model(o["model"], task=task, num_labels=num_labels)
    if labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {n: i for i, n in enumerate(labels)}
    return model.to(_device(o["device"])), tok


def encode(job_kind: str, records, tok, o: dict, labels=None):
    from .train import data as D
    if job_kind == "classification":
        return D.encode_classification(records, tok, labels, o["max_length"]), D.Collator(tok.pad_token_id, "right")
    return (D.encode_causal(records, tok, o["max_length"], bool(o["chat_template"])),
            D.Collator(tok.pad_token_id, "left"))


def evaluator(job: Job, tok, o: dict, eval_records: list, few_shot: int = 0):
    """model -> metrics dict, for this job's kind."""
    from .train import metrics as M
    max_new = o.get("max_new_tokens") or (job.task.max_new_tokens if job.task else 32)
    bs = o["eval_batch_size"]
    shots = job.task.few_shot(few_shot, seed=o["seed"]) if (job.task and few_shot) else \
        _sample(job.train, few_shot, o["seed"]) if few_shot else []
    if few_shot and job.kind != "generation":
        raise UsageError("--few-shot applies to generation tasks (prompt/completion data)")

    def run(model) -> dict:
        if not eval_records:
            return {}
        if job.kind == "generation":
            r = M.eval_generation(model, tok, eval_records, shots, max_new, bs, bool(o["chat_template"]))
            return {"exact_match": r["exact_match"], "n": r["n"], "examples": [
                {"prompt": e["prompt"], "prediction": p.strip().split("\n")[0]}
                for e, p in list(zip(eval_records, r["predictions"]))[:5]]}
        if job.kind == "multiple-choice":
            return M.eval_multiple_choice(model, tok, eval_records, bs)
        if job.kind == "lm":
            return {"perplexity": M.perplexity(model, tok, [r["text"] for r in eval_records], bs),
                    "n": len(eval_records)}
        ex, _ = encode("classification", eval_records, tok, o, job.labels)
        r = M.eval_classification(model, tok, ex, len(job.labels), bs)
        return {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "n": r["n"]}
    return run


def forgetting_probe(job: Job, tok, o: dict):
    """model -> forgetting metrics, or None where the model has no language-modelling head."""
    if job.kind == "classification":
        return None
    from .train import metrics as M
    from .train.tasks import forgetting_inputs
    texts, questions = forgetting_inputs(n_questions=o["forgetting_size"])
    if job.name == "wordnet-definitions":
        questions = []  # the task trains it: it is no longer an untrained probe
    return lambda model: M.forgetting_probe(model, tok, texts, questions, "definitions", o["eval_batch_size"])


def method_config(o: dict, task_type: str, total_steps: int):
    """The method's config from its registry preset, the generic flags and --set FIELD=VALUE."""
    import yaml
    from .core.registry import get_method
    info = get_method(o["method"])
    fields = {f.name for f in dataclasses.fields(info.config_cls)}
    over: dict[str, Any] = {}

    def put(flag: str, value, field: Optional[str]):
        if value is None:
            return
        if field is None:
            raise UsageError(f"--{flag}: method {info.name!r} has no such setting (its config fields: "
                             f"{', '.join(sorted(fields))})")
        over[field] = value

    put("r", o.get("r"), info.rank_field)
    put("alpha", o.get("alpha"), info.alpha_field)
    put("dropout", o.get("dropout"), info.dropout_field)
    tm = o.get("target_modules")
    if tm is not None:
        put("target-modules", tm if tm == "all-linear" or "," not in tm and any(c in tm for c in "*.[(|")
            else [t.strip() for t in tm.split(",") if t.strip()], "target_modules" if "target_modules" in fields
            else None)
    for item in o.get("set") or []:
        key, sep, raw = str(item).partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected FIELD=VALUE")
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise UsageError(f"--set {key}: {info.config_cls.__name__} has no field {key!r}; fields: "
                             f"{', '.join(sorted(fields))}")
        over[key] = yaml.safe_load(raw)
    run_length = info.run_length_field
    if run_length is not None and over.get(run_length) is None and info.preset.get(run_length) is None:
        over[run_length] = total_steps  # schedules over the run's length (AdaLoRA's rank budget)
    try:
        return info, info.make_config(task_type=task_type, **over)
    except (TypeError, ValueError) as e:
        raise UsageError(f"method {info.name!r}: {e}") from None


# -- train -------------------------------------------------------------------------------------------------------
def cmd_train(o: dict, out: Out) -> dict:
    if not o.get("model"):
        raise UsageError("train needs --model (an embedded name or a local model directory)")
    if o.get("steps") is not None and o.get("epochs") is not None:
        raise UsageError("give --steps or --epochs, not both")
    _quiet()
    rank = _init_distributed(o)
    if rank:
        out.quiet = True  # rank 0 speaks for the run
    import torch
    from . import get_peft_model
    from .train import loop as L
    from .train.data import save_labels
    from .core.registry import get_method
    t_start = time.time()
    torch.manual_seed(o["seed"])
    get_method(o["method"])  # an unknown method fails before any data or model is loaded
    job = load_job(o)
    output = Path(o.get("output") or f"peftlab-runs/{o['method']}-{Path(job.name).stem}")
    out.say(f"peftlab train: {o['method']} on {job.name} ({job.kind}, {len(job.train)} training examples) "
            f"-> {output}")
    from .train.checkpoint import latest_checkpoint
    if not o["resume"] and latest_checkpoint(output) is not None:
        raise UsageError(f"{output} already has checkpoints from an earlier run; add --resume to continue it, or "
                         f"choose another --output")
    model, tok = load_base(o, job.kind, len(job.labels) if job.labels else None, job.labels)
    train_ex, collate = encode(job.kind if job.kind != "multiple-choice" else "generation", job.train, tok, o,
                               job.labels)
    eval_records = _sample(job.eval, o["eval_size"], o["seed"])
    tc = L.TrainConfig(output_dir=str(output), steps=o.get("steps"), epochs=o.get("epochs"),
                       batch_size=o["batch_size"], grad_accum=o["grad_accum"],
                       lr=o["lr"] if o.get("lr") is not None else get_method(o["method"]).default_lr,
                       weight_decay=o["weight_decay"], schedule=o["schedule"], warmup_steps=o.get("warmup"),
                       max_grad_norm=o["max_grad_norm"] or None, precision=o["precision"],
                       gradient_checkpointing=bool(o["gradient_checkpointing"]), eval_every=o.get("eval_every"),
                       save_every=o.get("save_every"), log_every=o["log_every"], seed=o["seed"],
                       resume=bool(o["resume"]), progress=bool(o["progress"]))
    total = tc.total_steps(len(train_ex))
    task_type = "SEQ_CLS" if job.kind == "classification" else "CAUSAL_LM"
    info, cfg = method_config(o, task_type, total)
    if cfg.calibration_data is not None:  # data-driven methods (Child-tuning's Fisher mask, CorDA) look first
        bs = tc.batch_size // tc.grad_accum
        if cfg.calibration_data == "knowledge":
            # CorDA KPM: the knowledge to keep is general English, not the task (never the probe's own passages)
            from .train.tasks import knowledge_texts
            cfg.prepare(model, knowledge_texts(), tokenizer=tok, batch_size=bs)
        else:
            cfg.prepare(model, [collate(train_ex[i:i + bs]) for i in range(0, min(len(train_ex), 8 * bs), bs)])
    torch.manual_seed(o["seed"])
    pm = get_peft_model(model, cfg)
    trainable, n_all = pm.get_nb_trainable_parameters()
    out.say(f"method {info.name} ({info.category}): {trainable:,} trainable of {n_all:,} parameters "
            f"({100 * trainable / n_all:.3f}%), {total} steps of {tc.batch_size}")

    evaluate = evaluator(job, tok, o, eval_records)
    probe = forgetting_probe(job, tok, o) if o["forgetting"] else None
    before_file = output / "before.json"
    if rank:  # evaluation and saving happen on rank 0; the other processes only train
        _barrier()
        L.train(pm, train_ex, collate, tc, save_adapter=info.saves == "adapter")
        return {}
    if o["resume"] and before_file.is_file():
        before = json.loads(before_file.read_text())  # measured on the untrained model by the first attempt
    else:
        before = {"eval": evaluate(pm) if o["eval_before"] else None, "forgetting": probe(pm) if probe else None}
        output.mkdir(parents=True, exist_ok=True)
        from .core.io import atomic_write_text
        atomic_write_text(before_file, json.dumps(before, indent=1))
    if before["eval"]:
        out.say(f"before training: {_fmt(before['eval'])}")
    _barrier()

    eval_ex = encode(job.kind if job.kind != "multiple-choice" else "generation", eval_records, tok, o,
                     job.labels)[0] if eval_records and job.kind != "multiple-choice" else None
    result = L.train(pm, train_ex, collate, tc, eval_examples=eval_ex,
                     eval_fn=evaluate if o.get("eval_every") else None, save_adapter=info.saves == "adapter")
    after = evaluate(pm)
    out.say(f"after training:  {_fmt(after)}" if eval_records else
            "after training:  no held-out data to evaluate on (give --eval-data FILE.jsonl)")
    summary = {"command": "train", "model": o["model"], "method": info.name, "task": job.name, "kind": job.kind,
               "steps": result["steps"], "batch_size": tc.batch_size, "lr": tc.lr,
               "trainable_params": trainable, "total_params": n_all,
               "train_loss_first": result["loss_first"], "train_loss_last": result["loss_last"],
               "train_tokens": result["train_tokens"], "tokens_per_s": result["tokens_per_s"],
               "train_s": result["elapsed_s"], "eval_before": before["eval"], "eval": after}
    if probe:
        from .train.metrics import forgetting_change
        f_after = probe(pm)
        summary["forgetting"] = forgetting_change(before["forgetting"], f_after)
        out.say("forgetting:      " + ", ".join(f"{k} {v['before']:.4g} -> {v['after']:.4g}"
                                                for k, v in summary["forgetting"].items()))
    else:
        summary["forgetting"] = None
        if o["forgetting"]:
            out.say("forgetting:      not measured (a classification model has no language-modelling head)")
    if info.saves == "model":  # the whole model changed (full fine-tuning): save a plain Transformers model
        target = output / "model"
        pm.merge_and_unload().save_pretrained(str(target))
        tok.save_pretrained(str(target))
    else:
        target = output / "adapter"
        pm.save_pretrained(str(target))
    if job.labels:
        save_labels(target, job.labels)
    summary["saved"] = str(target)
    summary["wall_s"] = time.time() - t_start
    from .core.io import atomic_write_text
    atomic_write_text(output / "run.json", json.dumps(summary, indent=1, default=_jsonable))
    out.say(f"saved {target} ({result['tokens_per_s']:.0f} tokens/s, {summary['wall_s']:.0f} s)")
    return summary


def _init_distributed(o: dict) -> int:
    """Join the process group when started by torchrun (`--nproc N` relaunches under it); returns the rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = _device(o["device"]).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
        o["device"] = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _launch(nproc: int, argv: list[str]) -> int:
    """Run this same command as `nproc` processes under torch.distributed.run (gloo on CPU, NCCL on GPUs)."""
    import subprocess
    if nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "peftlab"]
    # The arguments travel in the environment: torchrun's own parser would claim flags such as --r otherwise.
    env = dict(os.environ, PEFTLAB_ARGV=json.dumps(argv))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def _fmt(metrics: Optional[dict]) -> str:
    if not metrics:
        return "-"
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                     if isinstance(v, (int, float)))


# -- eval --------------------------------------------------------------------------------------------------------
def _adapter_kind(adapter: Optional[str]):
    """(task_type, labels) of an adapter directory."""
    if not adapter:
        return None, None
    from .core.config import PeftConfig
    from .train.data import load_labels
    cfg = PeftConfig.from_pretrained(adapter)
    return cfg.task_type, load_labels(adapter)


def cmd_eval(o: dict, out: Out) -> dict:
    if not o.get("model"):
        raise UsageError("eval needs --model")
    _quiet()
    from .core.model import PeftModel
    job = load_job(o, o["split"])
    task_type, labels = _adapter_kind(o.get("adapter"))
    if job.kind == "classification":
        if task_type is not None and task_type != "SEQ_CLS":
            raise UsageError(f"{job.name} is classification data but the adapter's task_type is {task_type}")
        labels = labels or _model_labels(o)
        if not labels:
            raise UsageError("classification eval needs trained label names: an adapter directory with labels.json "
                             "(written by peftlab train), or a --model whose config has id2label")
        unknown = sorted({str(r["label"]) for r in job.eval or job.train} - set(labels))
        if unknown:
            raise UsageError(f"{job.name}: labels {unknown[:5]} were not trained (trained: {', '.join(labels[:10])})")
        job.labels = labels
    records = job.eval if (job.task or job.eval) else job.train  # --data FILE: the file is the evaluation set
    records = _sample(records, o["eval_size"], o["seed"])
    model, tok = load_base(o, job.kind, len(labels) if job.kind == "classification" else None,
                           labels if job.kind == "classification" else None)
    if o.get("adapter"):
        model = PeftModel.from_pretrained(model, o["adapter"])
    model.eval()
    t = time.time()
    metrics = evaluator(job, tok, o, records, o.get("few_shot") or 0)(model)
    res = {"command": "eval", "model": o["model"], "adapter": o.get("adapter"), "task": job.name, "kind": job.kind,
           "split": o["split"] if job.task else None, "few_shot": o.get("few_shot") or 0, **metrics}
    if o.get("forgetting"):
        probe = forgetting_probe(job, tok, o)
        res["forgetting"] = probe(model) if probe else None
    res["eval_s"] = time.time() - t
    out.say(f"{job.name} ({job.kind}, {len(records)} examples): {_fmt(metrics)}")
    if res.get("forgetting"):
        out.say(f"forgetting probe: {_fmt(res['forgetting'])}")
    return res


def _model_labels(o: dict) -> Optional[list]:
    from .models import model_path
    cfg_path = Path(model_path(o["model"], fetch=False)) / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    id2label = cfg.get("id2label") or {}
    if not id2label or set(id2label.values()) <= {f"LABEL_{i}" for i in range(len(id2label))}:
        return None
    return [id2label[str(i)] for i in range(len(id2label))]


# -- merge -------------------------------------------------------------------------------------------------------
def cmd_merge(o: dict, out: Out) -> dict:
    for k in ("model", "adapter", "output"):
        if not o.get(k):
            raise UsageError(f"merge needs --{k}")
    _quiet()
    from .core.model import PeftModel
    from .train.data import save_labels
    task_type, labels = _adapter_kind(o["adapter"])
    kind = "classification" if task_type == "SEQ_CLS" else "generation"
    if kind == "classification" and not labels:
        raise UsageError(f"{o['adapter']} is a classification adapter without labels.json; cannot size the head")
    model, tok = load_base(o, kind, len(labels) if labels else None, labels)
    pm = PeftModel.from_pretrained(model, o["adapter"])
    try:
        merged = pm.merge_and_unload()
    except TypeError as e:
        raise UsageError(str(e)) from None
    dest = Path(o["output"])
    merged.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    if labels:
        save_labels(dest, labels)
    out.say(f"merged {o['adapter']} into {o['model']}: {dest} (load it with transformers' from_pretrained)")
    return {"command": "merge", "model": o["model"], "adapter": o["adapter"], "output": str(dest)}


COMMANDS = {"methods": cmd_methods, "models": cmd_models, "train": cmd_train, "eval": cmd_eval, "merge": cmd_merge}


def main(argv: Optional[list[str]] = None) -> int:
    if argv is None and "PEFTLAB_ARGV" in os.environ and "WORLD_SIZE" in os.environ:
        argv = json.loads(os.environ["PEFTLAB_ARGV"])  # a process started by `--nproc N` (see _launch)
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.command:
        parser.print_help()
        return EXIT_USAGE
    out = Out(bool(ns.json))
    try:
        opts = resolve(ns.command, ns)
        out = Out(bool(opts.get("json")))
        if ns.command == "models":
            opts.update(action=ns.action, name=ns.name, force=ns.force)
        if ns.command == "train" and (opts.get("nproc") or 1) > 1 and "WORLD_SIZE" not in os.environ:
            return _launch(opts["nproc"], list(sys.argv[1:] if argv is None else argv))
        result = COMMANDS[ns.command](opts, out)
        out.result(result)
        return 0
    except UsageError as e:
        print(f"peftlab {ns.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f"peftlab {ns.command}: {e or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - one clear line for the user; PEFTLAB_DEBUG=1 shows the traceback
        from .train.loop import TrainingDiverged
        if os.environ.get("PEFTLAB_DEBUG"):
            raise
        print(f"peftlab {ns.command}: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(e, TrainingDiverged) else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
