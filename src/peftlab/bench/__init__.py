"""`peftlab bench` and `peftlab advise`: methods side by side on one model, task and budget (docs/BENCH.md).

config.py   BenchConfig, the shipped configs (configs/*.yaml), which methods a grid runs
runner.py   run_bench: the grid methods x seeds through the job layer, results.json after every cell
measure.py  what a cell measures on its trained model: memory, where it acts, step time, latency
forgetting.py  the forgetting probe against the base (LM heads: perplexity; encoders: embeddings)
timing.py   interleaved CPU-time ratios (shared with benchmarks/)
results.py  results.json: schema, atomic writes, rows aggregated over seeds
table.py    the markdown table shaped like the survey's Table 2
report.py   the self-contained HTML report (plotly)
advise.py   a ranked short list of methods for a model and constraints, from a results file
"""
from .config import BenchConfig, load_bench_config, shipped_configs
from .report import write_reports
from .runner import run_bench

__all__ = ["BenchConfig", "load_bench_config", "run_bench", "shipped_configs", "write_reports"]
