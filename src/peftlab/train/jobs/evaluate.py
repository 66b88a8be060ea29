"""Scoring a model on a job's held-out data (by its kind), the forgetting probe, and run_eval (`peftlab eval`)."""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .. import metrics as M
from .config import DataOptions, EvalConfig, JobError
from .inputs import (JobData, adapter_directory, encode, load_base, load_data, pick_eval_records, sample,
                     with_run_defaults)

Say = Callable[..., None]


def quiet(*parts) -> None:
    """The default `say`: a job called from Python prints nothing."""


def fmt_metrics(metrics: Optional[dict]) -> str:
    if not metrics:
        return "-"
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                     if isinstance(v, (int, float)))


@dataclass
class Evaluator:
    """model -> metrics dict for the job's kind: exact match (generation), accuracy (multiple choice),
    perplexity (text), accuracy and macro-F1 (classification); {} without held-out records."""
    data: JobData
    tok: object
    config: DataOptions
    records: list
    shots: list

    @classmethod
    def build(cls, data: JobData, tok, config: DataOptions, records: list, few_shot: int = 0) -> "Evaluator":
        if few_shot and data.kind != "generation":
            raise JobError("--few-shot applies to generation tasks (prompt/completion data)")
        shots = data.task.few_shot(few_shot, seed=config.seed) if (data.task and few_shot) else \
            sample(data.train, few_shot, config.seed) if few_shot else []
        return cls(data, tok, config, records, shots)

    def __call__(self, model) -> dict:
        kind, records, bs = self.data.kind, self.records, self.config.eval_batch_size
        if not records:
            return {}
        if kind == "generation":
            max_new = self.config.max_new_tokens or (self.data.task.max_new_tokens if self.data.task else 32)
            r = M.eval_generation(model, self.tok, records, self.shots, max_new, bs, bool(self.config.chat_template))
            return {"exact_match": r["exact_match"], "n": r["n"], "examples": [
                {"prompt": e["prompt"], "prediction": p.strip().split("\n")[0]}
                for e, p in list(zip(records, r["predictions"]))[:5]]}
        if kind == "multiple-choice":
            return M.eval_multiple_choice(model, self.tok, records, bs)
        if kind == "lm":
            return {"perplexity": M.perplexity(model, self.tok, [r["text"] for r in records], bs), "n": len(records)}
        ex, _ = encode("classification", records, self.tok, self.config, self.data.labels)
        r = M.eval_classification(model, self.tok, ex, len(self.data.labels), bs)
        return {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "n": r["n"]}


def routed_evaluation(evaluate: Evaluator, model, group: str) -> tuple[dict, Optional[dict]]:
    """(metrics, routing statistics of this evaluation, under group `group` (the task) and "all"); the
    statistics are None for a model without routed adapters (PeftModel.get_routing_stats)."""
    from ...core.model import PeftModel
    if not isinstance(model, PeftModel):
        return evaluate(model), None
    model.reset_routing_stats()
    with model.routing_group(group):
        metrics = evaluate(model)
    return metrics, model.get_routing_stats() or None


def forgetting_probe(data: JobData, tok, config: DataOptions, size: int) -> Optional[Callable]:
    """model -> forgetting metrics, or None where the model has no language-modelling head."""
    if data.kind == "classification":
        return None
    from ..tasks import forgetting_inputs
    texts, questions = forgetting_inputs(n_questions=size)
    if data.name == "wordnet-definitions":
        questions = []  # the task trains it: it is no longer an untrained probe
    return functools.partial(M.forgetting_probe, tokenizer=tok, texts=texts, probe_records=questions,
                             probe_name="definitions", batch_size=config.eval_batch_size)


def adapter_kind(adapter: Optional[str]):
    """(task_type, labels) of an adapter directory."""
    if not adapter:
        return None, None
    from ...core.config import PeftConfig
    from ..data import load_labels
    cfg = PeftConfig.from_pretrained(adapter)
    return cfg.task_type, load_labels(adapter)


def _model_labels(model: str) -> Optional[list]:
    """The label names in a model directory's config.json (None for HF's placeholder LABEL_i names)."""
    from ...models import model_path
    cfg_path = Path(model_path(model, fetch=False)) / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    id2label = cfg.get("id2label") or {}
    if not id2label or set(id2label.values()) <= {f"LABEL_{i}" for i in range(len(id2label))}:
        return None
    return [id2label[str(i)] for i in range(len(id2label))]


def _eval_labels(config: EvalConfig, data: JobData, task_type: Optional[str], labels: Optional[list]) -> list:
    """The trained label names a classification eval scores against (the adapter's, else the model's)."""
    if task_type is not None and task_type != "SEQ_CLS":
        raise JobError(f"{data.name} is classification data but the adapter's task_type is {task_type}")
    labels = labels or _model_labels(config.model)
    if not labels:
        raise JobError("classification eval needs trained label names: an adapter directory with labels.json "
                       "(written by peftlab train), or a --model whose config has id2label")
    unknown = sorted({str(r["label"]) for r in data.eval or data.train} - set(labels))
    if unknown:
        raise JobError(f"{data.name}: labels {unknown[:5]} were not trained (trained: {', '.join(labels[:10])})")
    return labels


def run_eval(config: EvalConfig, say: Say = quiet) -> dict:
    """Evaluate config.model (with config.adapter) on the task's split or the data file; what `peftlab eval`
    prints under --json."""
    from ...core.model import PeftModel
    config = with_run_defaults(dataclasses.replace(config, adapter=adapter_directory(config.adapter)))
    if not config.model:
        raise JobError("eval needs --model (or --adapter RUN, a train run's --output, whose run.json names it)")
    data = load_data(config, config.split)
    task_type, labels = adapter_kind(config.adapter)
    if data.kind == "classification":
        data.labels = _eval_labels(config, data, task_type, labels)
    records = data.eval if (data.task or data.eval) else data.train  # --data FILE: the file is the evaluation set
    records, which = pick_eval_records(records, config, data.name, data.task is not None)
    say(which + (f", with the adapter {config.adapter}" if config.adapter else ""))
    model, tok = load_base(config.model, config.device, data.kind, data.labels, config)
    if config.adapter:
        model = PeftModel.from_pretrained(model, config.adapter)
    model.eval()
    t = time.time()
    metrics, routing = routed_evaluation(Evaluator.build(data, tok, config, records, config.few_shot or 0), model,
                                         data.name)
    res = {"command": "eval", "model": config.model, "adapter": config.adapter, "quantize": config.quantize,
           "task": data.name,
           "kind": data.kind, "split": config.split if data.task else None, "few_shot": config.few_shot or 0,
           **metrics}
    if routing:
        res["routing"] = routing
    if config.forgetting:
        probe = forgetting_probe(data, tok, config, config.forgetting_size)
        res["forgetting"] = probe(model) if probe else None
    res["eval_s"] = time.time() - t
    say(f"{data.name} ({data.kind}, {len(records)} examples): {fmt_metrics(metrics)}")
    if res.get("forgetting"):
        say(f"forgetting probe: {fmt_metrics(res['forgetting'])}")
    return res
