"""The markdown table shaped like the survey's Table 2 (category | method | where applied | inference latency |
trainable % | scores), with this bench's extra columns: memory, step time, latency ratios, forgetting, size."""
from __future__ import annotations

from typing import Optional

# The survey's row order: the reference first, then its categories in its order (moe after the hybrids).
CATEGORY_ORDER = ("full", "additive", "selective", "reparameterized", "hybrid", "moe")


def ordered(rows: list[dict]) -> list[dict]:
    rank = {c: i for i, c in enumerate(CATEGORY_ORDER)}
    return sorted(rows, key=lambda r: (rank.get(r.get("category"), len(rank)), r["method"]))


def pm(row: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    """mean ± sd (the sd only with more than one seed)."""
    v = row.get(key)
    if v is None:
        return "–"
    s = format(v * scale, fmt)
    sd = row.get(f"{key}_sd")
    return f"{s} ± {format(sd * scale, fmt)}" if sd and len(row.get("seeds", [])) > 1 else s


def latency_cell(row: dict) -> str:
    """The survey's yes/no column, with the measured unmerged (and merged) forward over the base's."""
    merged = row.get("latency_merged")
    extra = "none once merged" if row.get("mergeable") else "yes"
    parts = [f"{row['latency_unmerged']:.2f}× unmerged"] if row.get("latency_unmerged") is not None else []
    if merged is not None:
        parts.append(f"{merged:.2f}× merged")
    return f"{extra} ({', '.join(parts)})" if parts else extra


def _size(n: Optional[float]) -> str:
    if n is None:
        return "–"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def markdown_table(results: dict) -> str:
    base, cfg = results.get("base") or {}, results["config"]
    metric, fmetric = base.get("score_metric", "score"), base.get("forgetting_metric", "forgetting")
    score_names = []
    for r in results["rows"]:
        for m in r.get("scores", {}):
            if m not in score_names:
                score_names.append(m)
    fname = {"general_ppl": "general-English ppl change", "general_drift": "general-English embedding drift"}
    head = (["category", "method", "where applied", "extra inference latency", "trainable params", "trainable %"]
            + score_names + [fname.get(fmetric, fmetric), "untrained probe acc", "peak train memory",
                             "step time vs frozen base", "tokens/s", "adapter file"])
    lines = [f"**{cfg['name']}** — {cfg['model']} on {cfg['task']}, {cfg['steps']} steps × {cfg['batch_size']} "
             f"per method, {len(results['rows'])} methods, seeds per cell: {cfg['seeds']}; scores on "
             f"{cfg['eval_size']} held-out examples (headline: {metric}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ordered(results["rows"]):
        if r["status"] != "ok":
            why = f"not run: {r['reason']}" if r["status"] == "skipped" else f"failed: {r.get('error', '')}"
            lines.append(f"| {r.get('category', '')} | {r['method']} | {why} |" + " |" * (len(head) - 3))
            continue
        probe = (r.get("forgetting") or {}).get("definitions_acc") or {}
        probe_cell = f"{probe['before']:.0%} → {probe['after']:.0%}" if probe else "–"
        cells = [r["category"], r["method"], ", ".join(r.get("where") or []), latency_cell(r),
                 pm(r, "trainable_params", ",.0f"), pm(r, "trainable_pct", ".3f")]
        cells += [_score(r, m) for m in score_names]
        cells += [pm(r, "forgetting_pct", "+.1f") + ("%" if r.get("forgetting_pct") is not None else ""),
                  probe_cell, _size(r.get("peak_memory_bytes")), pm(r, "step_ratio", ".2f") + "×",
                  pm(r, "tokens_per_s", ".0f"), _size(r.get("adapter_bytes"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _score(row: dict, metric: str) -> str:
    s = row.get("scores", {}).get(metric)
    if not s or s.get("mean") is None:
        return "–"
    return f"{100 * s['mean']:.1f}" + (f" ± {100 * s['sd']:.1f}" if len(row.get("seeds", [])) > 1 else "")
