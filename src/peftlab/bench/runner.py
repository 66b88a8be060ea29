"""run_bench: every method (× seed) of one config through the job layer, measured, each cell written to
results.json as it finishes; a failing cell is recorded and the grid goes on; --resume skips finished cells."""
from __future__ import annotations

import dataclasses
import gc
import os
import platform
import shutil
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from ..core.registry import get_method
from ..train.jobs import JobConfig, prepare_job, run_prepared
from ..train.jobs.evaluate import Say, quiet
from ..train.jobs.config import JobError
from ..train.jobs.inputs import encode, load_base, load_data
from ..train.metrics import forgetting_change
from . import measure
from .config import BenchConfig, select_methods
from .forgetting import Probe
from .report import write_reports
from .results import RESULTS_FILE, cell_key, load_results, new_results, save_results

SCORES = {"generation": "exact_match", "classification": "accuracy", "multiple-choice": "accuracy"}


@dataclasses.dataclass
class Context:
    """What every cell of one bench shares: the frozen base (the timing reference and forgetting's "before"),
    its probe, the timed batch."""
    config: BenchConfig
    base: object
    probe: Optional[Probe]
    batch: dict
    base_params: int
    score_metric: str
    base_forgetting: dict


def job_config(bc: BenchConfig, method: str, seed: int, output: Path) -> JobConfig:
    opts = dict(bc.method_options.get(method) or {})
    return JobConfig.from_dict({
        "model": bc.model, "task": bc.task, "data": bc.data, "eval_data": bc.eval_data, "method": method, "seed": seed, "steps": bc.steps,
        "batch_size": bc.batch_size, "max_length": bc.max_length, "eval_size": bc.eval_size,
        "output": str(output), "save_every": 0, "eval_before": False, "forgetting": False, "progress": False,
        "log_every": max(bc.steps, 1), **opts})


def build_context(bc: BenchConfig, results: dict) -> Context:
    jc = job_config(bc, "lora", 0, Path("unused"))
    data = load_data(jc, eval_data=jc.eval_data)
    base, tok = load_base(bc.model, jc.device, data.kind, data.labels)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    examples, collate = encode(data.kind, data.train[:bc.timing_batch], tok, jc, data.labels)
    batch = {k: v.to(next(base.parameters()).device) for k, v in collate(examples).items()}
    batch.pop("position_ids", None)  # a causal collator's; the timed forward is the same for base and method
    probe = Probe(data, tok, jc, bc.forgetting_size) if bc.forgetting else None
    metric = bc.score or (data.task.metrics[0] if data.task else SCORES.get(data.kind))
    if metric is None:
        raise JobError(f"bench: {data.name} is {data.kind} data, which has no score to compare methods by; use "
                       f"prompt/completion or text/label data")
    stored = results.get("base") or {}
    # the encoder probe needs the base model's embeddings in memory, so it runs again in a resumed bench
    if "forgetting" not in stored or (probe is not None and probe.lm is None):
        stored = {"total_params": sum(p.numel() for p in base.parameters()),
                  "forgetting": probe(base) if probe else None,
                  "forgetting_metric": probe.headline if probe else None, "score_metric": metric}
        results["base"] = stored
    return Context(bc, base, probe, batch, stored["total_params"], metric, stored["forgetting"])


def _headline_forgetting(change: Optional[dict], metric: Optional[str]) -> Optional[float]:
    """Percent: perplexity's relative change, or the embedding drift (0 before) times 100."""
    c = (change or {}).get(metric)
    if c is None:
        return None
    return 100 * c.get("relative_change", c["change"])


def measure_cell(ctx: Context, method: str, seed: int, workdir: Path) -> dict:
    bc, info = ctx.config, get_method(method)
    job = prepare_job(job_config(bc, method, seed, workdir))
    model, batch = job.model, ctx.batch
    # The training costs are measured on the adapted model before it trains: they do not depend on the values
    # it learns, and a method that saves a whole model (full fine-tuning) is merged and unloaded by the save.
    where = measure.where_applied(model)
    memory = measure.training_memory(model, batch)
    step = measure.step_time(model, ctx.base, batch, bc.timing_rounds)
    summary = run_prepared(job)
    change = forgetting_change(ctx.base_forgetting, ctx.probe(model)) if ctx.probe else None
    scores = {k: v for k, v in (summary.get("eval") or {}).items() if isinstance(v, float)}
    lat = measure.latency(model, ctx.base, batch, bc.timing_rounds, info.mergeable)
    steps = max(summary["steps"], 1)
    return {"method": info.name, "seed": seed, "status": "ok", "category": info.category, "kind": info.kind,
            "mergeable": info.mergeable, "where": where, "lr": summary["lr"],
            "steps": summary["steps"], "trainable_params": job.trainable_params,
            "trainable_pct": 100 * job.trainable_params / job.total_params,  # PEFT's trainable%
            "adapter_bytes": measure.dir_bytes(summary["saved"]), "peak_memory_bytes": memory["peak_bytes"],
            "memory": memory, "step_ratio": step["ratio"], "step_cpu_s": step["sec"],
            "step_s": summary["train_s"] / steps, "tokens_per_s": summary["tokens_per_s"],
            "latency_unmerged": lat["unmerged"], "latency_merged": lat["merged"],
            "scores": scores, "score": scores.get(ctx.score_metric), "forgetting": change,
            "forgetting_pct": _headline_forgetting(change, ctx.probe and ctx.probe.headline),
            "train_loss_first": summary["train_loss_first"], "train_loss_last": summary["train_loss_last"]}


def _cpu_model() -> str:
    try:  # platform.processor() says only "x86_64" on Linux
        text = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    import transformers
    return {"platform": platform.platform(), "processor": _cpu_model(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_bench(bc: BenchConfig, output: str | Path, methods: Optional[list[str]] = None, resume: bool = False,
              seeds: Optional[int] = None, say: Say = quiet, progress: bool = True, command: str = "") -> dict:
    """Run the grid methods × seeds; returns the results dict. OUTPUT/results.json, table.md and report.html are
    rewritten after every cell."""
    from tqdm.auto import tqdm
    if seeds is not None:
        bc = dataclasses.replace(bc, seeds=seeds)
    names = select_methods(bc, methods)
    out = Path(output)
    path = out / RESULTS_FILE
    results = load_results(path, bc.budget()) if resume else None
    if results is None:
        if path.is_file():
            raise JobError(f"{path} exists; add --resume to continue that bench (new methods or seeds only add "
                           f"cells), or choose another --output")
        results = new_results(bc.to_dict(), bc.budget())
    results.update(machine=machine(), command=command or results.get("command"))
    results.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    cells = [(m, s) for m in names for s in range(bc.seeds)]
    todo = [c for c in cells if results["cells"].get(cell_key(*c), {}).get("status") != "ok"]
    say(f"peftlab bench {bc.name}: {len(names)} methods x {bc.seeds} seeds on {bc.model} / {bc.task}, "
        f"{bc.steps} steps x {bc.batch_size}; {len(cells) - len(todo)} cells done, {len(todo)} to run -> {out}")
    if not todo:
        save_results(path, results)
        write_reports(results, out)
        return results
    ctx = build_context(bc, results)
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"bench {bc.name}", unit="cell",
               disable=not progress)
    for method, seed in todo:
        bar.set_postfix_str(f"{method} seed {seed}")
        workdir = out / "runs" / f"{method}-seed{seed}"
        shutil.rmtree(workdir, ignore_errors=True)  # an interrupted cell starts over
        t = time.time()
        info = get_method(method)
        about = {"method": info.name, "seed": seed, "category": info.category, "kind": info.kind,
                 "mergeable": info.mergeable}
        if info.trains_on:
            cell = {**about, "status": "skipped",
                    "reason": f"it builds on finished {info.trains_on} runs, one per task, which a single-task "
                              f"grid does not have (its multi-task scenario is under benchmarks/results/)"}
        else:
            try:
                cell = measure_cell(ctx, method, seed, workdir)
            except Exception as e:  # noqa: BLE001 - a failing method is a result; the grid goes on
                cell = {**about, "status": "failed", "error": f"{type(e).__name__}: {e}".splitlines()[0][:500],
                        "traceback": traceback.format_exc(limit=4)[-2000:]}
        cell["wall_s"] = time.time() - t
        # the machine's load while the cell ran: wall times stretch with it, the CPU-time ratios much less
        cell["load_avg"] = round(os.getloadavg()[1], 2)
        results["cells"][cell_key(method, seed)] = cell
        results["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        save_results(path, results)
        write_reports(results, out)  # table and report of the cells so far: an interrupted bench still has them
        shutil.rmtree(workdir, ignore_errors=True)  # adapters were measured; full fine-tuning's is a whole model
        say(_cell_line(cell))
        bar.update(1)
        gc.collect()
    bar.close()
    return results


def _cell_line(cell: dict) -> str:
    if cell["status"] == "skipped":
        return f"  {cell['method']}: not run here, {cell['reason']}"
    if cell["status"] != "ok":
        return f"  {cell['method']} seed {cell['seed']}: FAILED {cell['error']}"
    score = cell["score"]
    return (f"  {cell['method']} seed {cell['seed']}: score {score if score is None else round(score, 4)}, "
            f"{cell['trainable_params']:,} trainable ({cell['trainable_pct']:.3f}%), step x{cell['step_ratio']:.2f}, "
            f"{cell['wall_s']:.0f} s")
