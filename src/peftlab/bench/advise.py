"""`peftlab advise`: a ranked short list of methods for a model and constraints, from measured bench results.

Every method row of a results file is scored by one function: its measured features (score, added inference
latency, memory at the user's scale, forgetting, storage for the user's tasks, training step time) times weights
that the constraints raise. Memory is the one hard limit. Scaling to the user's model: parameter counts, file sizes
and memory grow with the model's parameter count (linearly, from the bench model's); the measured ratios — score
relative to the best, step time and latency against the base, forgetting — are carried over as measured.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..train.jobs.config import JobError

SHIPPED = Path(__file__).parent / "results"  # copies of benchmarks/results/bench/*/results.json
DEFAULT_RESULTS = SHIPPED / "survey-table.json"

# weight per unit of each feature: (default, with the constraint that cares about it). One point of score
# (relative to the best method, in %) is worth 1.
# The latency weight stays below 1 even when latency is critical: a merged method's measured ratio is the base's
# within the timing noise (~±10% on a shared VM), which must not outweigh real score differences.
WEIGHTS = {"latency": (0.02, 0.3),     # per % of inference time added over the base (merged where mergeable)
           "forgetting": (0.02, 0.5),  # per % of the forgetting probe's headline change
           "storage": (0.0, 0.05),     # per % of one base model stored for all the user's tasks
           "memory": (0.02, 0.02),     # per % of the memory budget used (headroom is worth a little)
           "step": (0.02, 0.02)}       # per % of training step time over the frozen base's


@dataclass
class Need:
    params: int
    memory_gb: float
    latency_critical: bool = False
    tasks: int = 1
    continual: bool = False
    keep_knowledge: bool = False

    def weight(self, feature: str) -> float:
        default, raised = WEIGHTS[feature]
        on = {"latency": self.latency_critical, "forgetting": self.keep_knowledge or self.continual,
              "storage": self.tasks > 1 or self.continual}.get(feature, False)
        return raised if on else default


def model_params(model: str) -> int:
    """Parameters of the user's model: a size like `7b`, `350m`; an embedded model; or a local HF directory
    (counted from its config on the meta device, nothing loaded)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmbt])\s*", str(model).lower())
    if m:
        return int(float(m.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2)])
    from ..models import EMBEDDED_MODELS
    if model in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[model].params
    path = Path(model)
    if not (path / "config.json").is_file():
        raise JobError(f"--model {model!r}: not a size (7b, 350m), an embedded model ({', '.join(EMBEDDED_MODELS)}) "
                       f"or a model directory with config.json")
    import torch
    from transformers import AutoConfig, AutoModel
    with torch.device("meta"):
        net = AutoModel.from_config(AutoConfig.from_pretrained(str(path)))
    return sum(p.numel() for p in net.parameters())


def load(results: Optional[str]) -> dict:
    path = Path(results) if results else DEFAULT_RESULTS
    if not path.is_file():
        raise JobError(f"--results {path}: no such file (a results.json written by `peftlab bench`)")
    data = json.loads(path.read_text())
    if not data.get("rows") or not data.get("base"):
        raise JobError(f"{path}: no measured rows; run `peftlab bench` first")
    data["path"] = str(path)
    return data


def candidate(row: dict, need: Need, scale: float, best: float, base: dict) -> dict:
    """One method at the user's scale: its features, weighted terms and utility (None: it does not fit)."""
    memory_gb = row["peak_memory_bytes"] * scale / 1e9
    latency = row["latency_merged"] if row.get("latency_merged") is not None else row["latency_unmerged"]
    model_bytes = 4 * base["total_params"]  # fp32, as measured; the storage feature is relative, so scale cancels
    feats = {"score": 100 * (row["score"] - best) / best,
             "latency": 100 * max(latency - 1, 0),
             "forgetting": max(row.get("forgetting_pct") or 0.0, 0.0),
             "storage": 100 * max(need.tasks, 1) * row["adapter_bytes"] / model_bytes,
             "memory": 100 * memory_gb / need.memory_gb,
             "step": 100 * max(row["step_ratio"] - 1, 0)}
    terms = {"score": feats["score"]} | {k: -need.weight(k) * v for k, v in feats.items() if k != "score"}
    fits = memory_gb <= need.memory_gb
    return {"method": row["method"], "category": row["category"], "fits": fits, "memory_gb": memory_gb,
            "trainable_params": int(row["trainable_pct"] / 100 * need.params), "score": row["score"],
            "latency": latency, "mergeable": row["mergeable"], "forgetting_pct": row.get("forgetting_pct"),
            "adapter_mb": row["adapter_bytes"] * scale / 1e6, "step_ratio": row["step_ratio"],
            "features": feats, "terms": terms, "utility": sum(terms.values()) if fits else None}


def reasons(c: dict, need: Need, metric: str) -> list[str]:
    """The measured numbers behind a place in the list, the weightiest terms first."""
    say = {"score": f"{metric} {100 * c['score']:.1f} ({c['features']['score']:+.1f}% vs the best)",
           "latency": (f"inference {c['latency']:.2f}× the base" + (" once merged" if c["mergeable"] else
                                                                      " (not mergeable)")),
           "forgetting": f"forgetting probe {c['forgetting_pct']:+.1f}%" if c["forgetting_pct"] is not None else "",
           "storage": f"{c['adapter_mb']:.1f} MB per task × {need.tasks}",
           "memory": f"~{c['memory_gb']:.1f} GB to train of {need.memory_gb:g} GB",
           "step": f"training step {c['step_ratio']:.2f}× the frozen base's"}
    order = sorted(c["terms"], key=lambda k: -abs(c["terms"][k]))
    return [say[k] for k in order if say[k]][:4] + [f"~{c['trainable_params']:,} trainable parameters"]


def advise(model: str, memory_gb: float, latency_critical: bool = False, tasks: int = 1, continual: bool = False,
           keep_knowledge: bool = False, results: Optional[str] = None, top: int = 5) -> dict:
    if memory_gb <= 0 or tasks < 1 or top < 1:
        raise JobError("--memory-gb must be > 0, --tasks and --top >= 1")
    data = load(results)
    need = Need(model_params(model), memory_gb, latency_critical, tasks, continual, keep_knowledge)
    rows = [r for r in data["rows"] if r["status"] == "ok" and r.get("score") is not None]
    scale = need.params / data["base"]["total_params"]
    best = max(r["score"] for r in rows)
    cands = [candidate(r, need, scale, best, data["base"]) for r in rows]
    ranked = sorted((c for c in cands if c["fits"]), key=lambda c: -c["utility"])
    metric = data["base"].get("score_metric", "score")
    for c in ranked:
        c["reasons"] = reasons(c, need, metric)
    return {"model": model, "model_params": need.params, "memory_gb": memory_gb, "constraints": {
        "latency_critical": latency_critical, "tasks": tasks, "continual": continual,
        "keep_knowledge": keep_knowledge}, "results": data["path"], "bench_model": data["config"]["model"],
        "bench_params": data["base"]["total_params"], "scale": scale, "ranked": ranked[:top],
        "does_not_fit": sorted((c["method"], round(c["memory_gb"], 1)) for c in cands if not c["fits"])}


def format_advice(a: dict) -> list[str]:
    lines = [f"For {a['model']} (~{a['model_params'] / 1e6:,.0f}M parameters, {a['memory_gb']:g} GB), from "
             f"{a['results']} (measured on {a['bench_model']}, {a['bench_params'] / 1e6:,.1f}M): parameter counts, "
             f"file sizes and memory scaled ×{a['scale']:.3g} with the model; scores, step-time, latency and "
             f"forgetting ratios as measured."]
    for i, c in enumerate(a["ranked"], 1):
        lines.append(f"{i}. {c['method']} ({c['category']}): " + "; ".join(c["reasons"]))
    if not a["ranked"]:
        lines.append("No measured method fits in that memory at this model size.")
    if a["does_not_fit"]:
        lines.append("Does not fit: " + ", ".join(f"{m} (~{gb} GB)" for m, gb in a["does_not_fit"]))
    return lines
