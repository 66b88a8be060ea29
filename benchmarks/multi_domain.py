"""Multi-domain learning on real data (issue 14's scenario): one base, three WordNet tasks trained mixed.

SmolLM2-135M; tasks wordnet-antonyms, wordnet-hypernyms, wordnet-noun-category (generation, exact match on
held-out words). Rows: one LoRA per task (the upper reference, each trained on its task alone, scored on it),
one LoRA on the mixed data, MoE-LoRA with and without the zero expert, soft and sparse MoA, and TT-LoRA MoE
(stage 1: one tt-lora per task; stage 2: the router alone, on the mixed data with each record's task label).
Every mixed run sees the same shuffled examples for the same number of steps at its method's default lr.
Reported: per-task held-out exact match, trainable parameters, seconds per training step (wall, 2 threads),
and forgetting (general-English perplexity before → after; the base's is the "before").
Run: .venv/bin/python benchmarks/multi_domain.py [--steps 60] [--per-task 160] [--eval 100] [--out rows.json]
With --out, each finished row is written there at once and a rerun with the same settings skips the rows it holds
(an interrupted run resumes; the rows are independent: each trains from the base).
Small on purpose (2 CPU cores): differences of a few points are within the noise of 100 held-out words.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

import peftlab
from peftlab.models import load_model
from peftlab.train import loop as L
from peftlab.train import metrics as M
from peftlab.train.data import Collator, encode_causal
from peftlab.train.tasks import general_english_passages, get_task

TASKS = ("wordnet-antonyms", "wordnet-hypernyms", "wordnet-noun-category")
ALL_LINEAR = "all-linear"


def mixed_records(per_task: int, seed: int = 0) -> list[dict]:
    out = []
    for i, name in enumerate(TASKS):
        out += [{**r, "expert": i} for r in get_task(name).train[:per_task]]
    random.Random(seed).shuffle(out)
    return out


def train(model, tok, records, steps: int, lr: float, batch: int = 8) -> dict:
    examples = encode_causal(records, tok, max_length=64)
    cfg = L.TrainConfig(steps=steps, batch_size=batch, lr=lr, progress=False, log_every=10 ** 6, seed=0)
    return L.train(model, examples, Collator(tok.pad_token_id, "left"), cfg)


def score(model, tok, n_eval: int, texts) -> dict:
    model.eval()
    out = {}
    for name in TASKS:
        recs = get_task(name).eval[:n_eval]
        out[name] = M.eval_generation(model, tok, recs, max_new_tokens=6, batch_size=50)["exact_match"]
    out["ppl"] = M.perplexity(model, tok, texts, batch_size=12)
    return out


def fresh(method: str, **fields):
    base, tok = load_model("smollm2-135m")
    info = peftlab.get_method(method)
    return peftlab.get_peft_model(base.float(), info.make_config(task_type="CAUSAL_LM", **fields)), tok, info


def mixed_row(label, method, fields, args, records, texts) -> dict:
    model, tok, info = fresh(method, **fields)
    res = train(model, tok, records, args.steps, info.default_lr)
    s = score(model, tok, args.eval, texts)
    return {"method": label, **s, "trainable": res["trainable_params"], "s_per_step": res["wall_s"] / res["steps"],
            "routing": _routing(model)}


def _routing(model) -> dict:
    """Per adapter: the mean expert/slot load over layers, overall (what the router did on the held-out data)."""
    return {k: v["all"]["mean_load"] for k, v in model.get_routing_stats().items() if "all" in v}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--router-steps", type=int, default=20)
    ap.add_argument("--per-task", type=int, default=160)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    texts = general_english_passages(12)
    records = mixed_records(args.per_task)
    settings = {k: getattr(args, k) for k in ("steps", "router_steps", "per_task", "eval")}
    done = _load_rows(args.out, settings)
    rows = []

    def row(label: str, measure) -> None:
        rows.append(done[label] if label in done else {"method": label, **measure()})
        if label not in done:
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            _save_rows(args.out, settings, rows)

    row("base model (no training)", lambda: base_row(args, texts))
    row("LoRA per task (3 adapters, r 8, all-linear)", lambda: lora_per_task_row(args, records, texts))
    mixes = [("LoRA on the mixed data (r 8, all-linear)", "lora", dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR)),
             ("MoE-LoRA (4 × r4, top-2, all-linear)", "moe-lora",
              dict(r=4, lora_alpha=8, num_experts=4, top_k=2, target_modules=ALL_LINEAR)),
             ("MoE-LoRA + zero expert", "moe-lora",
              dict(r=4, lora_alpha=8, num_experts=4, top_k=2, zero_expert=True, target_modules=ALL_LINEAR)),
             ("MoA soft (LoRA r8 on q/k/v/o/down, adapter 16, prompt 10)", "moa", dict(mode="soft")),
             ("MoA sparse", "moa", dict(mode="sparse"))]
    for label, method, fields in mixes:
        row(label, lambda: mixed_row(label, method, fields, args, records, texts))
    row(f"TT-LoRA MoE (3 tt-lora experts, all-linear; router {args.router_steps} steps)",
        lambda: tt_lora_moe_row(args, records, texts))
    table(rows, args)


def base_row(args, texts) -> dict:
    base, tok = load_model("smollm2-135m")
    return {**score(base.float(), tok, args.eval, texts), "trainable": 0, "s_per_step": None}


def lora_per_task_row(args, records, texts) -> dict:
    """The upper reference: one LoRA per task, trained on its task alone for the same number of steps."""
    per_task, trainable, secs, ppl = {}, 0, [], []
    for name in TASKS:
        model, tok, info = fresh("lora", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
        res = train(model, tok, [r for r in records if TASKS[r["expert"]] == name], args.steps, info.default_lr)
        s = score(model, tok, args.eval, texts)
        per_task[name], trainable, secs = s[name], trainable + res["trainable_params"], secs + [res["wall_s"] / res["steps"]]
        ppl.append(s["ppl"])
    return {**per_task, "ppl": sum(ppl) / len(ppl), "trainable": trainable, "s_per_step": sum(secs) / len(secs)}


def tt_lora_moe_row(args, records, texts) -> dict:
    """Stage 1: one tt-lora per task, on its task alone; stage 2: the router alone, on the mixed data."""
    with tempfile.TemporaryDirectory(prefix="peftlab-tt-lora-experts-") as root:
        dirs, stage1_params, stage1_secs = [], 0, []
        for i, name in enumerate(TASKS):
            model, tok, info = fresh("tt-lora", target_modules=ALL_LINEAR)
            res = train(model, tok, [r for r in records if r["expert"] == i], args.steps, info.default_lr)
            dirs.append(f"{root}/{name}")
            model.save_pretrained(dirs[-1])
            stage1_params += res["trainable_params"]
            stage1_secs.append(res["wall_s"] / res["steps"])
        model, tok, info = fresh("tt-lora-moe", expert_dirs=dirs)
    res = train(model, tok, records, args.router_steps, 1e-2)
    return {**score(model, tok, args.eval, texts), "trainable": stage1_params + res["trainable_params"],
            "s_per_step": sum(stage1_secs) / len(stage1_secs), "router_s_per_step": res["wall_s"] / res["steps"],
            "routing": _routing(model)}


def _load_rows(path, settings) -> dict:
    """Rows a previous run with the same settings finished, by label ({} without --out or with other settings)."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    if not isinstance(saved, dict) or saved.get("settings") != settings:
        return {}
    return {r["method"]: r for r in saved["rows"]}


def _save_rows(path, settings, rows) -> None:
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=1)
    os.replace(tmp, path)   # atomically: an interruption leaves the previous rows


def table(rows, args) -> None:
    base_ppl = rows[0]["ppl"]
    print(f"Multi-domain: {', '.join(TASKS)}; SmolLM2-135M fp32, {args.per_task} training examples per task "
          f"mixed, {args.steps} steps × 8, {args.eval} held-out words per task (exact match), 2 CPU threads\n")
    print("| method | " + " | ".join(t.replace("wordnet-", "") for t in TASKS) + " | mean | trainable | s/step "
          "| general-English ppl (base → after) | routing (mean load per slot, held-out data) |")
    print("|---|" + "---|" * (len(TASKS) + 5))
    for r in rows:
        scores = [r[t] for t in TASKS]
        sps = "" if r["s_per_step"] is None else f"{r['s_per_step']:.2f}"
        if "router_s_per_step" in r:
            sps += f" (router {r['router_s_per_step']:.2f})"
        routing = "; ".join(", ".join(f"{v:.2f}" for v in load) for load in (r.get("routing") or {}).values() if load)
        print(f"| {r['method']} | " + " | ".join(f"{100 * s:.0f}%" for s in scores)
              + f" | {100 * sum(scores) / len(scores):.1f}% | {r['trainable']:,} | {sps} "
              + f"| {base_ppl:.2f} → {r['ppl']:.2f} ({100 * (r['ppl'] / base_ppl - 1):+.1f}%) | {routing} |")


if __name__ == "__main__":
    main()
