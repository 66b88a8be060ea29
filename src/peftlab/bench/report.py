"""The self-contained HTML report: four plotly scatter plots (plotly.js inline, so it opens offline) of each
method's score against what it costs, the Pareto front marked, hover details, and the table beneath."""
from __future__ import annotations

import html
from typing import Callable, Optional

from .results import RESULTS_FILE
from .table import CATEGORY_ORDER, markdown_table

COLORS = dict(zip(CATEGORY_ORDER, ("#222222", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e")))
# (div id, x-axis label, the x of a row, log x-axis); on every x-axis lower is better
PLOTS: list[tuple[str, str, Callable[[dict], Optional[float]], bool]] = [
    ("plot-trainable", "trainable parameters, % of the model (log)", lambda r: r.get("trainable_pct"), True),
    ("plot-memory", "peak training memory, MB", lambda r: _mb(r.get("peak_memory_bytes")), False),
    ("plot-step", "training step time vs the frozen base (CPU-time ratio)", lambda r: r.get("step_ratio"), False),
    ("plot-forgetting", "forgetting, % (headline probe; lower is better)", lambda r: r.get("forgetting_pct"), False),
]


def _mb(b: Optional[float]) -> Optional[float]:
    return None if b is None else b / 1e6


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both axes (x lower or equal and score higher or equal, one strictly),
    sorted by x."""
    front = [p for p in points if not any(q[0] <= p[0] and q[1] >= p[1] and (q[0], q[1]) != (p[0], p[1])
                                          for q in points)]
    return sorted(front)


def _hover(r: dict, metric: str) -> str:
    lines = [f"<b>{r['method']}</b> ({r['category']}, {r['kind']})", f"{metric}: {100 * r['score']:.1f}"
             + (f" ± {100 * r['score_sd']:.1f}" if len(r.get("seeds", [])) > 1 else ""),
             f"trainable: {r['trainable_params']:,.0f} ({r['trainable_pct']:.3f}%)",
             f"where: {', '.join(r.get('where') or [])}",
             f"peak train memory: {_mb(r['peak_memory_bytes']):.0f} MB",
             f"step: {r['step_ratio']:.2f}× frozen base",
             f"inference: {r['latency_unmerged']:.2f}× base unmerged"
             + (f", {r['latency_merged']:.2f}× merged" if r.get("latency_merged") is not None else "")]
    if r.get("forgetting_pct") is not None:
        lines.append(f"forgetting: {r['forgetting_pct']:+.1f}%")
    return "<br>".join(lines)


def figure(rows: list[dict], x_label: str, x_of, log: bool, metric: str):
    import plotly.graph_objects as go
    fig = go.Figure()
    usable = [r for r in rows if r["status"] == "ok" and r.get("score") is not None and x_of(r) is not None]
    for cat in CATEGORY_ORDER:
        group = [r for r in usable if r["category"] == cat]
        if group:
            fig.add_trace(go.Scatter(
                x=[x_of(r) for r in group], y=[100 * r["score"] for r in group], mode="markers+text",
                name=cat, text=[r["method"] for r in group], textposition="top center",
                marker=dict(size=11, color=COLORS.get(cat)), hovertext=[_hover(r, metric) for r in group],
                hoverinfo="text",
                error_y=dict(type="data", array=[100 * (r.get("score_sd") or 0) for r in group], visible=True)))
    front = pareto([(x_of(r), 100 * r["score"], r["method"]) for r in usable if not (log and x_of(r) <= 0)])
    if front:
        fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines+markers",
                                 name="Pareto front", line=dict(dash="dash", color="#888"),
                                 marker=dict(symbol="star", size=16, color="rgba(0,0,0,0)",
                                             line=dict(width=1.5, color="#444")),
                                 hovertext=[f"Pareto front: {p[2]}" for p in front], hoverinfo="text"))
    fig.update_layout(xaxis_title=x_label, yaxis_title=f"{metric} (%)", height=520, template="plotly_white",
                      margin=dict(l=60, r=20, t=30, b=60), legend=dict(orientation="h", y=-0.18))
    if log:
        fig.update_xaxes(type="log")
    return fig


def _md_to_html(md: str) -> str:
    """The markdown table as an HTML table (the same text the .md file holds, one source)."""
    out, rows = [], [line for line in md.splitlines() if line.startswith("|")]
    for i, line in enumerate(rows):
        if i == 1:
            continue  # the |---| line
        tag = "th" if i == 0 else "td"
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
    return "<table>" + "".join(out) + "</table>"


def html_report(results: dict) -> str:
    import plotly.io as pio
    cfg, base, m = results["config"], results.get("base") or {}, results.get("machine") or {}
    metric = base.get("score_metric", "score")
    divs = []
    for i, (div_id, label, x_of, log) in enumerate(PLOTS):
        fig = figure(results["rows"], label, x_of, log, metric)
        divs.append(f"<h2>{html.escape(metric)} vs {html.escape(label)}</h2>"
                    + pio.to_html(fig, include_plotlyjs=(i == 0), full_html=False, div_id=div_id,
                                  config={"displaylogo": False}))
    md = markdown_table(results)
    caption = md.split("\n", 1)[0].replace("**", "")
    machine = ", ".join(f"{k} {v}" for k, v in m.items() if v is not None)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>peftlab bench: {html.escape(cfg['name'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px}}
th{{background:#f3f3f3}}.note{{color:#555}}</style></head><body>
<h1>peftlab bench: {html.escape(cfg['name'])}</h1>
<p>{html.escape(caption)}</p>
<p class="note">Each point is a method (colour: the survey's category); hover for details; error bars are the
standard deviation over seeds. The dashed line joins the Pareto front: methods no other method beats on both the
score and the cost on that plot's x-axis. Machine: {html.escape(machine)}. Command: <code>{html.escape(
        str(results.get('command') or ''))}</code>; started {html.escape(str(results.get('started', '')))},
updated {html.escape(str(results.get('updated', '')))}.</p>
{''.join(divs)}
<h2>The table</h2>{_md_to_html(md)}
</body></html>
"""


def report_paths(output) -> dict:
    from pathlib import Path
    out = Path(output)
    return {"results": str(out / RESULTS_FILE), "table": str(out / "table.md"), "report": str(out / "report.html")}


def write_reports(results: dict, output) -> dict:
    """table.md and report.html beside results.json; their paths by name."""
    from ..core.io import atomic_write_text
    paths = report_paths(output)
    atomic_write_text(paths["table"], markdown_table(results))
    atomic_write_text(paths["report"], html_report(results))
    return paths
