"""A job's method: its config from the registry preset, the generic options and `set`, and its calibration.

Method specifics are declared on MethodInfo (rank/alpha/dropout/run-length fields, what a run saves) and on the
config (calibration_data, prepare); nothing here names a method.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from ...core.registry import MethodInfo, get_method
from .config import JobConfig, JobError, comma_list


def _target_modules(tm: Any):
    """"a,b" -> ["a", "b"]; "all-linear" and regexes (no comma, a regex character) stay one string."""
    if not isinstance(tm, str) or tm == "all-linear" or ("," not in tm and any(c in tm for c in "*.[(|")):
        return tm
    return comma_list(tm)


def _set_items(items: Any) -> dict[str, Any]:
    """`set` as {FIELD: VALUE}: from a dict as it is, or from "FIELD=VALUE" strings (VALUE read as YAML)."""
    import yaml
    if isinstance(items, dict):
        return {str(k).strip().replace("-", "_"): v for k, v in items.items()}
    out = {}
    for item in [items] if isinstance(items, str) else items or []:
        key, sep, raw = str(item).partition("=")
        if not sep:
            raise JobError(f"--set {item!r}: expected FIELD=VALUE")
        out[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    return out


def method_config(config: JobConfig, task_type: str, total_steps: int) -> tuple[MethodInfo, Any]:
    """(the method's registry entry, its config): preset < r/alpha/dropout/target_modules < set."""
    info = get_method(config.method)
    fields = {f.name for f in dataclasses.fields(info.config_cls)}
    over: dict[str, Any] = {}
    generic = [("r", config.r, info.rank_field), ("alpha", config.alpha, info.alpha_field),
               ("dropout", config.dropout, info.dropout_field),
               ("target-modules", _target_modules(config.target_modules),
                "target_modules" if "target_modules" in fields else None)]
    for flag, value, field in generic:
        if value is None:
            continue
        if field is None:
            raise JobError(f"--{flag}: method {info.name!r} has no such setting (its config fields: "
                           f"{', '.join(sorted(fields))})")
        over[field] = value
    for key, value in _set_items(config.set).items():
        if key not in fields:
            raise JobError(f"--set {key}: {info.config_cls.__name__} has no field {key!r}; fields: "
                           f"{', '.join(sorted(fields))}")
        over[key] = value
    run_length = info.run_length_field
    if run_length is not None and over.get(run_length) is None and info.preset.get(run_length) is None:
        over[run_length] = total_steps  # schedules over the run's length (AdaLoRA's rank budget)
    try:
        return info, info.make_config(task_type=task_type, **over)
    except (TypeError, ValueError) as e:
        raise JobError(f"method {info.name!r}: {e}") from None


def calibrate(cfg, model, tok, train_examples: Sequence[dict], collate, batch_size: int,
              n_batches: int = 8) -> Optional[str]:
    """Let a data-driven method (Child-tuning's Fisher mask, CorDA) look at its calibration data before
    get_peft_model; returns what it saw ("task", "knowledge") or None when the method needs none."""
    if cfg.calibration_data is None:
        return None
    if cfg.calibration_data == "knowledge":
        # CorDA KPM: the knowledge to keep is general English, not the task (never the probe's own passages)
        from .. import tasks
        cfg.prepare(model, tasks.knowledge_texts(), tokenizer=tok, batch_size=batch_size)
    else:
        n = min(len(train_examples), n_batches * batch_size)
        cfg.prepare(model, [collate(train_examples[i:i + batch_size]) for i in range(0, n, batch_size)])
    return cfg.calibration_data
