"""The command line's option tables: flags and help text; defaults and YAML keys come from the job layer's option
dataclasses (train/jobs/config.py), so `--help`, YAML --config files and Python agree by construction."""
from __future__ import annotations

import argparse

from .train.jobs import ComposeConfig, ContinualConfig, EvalConfig, JobConfig, MergeConfig


def _opt(*flags, **kw):
    return flags, kw


COMMON = [
    _opt("--config", help="YAML file whose keys mirror these flags"),
    _opt("--json", action="store_true", help="print the metrics as one JSON object on the last line"),
]
MODEL = [
    _opt("--model", help="embedded model name (smollm2-135m, minilm-l6) or a local Hugging Face model directory"),
    _opt("--device", help="auto (CUDA if available), cpu, cuda, cuda:N"),
    _opt("--seed", type=int),
    _opt("--quantize", choices=["nf4", "fp4", "int8"],
         help="load the base quantised by bitsandbytes (QLoRA; eval/merge of a train run default to the run's)"),
    _opt("--double-quant", action=argparse.BooleanOptionalAction,
         help="4-bit: quantise the block scales as well (default on)"),
    _opt("--compute-dtype", choices=["float32", "bfloat16", "float16"], help="4-bit layers' matmul dtype"),
]
DATA = [
    _opt("--task", help="built-in task: wordnet-antonyms, wordnet-supersense, wordnet-definitions"),
    _opt("--data", help='JSONL file: {"prompt","completion"}, {"text"} or {"text","label"} per line'),
    _opt("--max-length", type=int, help="tokens per example"),
    _opt("--chat-template", action=argparse.BooleanOptionalAction,
         help="wrap prompts in the model's chat template (instruct models)"),
    _opt("--eval-size", type=int, help="held-out examples to evaluate: a fixed sample of N, 0 = all (default: a "
         "built-in task's fixed sample of 200; a data file whole)"),
    _opt("--max-new-tokens", type=int, help="generation length for exact-match scoring"),
    _opt("--eval-batch-size", type=int),
]
TRAIN = [
    _opt("--method", help="registry name (peftlab methods)"),
    _opt("--eval-data", help="held-out JSONL of the same format as --data"),
    _opt("--output", help="run directory (adapter/, checkpoints/, metrics.jsonl, run.json)"),
    _opt("--steps", type=int, help="optimizer steps"),
    _opt("--epochs", type=float, help="passes over the training data (default 1 if --steps is not given)"),
    _opt("--lr", type=float, help="learning rate (default: the method's, see `peftlab methods --json`)"),
    _opt("--batch-size", type=int, help="examples per optimizer step"),
    _opt("--grad-accum", type=int, help="micro-batches per step (batch-size is split into them)"),
    _opt("--r", type=int, help="rank, for methods that have one (sets the method's own rank field)"),
    _opt("--alpha", type=float, help="scaling numerator, for methods that have one"),
    _opt("--dropout", type=float, help="adapter dropout, for methods that have one"),
    _opt("--target-modules", help='comma-separated module names, a regex, or "all-linear"'),
    _opt("--set", action="append", metavar="FIELD=VALUE", help="any method config field (repeatable)"),
    _opt("--schedule", choices=["cosine", "linear", "constant"]),
    _opt("--warmup", type=int, help="warmup steps (default 5%% of the steps)"),
    _opt("--weight-decay", type=float),
    _opt("--max-grad-norm", type=float),
    _opt("--precision", choices=["auto", "fp32", "bf16", "fp16"]),
    _opt("--gradient-checkpointing", action="store_true"),
    _opt("--group-by-length", action=argparse.BooleanOptionalAction,
         help="batch examples of similar length together, which pads less (default: when random batches would "
              "be at least 25%% padding)"),
    _opt("--eval-every", type=int, help="evaluate every N steps"),
    _opt("--save-every", type=int, help="checkpoint every N steps (also at the end and on SIGINT/TERM)"),
    _opt("--keep-checkpoints", type=int, metavar="N",
         help="keep the newest N checkpoints, 0 = all (like Trainer's save_total_limit; the newest and the one with "
              "the best eval_loss are never removed)"),
    _opt("--log-every", type=int),
    _opt("--resume", action="store_true", help="continue from the newest checkpoint in --output"),
    _opt("--nproc", type=int, help="processes (data parallel)"),
    _opt("--fsdp", action="store_true",
         help="with --nproc N / torchrun: shard the frozen base over the processes with FSDP2 (default: DDP)"),
    _opt("--loftq", action="store_true",
         help="with --quantize nf4/fp4 and LoRA: initialise the adapter so quantised base + adapter approximates "
              "the unquantised weights (LoftQ, one step from the checkpoint)"),
    _opt("--eval-before", action=argparse.BooleanOptionalAction, help="evaluate the task before training too"),
    _opt("--forgetting", action=argparse.BooleanOptionalAction,
         help="measure general-English perplexity and an untrained task before and after training"),
    _opt("--forgetting-size", type=int, help="questions of the untrained task in the forgetting probe"),
    _opt("--progress", action=argparse.BooleanOptionalAction),
]
EVAL = [
    _opt("--adapter", help="adapter directory, or a train run's --output (its adapter/); omit for the base model"),
    _opt("--split", choices=["eval", "test"], help="built-in tasks: which held-out split"),
    _opt("--few-shot", type=int, help="generation tasks: k training examples before each prompt"),
    _opt("--forgetting", action=argparse.BooleanOptionalAction,
         help="also run the forgetting probe (general-English perplexity, untrained task)"),
    _opt("--forgetting-size", type=int),
]
MERGE = [
    _opt("--adapter", help="adapter directory, or a train run's --output (its adapter/)"),
    _opt("--output", help="directory for the merged Transformers model"),
    _opt("--requantize", action="store_true",
         help="quantised base: quantise the merged weights again (default: save them dense)"),
]
COMPOSE = [
    _opt("--adapters", help="comma-separated LoRA adapter directories (or train runs' --output), one expert each"),
    _opt("--models", help="smile: comma-separated fine-tuned model directories of the same base, one expert each"),
    _opt("--output", help="directory for the composed adapter"),
    _opt("--k", type=int, help="smile: expert rank (default: the sources' largest LoRA rank; models: 32)"),
    _opt("--gate-k", type=int, help="smile: right singular vectors per expert in the gate"),
    _opt("--top-k", type=int, help="smile: experts per token"),
    _opt("--shots", type=int, help="lorahub: examples of the new task (from --task's training split or --data)"),
    _opt("--budget", type=int, help="lorahub: evaluations of the few-shot objective (CMA-ES)"),
    _opt("--l1", type=float, help="lorahub: weight of the l1 penalty on the composition weights"),
    _opt("--clusters", type=int, help="ttmm: cluster --task/--data's prompts into K and train one LoRA on each"),
    _opt("--steps", type=int, help="ttmm --clusters: each expert's optimizer steps (default: one epoch)"),
    _opt("--batch-size", type=int, help="ttmm --clusters: each expert's batch"),
    _opt("--lr", type=float, help="ttmm --clusters: each expert's learning rate"),
    _opt("--r", type=int, help="ttmm --clusters: each expert's LoRA rank"),
    _opt("--beta", type=float, help="ttmm: width of the merge kernel exp(-(1 - cos) / beta^2)"),
    _opt("--tau", type=float, help="ttmm: experts whose normalised weight is at most tau are left out"),
    _opt("--encoder", help="ttmm: sentence encoder for prompts and centroids (default minilm-l6)"),
]
CONTINUAL = [
    _opt("--tasks", help="comma-separated built-in tasks, learnt in this order by one adapter"),
]
# `bench --config` names a bench configuration (shipped or a file), not a YAML file of flags, so bench has its
# own --config and --json instead of COMMON's.
BENCH = [
    _opt("--config", help="a shipped bench config (survey-table, causal-lm) or a YAML file with the same keys"),
    _opt("--methods", help="comma-separated methods (default: the config's list, else every registered method)"),
    _opt("--output", help="directory for results.json, table.md, report.html (default: bench-runs/CONFIG)"),
    _opt("--resume", action="store_true", help="skip the cells results.json already has (new methods just add)"),
    _opt("--seeds", type=int, help="seeds per method (mean ± standard deviation in the table)"),
    _opt("--progress", action=argparse.BooleanOptionalAction, help="a progress bar across the grid"),
    _opt("--json", action="store_true", help="print the output paths and rows as one JSON object"),
]
ADVISE = [
    _opt("--model", help="the model to fine-tune: an embedded name, a local HF directory, or a size like 7b / 350m"),
    _opt("--memory-gb", type=float, help="memory available for training, GB"),
    _opt("--latency-critical", action="store_true", help="inference latency matters: prefer no added latency"),
    _opt("--tasks", type=int, help="how many tasks (adapters) one base model will serve"),
    _opt("--continual", action="store_true", help="tasks arrive one after another (keep earlier ones intact)"),
    _opt("--keep-knowledge", action="store_true", help="the model must keep its general knowledge (forgetting)"),
    _opt("--results", help="a bench results.json (default: the shipped survey-table results)"),
    _opt("--top", type=int, help="how many methods to list (default 5)"),
]
TABLES = {"train": MODEL + DATA + TRAIN, "eval": MODEL + DATA + EVAL, "merge": MODEL + MERGE,
          "compose": MODEL + DATA + COMPOSE, "continual": MODEL + DATA + TRAIN + CONTINUAL, "methods": [], "models": [], "bench": BENCH, "advise": ADVISE}
OWN_CONFIG = {"bench"}  # commands whose --config is not a YAML file of their flags
CONFIGS = {"train": JobConfig, "eval": EvalConfig, "merge": MergeConfig, "compose": ComposeConfig,
           "continual": ContinualConfig}  # each table's fields, with defaults


