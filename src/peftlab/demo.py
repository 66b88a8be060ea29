"""The demo (`make demo`, `python -m peftlab.demo`): teach SmolLM2-135M-Instruct antonyms with LoRA, on CPU.

Zero-shot and 3-shot exact match on held-out WordNet antonym pairs -> LoRA fine-tune -> exact match again ->
forgetting (general-English perplexity, an untrained definitions task) before vs after -> adapter saved ->
the saved adapter reloaded onto a fresh base gives identical outputs -> merged and unmerged outputs agree ->
a before/after table. Everything runs offline from the cache that `make demo` fills.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROMPT_NOTE = 'prompt: Q: What is the antonym of "X"?\\nA:'
CHECKED_PROMPTS = 50   # prompts whose logits the reload and merge checks compare (a fresh base runs each check)


def _say(*parts) -> None:
    print(*parts, flush=True)


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m peftlab.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--eval-size", type=int, default=200, help="held-out prompts scored by exact match")
    p.add_argument("--probe-size", type=int, default=100, help="questions of the untrained forgetting task")
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--output", default="peftlab-runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line at the end")
    return p.parse_args(argv)


def job_config(args: argparse.Namespace):
    """The demo's fine-tune as a library job: LoRA r=16 on every linear layer of SmolLM2 on WordNet antonyms."""
    from peftlab.train.jobs import JobConfig
    return JobConfig(model=args.model, method="lora", task="wordnet-antonyms", output=args.output, steps=args.steps,
                     batch_size=args.batch_size, lr=args.lr, r=args.r, alpha=args.alpha, target_modules="all-linear",
                     warmup=max(1, args.steps // 20), log_every=8, save_every=None, seed=args.seed,
                     eval_size=args.eval_size, eval_batch_size=100, forgetting_size=args.probe_size, progress=True)


def main(argv=None) -> int:
    args = _parse(argv)
    t_start = time.time()
    import os
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    from peftlab.train.jobs import prepare_job, run_prepared
    from peftlab.train.wordnet import wordnet_version

    out = Path(args.output)
    if out.exists():
        import shutil
        shutil.rmtree(out)  # the demo always starts fresh
    job = prepare_job(job_config(args))
    evalset = job.eval_records
    _say(f"peftlab demo: {args.model} on wordnet-antonyms (WordNet {wordnet_version()}), "
         f"{torch.get_num_threads()} CPU threads")
    _say(f"  {len(job.data.train)} training prompts, {len(evalset)} held-out prompts (no pair or word shared), "
         f"{PROMPT_NOTE}")
    t = time.time()
    few = _few_shot(job, args.shots)                        # the base model: the adapter is still the identity
    _say(f"[1/5] {args.shots}-shot exact match on the base model: {few['exact_match']:.1%}   "
         f"e.g. {_example(evalset, few)}")
    few_s = time.time() - t
    _say(f"[2/5] LoRA r={args.r} on all linear layers: {job.trainable_params:,} trainable parameters "
         f"({100 * job.trainable_params / job.total_params:.2f}%); {args.steps} steps x {args.batch_size}, "
         f"lr {args.lr:g}; zero-shot before, fine-tune, scores and forgetting after (run_job)")
    t = time.time()
    summary = run_prepared(job)
    run_s = time.time() - t
    zero, tuned, change = summary["eval_before"], summary["eval"], summary["forgetting"]
    _say(f"      zero-shot exact match {zero['exact_match']:.1%}   e.g. {_example(evalset, zero)}")
    _say(f"      loss {summary['train_loss_first']:.3f} -> {summary['train_loss_last']:.3f}, "
         f"{summary['tokens_per_s']:.0f} tokens/s, {summary['train_s']:.0f} s of training")
    _say(f"[3/5] fine-tuned exact match: {tuned['exact_match']:.1%}   e.g. {_example(evalset, tuned)}")
    ppl, acc = change["general_ppl"], change["definitions_acc"]
    _say(f"[4/5] forgetting: general-English perplexity {ppl['before']:.2f} -> {ppl['after']:.2f} "
         f"({100 * ppl['relative_change']:+.1f}%), untrained definitions task "
         f"{acc['before']:.1%} -> {acc['after']:.1%}")
    adapter_dir = Path(summary["saved"])
    t = time.time()
    checks = _round_trip(job.model, args.model, adapter_dir, evalset, job.tok, job.data.task.max_new_tokens)
    _say(f"[5/5] adapter saved to {adapter_dir} ({_size(adapter_dir)}); reloaded on a fresh base: max |logit diff| "
         f"(last position, {checks['checked_prompts']} held-out prompts) "
         f"{checks['reload_max_diff']:.1e}; merged vs unmerged: max |logit diff| {checks['merge_max_diff']:.1e}, "
         f"merged exact match {checks['merged_exact_match']:.1%}")
    timings = {f"{args.shots}-shot eval": few_s, "run_prepared (evals, training, probes, save)": run_s,
               "training": summary["train_s"], "reload + merge checks": time.time() - t}
    return _report(args, summary, few, checks, timings, time.time() - t_start)


def _few_shot(job, shots: int) -> dict:
    from peftlab.train.jobs.evaluate import Evaluator
    with job.model.disable_adapter():
        return Evaluator.build(job.data, job.tok, job.config, job.eval_records, few_shot=shots)(job.model)


def _report(args, summary: dict, few: dict, checks: dict, timings: dict, wall: float) -> int:
    """The before/after table, demo.json, and the exit code (0: fine-tuning beat few-shot, reload identical)."""
    zero, tuned, change = summary["eval_before"], summary["eval"], summary["forgetting"]
    before = {k: v["before"] for k, v in change.items()}
    after = {k: v["after"] for k, v in change.items()}
    rows = [("zero-shot", zero["exact_match"], before), (f"{args.shots}-shot", few["exact_match"], before),
            (f"LoRA fine-tuned ({args.steps} steps)", tuned["exact_match"], after),
            ("  merged into the base", checks["merged_exact_match"], None)]
    _say("")
    _say(f"{'':<30}{'exact match':>12}{'English ppl':>13}{'definitions':>13}")
    for name, em, probe in rows:
        ppl = f"{probe['general_ppl']:.2f}" if probe else ""
        acc = f"{probe['definitions_acc']:.1%}" if probe else ""
        _say(f"{name:<30}{em:>12.1%}{ppl:>13}{acc:>13}")
    _say(f"(exact match on {tuned['n']} held-out prompts; perplexity on WordNet example-sentence passages; "
         f"definitions: {args.probe_size} untrained 4-way questions, chance 25%)")
    _say(f"wall time {wall:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
    ok = tuned["exact_match"] > few["exact_match"] and checks["reload_max_diff"] <= 1e-5
    result = {"zero_shot": zero["exact_match"], "few_shot": few["exact_match"], "fine_tuned": tuned["exact_match"],
              "merged": checks["merged_exact_match"], "forgetting": change, "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "loss_first": summary["train_loss_first"],
              "loss_last": summary["train_loss_last"], "tokens_per_s": summary["tokens_per_s"],
              "train_s": summary["train_s"], "wall_s": wall, "timings": timings, "adapter": summary["saved"],
              **checks}
    (Path(args.output) / "demo.json").write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
    if not ok:
        _say("the fine-tuned model did not beat the few-shot baseline, or the reloaded adapter differs")
    return 0 if ok else 1


def _example(evalset, result) -> str:
    """The first held-out prompt's answer: word -> prediction (accepted answers)."""
    r, pred = evalset[0], result["examples"][0]["prediction"]
    word = r["prompt"].split('"')[1]
    return f'{word} -> "{pred[:40]}" (accepted: {", ".join(r["answers"])})'


def _size(path: Path) -> str:
    n = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{n / 1e6:.1f} MB"


def _round_trip(pm, model_name, adapter_dir, evalset, tok, max_new_tokens: int) -> dict:
    """The saved adapter reloaded onto a fresh base, then merged: last-position logits against the trained model on
    CHECKED_PROMPTS held-out prompts; the merged model's exact match on all of them."""
    import torch
    import peftlab
    from peftlab.models import load_model
    from peftlab.train import data as D, metrics as M

    enc = [{"input_ids": tok(r["prompt"])["input_ids"], "labels": 0} for r in evalset[:CHECKED_PROMPTS]]
    batch = D.Collator(tok.pad_token_id, "left", position_ids=False)(enc)
    batch.pop("labels")

    @torch.no_grad()
    def logits(m):
        m.eval()
        return torch.cat([m(**{k: v[i:i + 50] for k, v in batch.items()}, logits_to_keep=1).logits[:, -1].float()
                          for i in range(0, len(enc), 50)])

    trained = logits(pm)
    base, _ = load_model(model_name, task="causal-lm")
    reloaded = peftlab.PeftModel.from_pretrained(base, str(adapter_dir))
    reload_diff = float((logits(reloaded) - trained).abs().max())
    merged = reloaded.merge_and_unload()
    merge_diff = float((logits(merged) - trained).abs().max())
    merged_em = M.eval_generation(merged, tok, evalset, max_new_tokens=max_new_tokens, batch_size=100)["exact_match"]
    return {"reload_max_diff": reload_diff, "merge_max_diff": merge_diff, "checked_prompts": len(enc),
            "merged_exact_match": merged_em}


if __name__ == "__main__":
    sys.exit(main())
