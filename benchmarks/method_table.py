"""The method zoo side by side on SmolLM2-135M: trainable parameters, demo-task score, forgetting, latency.

Two parts, run one after the other (never alongside other CPU work: the latency column is a timing):
  train    — a training job (peftlab.train.jobs.run_job, what `peftlab train` runs) for each method on
             wordnet-antonyms (the demo task) with the method's default learning rate and config, a short run,
             in this process; keeps each run's summary.
  latency  — unmerged inference forward (batch 8×64, logits of the last position) of each method over the
             frozen base, CPU time, interleaved rounds (benchmarks/common.py), adapters with random non-zero
             weights. Prompt methods pay for their virtual tokens here.
Run: .venv/bin/python benchmarks/method_table.py [--steps 40] [--methods lora,ia3@1e-2,...] [--skip-train|--skip-latency]
Writes benchmarks/results/method_table.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import base_model, env_line, interleaved, randomize, setup_torch, shared_copy, token_batch  # noqa: E402
import torch  # noqa: E402

# Extra rows: a registry method with config overrides (what `--set` takes).
VARIANTS = {"corda-kpm": ("corda", ["corda_config={corda_method: kpm}"]),
            "bitfit+bias": ("bitfit", ["add_bias=true"]),   # LLaMA-style models have no biases of their own
            "p-tuning-v2+zero": ("p-tuning-v2", ["init_weights=zero"])}  # zero keys/values instead of N(0, 1)


def rows(selected: str | None) -> list[tuple[str, str, list[str]]]:
    from peftlab.core.registry import list_methods
    names = [m.name for m in list_methods()] + list(VARIANTS)
    if selected:
        names = [n.strip() for n in selected.split(",") if n.strip()]
    # "NAME@LR" rows: the same method at another learning rate (e.g. fourierft@5e-2)
    return [(n, *VARIANTS.get(n.split("@")[0], (n.split("@")[0], []))) for n in names]


def train_row(label: str, method: str, sets: list[str], args, workdir: Path) -> dict:
    from peftlab.train.jobs import JobConfig, run_job
    from peftlab.train.jobs.run import jsonable
    config = JobConfig(model="smollm2-135m", task="wordnet-antonyms", method=method, steps=args.steps,
                       batch_size=args.batch_size, eval_size=args.eval_size, eval_before=False, progress=False,
                       save_every=0, output=str(workdir / label), set=sets,
                       lr=float(label.split("@")[1]) if "@" in label else None)
    try:
        summary = run_job(config)
    except Exception as e:  # noqa: BLE001 - a row that fails is reported in the table, the others still run
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    return json.loads(json.dumps(summary, default=jsonable))  # what `peftlab train --json` prints


def latency(labels: list[tuple[str, str, list[str]]], rounds: int) -> dict[str, float]:
    """Median per-round CPU-time ratio adapted/base for a 8×64 inference forward, one method at a time."""
    import yaml
    import peftlab
    from peftlab.core.registry import get_method
    setup_torch(2)
    base = base_model()
    batch = token_batch(8, 64, labels=False)  # 32×64 (issue 6) takes ~7 s a forward here

    def fwd(m):
        def run():
            with torch.inference_mode():
                m(**batch, logits_to_keep=1)
        return run

    out = {}
    for label, method, sets in labels:
        info = get_method(method)
        if info.kind == "full" or info.category == "selective" or "@" in label:
            continue  # selective/full change weights in place (the base forward); NAME@LR has NAME's latency
        over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in sets)}
        if info.run_length_field is not None:
            over.setdefault(info.run_length_field, 100)  # a schedule over the run needs its length; any will do here
        cfg = info.make_config(task_type="CAUSAL_LM", **over)
        if cfg.calibration_data is not None:
            cfg.prepare(base, [token_batch(4, 64, labels=False, seed=1)])
        pm = peftlab.get_peft_model(shared_copy(base), cfg).eval()
        randomize(pm, std=0.01)
        res = interleaved({"base": fwd(base), label: fwd(pm)}, "base", rounds=rounds, verbose=False)
        out[label] = res[label]["ratio"]
        print(f"  latency {label}: {out[label]:.3f}x base", flush=True)
        del pm
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", help="comma-separated rows (default: every registered method + corda-kpm)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "method_table.json"))
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight-loading bars, once a row (the CLI did this for each subprocess)
    table = rows(args.methods)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    print(f"method table: {args.steps} steps x {args.batch_size}, eval on {args.eval_size} held-out prompts; "
          f"{env_line()}", flush=True)
    if not args.skip_train:
        with tempfile.TemporaryDirectory(prefix="peftlab-table-") as tmp:
            for label, method, sets in table:
                r = train_row(label, method, sets, args, Path(tmp))
                results.setdefault(label, {}).update(train=r)
                print(f"  trained {label}: " + (r["error"] if "error" in r else
                      f"{r['trainable_params']:,} params, EM {r['eval']['exact_match']:.1%}"), flush=True)
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps(results, indent=1))
    if not args.skip_latency:
        for label, ratio in latency(table, args.rounds).items():
            results.setdefault(label, {})["latency_ratio"] = ratio
        out_path.write_text(json.dumps(results, indent=1))
    print_markdown(results, [t[0] for t in table])


def print_markdown(results: dict, order: list[str]) -> None:
    print("\n| method | lr | trainable | % of model | exact match | general ppl before→after | definitions acc "
          "before→after | train s | unmerged latency vs base |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in order:
        r = results.get(label, {})
        t = r.get("train", {})
        lat = f"{r['latency_ratio']:.3f}×" if "latency_ratio" in r else ""
        if "error" in t or not t:
            print(f"| {label} | | | | {t.get('error', 'not run')} | | | | {lat} |")
            continue
        f = t.get("forgetting", {})
        ppl, acc = f.get("general_ppl", {}), f.get("definitions_acc", {})
        print(f"| {label} | {t['lr']:g} | {t['trainable_params']:,} | {100 * t['trainable_params'] / t['total_params']:.3f}% "
              f"| {t['eval']['exact_match']:.1%} | {ppl.get('before', 0):.1f}→{ppl.get('after', 0):.1f} "
              f"({100 * ppl.get('relative_change', 0):+.1f}%) | {acc.get('before', 0):.1%}→{acc.get('after', 0):.1%} "
              f"| {t['train_s']:.0f} | {lat} |")


if __name__ == "__main__":
    main()
