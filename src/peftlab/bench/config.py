"""A bench configuration: one base model, one task and one training budget that every method gets.

Shipped configurations are YAML files in this package's configs/ folder, named by their stem
(`peftlab bench --config survey-table`); any other YAML file with the same keys works too (docs/BENCH.md).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..train.jobs.config import JobError, check_keys, read_yaml_mapping

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class BenchConfig:
    name: str = "bench"
    description: str = ""
    model: Optional[str] = None          # embedded model name or a local HF directory
    task: Optional[str] = None           # a built-in task (the bench compares on held-out data of one task), or
    data: Optional[str] = None           # a JSONL training file (prompt/completion or text/label) with
    eval_data: Optional[str] = None      # its held-out JSONL file
    steps: int = 100                     # optimizer steps per method: the same budget for all
    batch_size: int = 16
    max_length: int = 128
    eval_size: Optional[int] = 500       # held-out examples scored (the job layer's sample)
    score: Optional[str] = None          # the headline metric (default: the task's first metric)
    methods: list = field(default_factory=list)   # [] = every registered method (the registry decides)
    exclude: list = field(default_factory=list)   # registered methods left out, with the reason in the config
    method_options: dict = field(default_factory=dict)  # {method: {lr: .., set: {..}, r: ..}}: JobConfig keys
    seeds: int = 1
    forgetting: bool = True              # the forgetting probe (docs/BENCH.md), against the base model
    forgetting_size: int = 100           # untrained-probe questions
    timing_rounds: int = 5               # interleaved rounds of the step and latency timings
    timing_batch: int = 8                # rows of the timed batch (training step and inference forward)

    @classmethod
    def from_dict(cls, d: dict, name: str = "bench") -> "BenchConfig":
        values = check_keys(d, {f.name for f in dataclasses.fields(cls)})
        values.setdefault("name", name)
        cfg = cls(**values)
        if not cfg.model or bool(cfg.task) == bool(cfg.data) or bool(cfg.data) != bool(cfg.eval_data):
            raise JobError(f"bench config {cfg.name!r}: needs `model` and either `task` (built-in) or `data` and "
                           f"`eval_data` (JSONL files)")
        if cfg.steps < 1 or cfg.seeds < 1 or cfg.timing_rounds < 1:
            raise JobError(f"bench config {cfg.name!r}: steps, seeds and timing_rounds must be >= 1")
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def budget(self) -> dict:
        """What makes two runs' cells comparable: a resumed bench must have the same (methods may be added)."""
        d = self.to_dict()
        for k in ("name", "description", "methods", "exclude", "seeds"):
            d.pop(k)
        return d


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_bench_config(name_or_path: str) -> BenchConfig:
    """A shipped configuration by name, or a YAML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        near = difflib.get_close_matches(str(name_or_path), shipped_configs(), n=2, cutoff=0.4)
        hint = f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        raise JobError(f"--config {name_or_path}: no such file and no shipped bench config of that name.{hint} "
                       f"Shipped: {', '.join(shipped_configs())}")
    return BenchConfig.from_dict(read_yaml_mapping(path, "bench keys"), name=path.stem)


def select_methods(config: BenchConfig, requested: Optional[list[str]] = None) -> list[str]:
    """The grid's methods: the requested ones (checked against the registry, near matches for typos), else the
    config's list, else every registered method minus `exclude` — so a method registered later joins by itself."""
    from ..core.registry import get_method, list_methods
    names = requested or config.methods
    if names:
        out = []
        for n in names:
            try:
                out.append(get_method(n).name)
            except ValueError as e:
                raise JobError(str(e)) from None
        return out
    excluded = {get_method(n).name for n in config.exclude}
    return [m.name for m in list_methods() if m.name not in excluded]
