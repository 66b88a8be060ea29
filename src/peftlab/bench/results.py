"""results.json: the bench's one output file (schema in docs/BENCH.md), written atomically after every cell, and
the per-method rows aggregated over seeds (mean and sample standard deviation) that the table, report and
advisor read."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

from ..core.io import atomic_write_text
from ..train.jobs.config import JobError

SCHEMA = "peftlab-bench/1"
RESULTS_FILE = "results.json"
# Cell fields averaged over seeds; every other field is the method's (the same in every seed).
NUMERIC = ("score", "trainable_params", "trainable_pct", "adapter_bytes", "peak_memory_bytes", "step_ratio",
           "step_s", "tokens_per_s", "latency_unmerged", "latency_merged", "forgetting_pct", "train_loss_last",
           "wall_s")


def cell_key(method: str, seed: int) -> str:
    return f"{method}@seed{seed}"


def new_results(config: dict, budget: dict) -> dict:
    return {"schema": SCHEMA, "config": config, "budget": budget, "machine": None, "base": None, "cells": {},
            "rows": []}


def load_results(path: Path, budget: dict) -> Optional[dict]:
    """The results of an earlier run to resume (None if there are none); refused when its budget differs, since
    cells trained with another budget would not be comparable with new ones."""
    if not path.is_file():
        return None
    res = json.loads(path.read_text())
    if res.get("schema") != SCHEMA:
        raise JobError(f"{path}: schema {res.get('schema')!r}, expected {SCHEMA!r}; use another --output")
    if res.get("budget") != budget:
        diff = sorted(k for k in set(budget) | set(res.get("budget", {}))
                      if budget.get(k) != res.get("budget", {}).get(k))
        raise JobError(f"{path} was run with another budget ({', '.join(diff)} differ); --resume continues a bench "
                       f"with the same config only. Use another --output, or remove {path}")
    return res


def save_results(path: Path, results: dict) -> None:
    results["rows"] = aggregate(results["cells"])
    atomic_write_text(path, json.dumps(results, indent=1, default=_number))


def _number(o):
    try:
        return o.item()
    except AttributeError:
        return str(o)


def _mean_sd(values: list) -> tuple:
    vals = [v for v in values if isinstance(v, (int, float))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(cells: dict) -> list[dict]:
    """One row per method, in the order its cells were first run: NUMERIC fields and every task metric in
    `scores` as the mean over the seeds that finished, with `<field>_sd`; `seeds` lists them."""
    by_method: dict[str, list] = {}
    for cell in cells.values():
        by_method.setdefault(cell["method"], []).append(cell)
    rows = []
    for method, group in by_method.items():
        ok = [c for c in group if c["status"] == "ok"]
        if not ok:
            last = group[-1]
            rows.append({k: last[k] for k in ("method", "category", "kind", "mergeable", "error", "reason")
                         if k in last} | {"status": last["status"], "seeds": []})
            continue
        row = {k: v for k, v in ok[0].items() if k not in NUMERIC and k not in ("seed", "scores", "forgetting")}
        row.update(status="ok", seeds=[c["seed"] for c in ok], failed_seeds=[c["seed"] for c in group
                                                                               if c["status"] != "ok"])
        for k in NUMERIC:
            row[k], row[f"{k}_sd"] = _mean_sd([c.get(k) for c in ok])
        row["scores"] = {m: dict(zip(("mean", "sd"), _mean_sd([c["scores"].get(m) for c in ok])))
                         for m in ok[0]["scores"]}
        row["forgetting"] = ok[0]["forgetting"] if len(ok) == 1 else {
            m: {"before": v["before"], "after": _mean_sd([c["forgetting"][m]["after"] for c in ok])[0]}
            for m, v in (ok[0]["forgetting"] or {}).items()}
        rows.append(row)
    return rows
