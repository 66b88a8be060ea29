"""The `peftlab` command line: methods, models, train, eval, merge, bench, advise (docs/DESIGN.md, "The command line").

Argument parsing and output only: train, eval and merge are the job layer's run_job, run_eval and run_merge
(train/jobs/), whose option dataclasses give every default here; bench and advise are peftlab.bench's run_bench
and advise (docs/BENCH.md). Every command takes --json (its metrics as one
JSON object on the last line of stdout; human-readable lines go to stderr then) and --config FILE.yaml, whose keys
mirror the long flags (`batch-size: 16` or `batch_size: 16`; flags given on the command line win). Exit codes:
0 done, 1 error, 2 usage error, 3 training diverged (NaN/inf), 130 interrupted (a checkpoint was written; continue
with --resume).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

if sys.argv[1:2] == ["bench"]:
    # The bench times with CPU time; OpenMP threads spinning at barriers would count as work. Only effective
    # before torch loads (the imports below load it), and only for the bench: training keeps OpenMP's default.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli_options import COMMON, CONFIGS, OWN_CONFIG, TABLES
from .train.jobs import (ComposeConfig, ContinualConfig, EvalConfig, JobConfig, JobError, MergeConfig, run_compose,
                         run_continual, run_eval, run_job, run_merge)
from .train.jobs.config import check_keys, comma_list, option_key, read_yaml_mapping
from .train.jobs.run import end_distributed, jsonable

EXIT_ERROR, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 1, 2, 3, 130


class UsageError(Exception):
    """A command line used wrongly (the job layer's own such errors are JobError); exit code 2."""


def _dest(flags) -> str:
    return option_key(flags[0])


def _table(command: str) -> list:
    return TABLES[command] if command in OWN_CONFIG else COMMON + TABLES[command]


def defaults(command: str) -> dict:
    """Every option of the command -> its default (None: not set)."""
    out = {_dest(f): None for f, _ in _table(command)}
    out["json"] = False
    if command in CONFIGS:
        out.update(CONFIGS[command].fields())
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning: train, evaluate and "
                                "merge adapters for Transformers models.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"peftlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    helps = {"methods": "list the registered methods", "models": "list the embedded models, or fetch one",
             "train": "fine-tune a model with a method on a task or JSONL data",
             "eval": "evaluate a model (with an adapter) on a task or JSONL data",
             "merge": "merge an adapter into its base model and save a plain Transformers model",
             "compose": "build one adapter from several without gradient training (smile: a sparse mixture of SVD "
                        "experts; lorahub: composition weights searched on a few examples; ttmm: LoRAs merged per prompt by "
                        "its embedding, --clusters K trains them first)",
             "continual": "learn a sequence of tasks with one adapter; evaluate every task after each stage",
             "bench": "run methods side by side on one model, task and budget; write results, table and report",
             "advise": "rank methods for a model and constraints from measured bench results"}
    for name in helps:
        sp = sub.add_parser(name, help=helps[name], description=helps[name])
        if name == "models":
            sp.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
            sp.add_argument("name", nargs="?", help="model to fetch")
            sp.add_argument("--force", action="store_true", help="fetch again even if cached")
        if name == "compose":
            sp.add_argument("kind", choices=["smile", "lorahub", "ttmm"], help="what to compose")
        shown = defaults(name)
        for flags, kw in _table(name):
            kw, default = dict(kw), shown[_dest(flags)]
            if default is not None and "help" in kw and kw.get("action") != "store_true":
                kw["help"] += f" (default: {default})"
            sp.add_argument(*flags, default=None, **kw)  # None = not given: YAML and defaults fill it in
    return p


def resolve(command: str, ns: argparse.Namespace) -> dict:
    """Defaults < YAML --config < flags given on the command line."""
    opts = defaults(command)
    given = {k: v for k, v in vars(ns).items() if v is not None}
    if given.get("config") and command not in OWN_CONFIG:
        opts.update(_read_yaml(given["config"], set(opts) - {"config"}))
    opts.update({k: v for k, v in given.items() if k != "command"})
    return opts


def _read_yaml(path: str, known: set[str]) -> dict:
    try:
        data = read_yaml_mapping(path, "flag names")
    except JobError as e:
        raise UsageError(str(e)) from None
    try:
        return check_keys(data, known)
    except JobError as e:
        raise UsageError(f"--config {path}: {e}") from None


# -- output ------------------------------------------------------------------------------------------------------
class Out:
    """Human lines to stdout, or to stderr under --json (stdout then carries only the JSON object)."""

    def __init__(self, as_json: bool):
        self.as_json = as_json

    def say(self, *parts) -> None:
        print(*parts, file=sys.stderr if self.as_json else sys.stdout, flush=True)

    def result(self, obj: dict) -> None:
        # {}: a process other than rank 0 of a distributed run (rank 0 reports the run)
        if self.as_json and obj:
            print(json.dumps(obj, default=jsonable), flush=True)


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


# -- train / eval / merge: the job layer (train/jobs/) ------------------------------------------------------
def _options(o: dict) -> dict:
    """The command's own options (what its config dataclass takes): all but --config and --json."""
    return {k: v for k, v in o.items() if k not in ("config", "json")}


def cmd_train(o: dict, out: Out) -> dict:
    _quiet()
    finished = False
    try:
        summary = run_job(JobConfig.from_dict(_options(o)), say=out.say)
        finished = True
        return summary
    finally:  # a process started by --nproc leaves its process group before it exits (see end_distributed)
        end_distributed(finished)


def cmd_eval(o: dict, out: Out) -> dict:
    _quiet()
    return run_eval(EvalConfig.from_dict(_options(o)), say=out.say)


def cmd_merge(o: dict, out: Out) -> dict:
    _quiet()
    return run_merge(MergeConfig.from_dict(_options(o)), say=out.say)


def cmd_compose(o: dict, out: Out) -> dict:
    _quiet()
    options = _options(o)
    kind = options.pop("kind")
    return run_compose(ComposeConfig.from_dict(options), kind, say=out.say)


def cmd_continual(o: dict, out: Out) -> dict:
    _quiet()
    return run_continual(ContinualConfig.from_dict(_options(o)), say=out.say)


def cmd_bench(o: dict, out: Out) -> dict:
    _quiet()
    from .bench import load_bench_config, run_bench
    from .bench.report import report_paths
    if not o.get("config"):
        raise UsageError("bench needs --config NAME|FILE (shipped: survey-table, causal-lm)")
    config = load_bench_config(o["config"])
    methods = comma_list(o.get("methods")) or None
    output = o.get("output") or f"bench-runs/{config.name}"
    results = run_bench(config, output, methods=methods, resume=bool(o.get("resume")), seeds=o.get("seeds"),
                        say=out.say, progress=o.get("progress") is not False,
                        command="peftlab " + " ".join(sys.argv[1:]))
    paths = report_paths(output)
    out.say("wrote " + ", ".join(paths.values()))
    return {"outputs": paths, "rows": results["rows"]}


def cmd_advise(o: dict, out: Out) -> dict:
    from .bench.advise import advise, format_advice
    if not o.get("model") or o.get("memory_gb") is None:
        raise UsageError("advise needs --model M and --memory-gb N")
    advice = advise(o["model"], o["memory_gb"], latency_critical=bool(o.get("latency_critical")),
                    tasks=o.get("tasks") or 1, continual=bool(o.get("continual")),
                    keep_knowledge=bool(o.get("keep_knowledge")), results=o.get("results"), top=o.get("top") or 5)
    for line in format_advice(advice):
        out.say(line)
    return advice


def _launch(nproc: int, argv: list[str]) -> int:
    """Run this same command as `nproc` processes under torch.distributed.run (gloo on CPU, NCCL on GPUs), through
    peftlab.launch (which leaves the workers' own error messages as the only report of a failure)."""
    import subprocess
    if nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "peftlab.launch", "--standalone", f"--nproc-per-node={nproc}", "-m", "peftlab"]
    # The arguments travel in the environment: torchrun's own parser would claim flags such as --r otherwise.
    env = dict(os.environ, PEFTLAB_ARGV=json.dumps(argv))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


COMMANDS = {"methods": cmd_methods, "models": cmd_models, "train": cmd_train, "eval": cmd_eval, "merge": cmd_merge,
            "compose": cmd_compose, "continual": cmd_continual, "bench": cmd_bench, "advise": cmd_advise}


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
    except (UsageError, JobError) as e:
        if int(os.environ.get("RANK", "0")) == 0:   # every process of a distributed run meets the same mistake
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
