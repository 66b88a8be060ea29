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


def _say(*parts) -> None:
    print(*parts, flush=True)


def main(argv=None) -> int:
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
    args = p.parse_args(argv)

    t_start = time.time()
    import os
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    import peftlab
    from peftlab.train.jobs import sample
    from peftlab.models import load_model
    from peftlab.train import data as D, metrics as M, tasks as T
    from peftlab.train.loop import TrainConfig, train
    from peftlab.train.wordnet import wordnet_version

    torch.manual_seed(args.seed)
    out = Path(args.output)
    if out.exists():
        import shutil
        shutil.rmtree(out)  # the demo always starts fresh
    task = T.get_task("wordnet-antonyms")
    evalset = sample(task.eval, args.eval_size, args.seed)
    model, tok = load_model(args.model, task="causal-lm")
    _say(f"peftlab demo: {args.model} on wordnet-antonyms (WordNet {wordnet_version()}), "
         f"{torch.get_num_threads()} CPU threads")
    _say(f"  {len(task.train)} training prompts, {len(evalset)} held-out prompts (no pair or word shared), "
         f"{PROMPT_NOTE}")
    texts, questions = T.forgetting_inputs(n_questions=args.probe_size)
    gen = dict(max_new_tokens=task.max_new_tokens, batch_size=100)
    timings = {}

    def timed(label, fn):
        t = time.time()
        r = fn()
        timings[label] = time.time() - t
        return r

    # 1-2. baselines and the forgetting probe on the untouched model
    zero = timed("zero-shot eval", lambda: M.eval_generation(model, tok, evalset, **gen))
    _say(f"[1/6] zero-shot exact match: {zero['exact_match']:.1%}   e.g. {_example(evalset, zero)}")
    shots = task.few_shot(args.shots, seed=args.seed)
    few = timed(f"{args.shots}-shot eval", lambda: M.eval_generation(model, tok, evalset, few_shot=shots, **gen))
    _say(f"[2/6] {args.shots}-shot exact match:   {few['exact_match']:.1%}   e.g. {_example(evalset, few)}")
    before = timed("forgetting probe", lambda: M.forgetting_probe(model, tok, texts, questions, "definitions"))

    # 3. LoRA fine-tune with peftlab's loop
    cfg = peftlab.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    pm = peftlab.get_peft_model(model, cfg)
    trainable, total = pm.get_nb_trainable_parameters()
    _say(f"[3/6] LoRA r={args.r} on all linear layers: {trainable:,} trainable parameters "
         f"({100 * trainable / total:.2f}%); {args.steps} steps x {args.batch_size}, lr {args.lr:g}")
    examples = D.encode_causal(task.train, tok)
    result = train(pm, examples, D.Collator(tok.pad_token_id, "left"),
                   TrainConfig(output_dir=str(out), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               warmup_steps=max(1, args.steps // 20), log_every=8, save_every=None,
                               keep_checkpoints=1, seed=args.seed))
    timings["training"] = result["wall_s"]
    _say(f"      loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}, {result['tokens_per_s']:.0f} tokens/s, "
         f"{result['wall_s']:.0f} s")
    tuned = timed("fine-tuned eval", lambda: M.eval_generation(pm, tok, evalset, **gen))
    _say(f"[4/6] fine-tuned exact match: {tuned['exact_match']:.1%}   e.g. {_example(evalset, tuned)}")
    after = timed("forgetting probe (after)", lambda: M.forgetting_probe(pm, tok, texts, questions, "definitions"))
    change = M.forgetting_change(before, after)
    _say(f"[5/6] forgetting: general-English perplexity {before['general_ppl']:.2f} -> {after['general_ppl']:.2f} "
         f"({100 * change['general_ppl']['relative_change']:+.1f}%), untrained definitions task "
         f"{before['definitions_acc']:.1%} -> {after['definitions_acc']:.1%}")

    # 4. save, reload onto a fresh base, compare; merge, compare
    adapter_dir = out / "adapter"
    pm.save_pretrained(str(adapter_dir))
    checks = timed("reload + merge checks", lambda: _round_trip(pm, args.model, adapter_dir, evalset, tok, gen))
    _say(f"[6/6] adapter saved to {adapter_dir} ({_size(adapter_dir)}); reloaded on a fresh base: max |logit diff| "
         f"{checks['reload_max_diff']:.1e}; "
         f"merged vs unmerged: max |logit diff| {checks['merge_max_diff']:.1e}, merged exact match "
         f"{checks['merged_exact_match']:.1%}")

    wall = time.time() - t_start
    rows = [("zero-shot", zero["exact_match"], before), (f"{args.shots}-shot", few["exact_match"], before),
            (f"LoRA fine-tuned ({args.steps} steps)", tuned["exact_match"], after),
            ("  merged into the base", checks["merged_exact_match"], None)]
    _say("")
    _say(f"{'':<30}{'exact match':>12}{'English ppl':>13}{'definitions':>13}")
    for name, em, probe in rows:
        ppl = f"{probe['general_ppl']:.2f}" if probe else ""
        acc = f"{probe['definitions_acc']:.1%}" if probe else ""
        _say(f"{name:<30}{em:>12.1%}{ppl:>13}{acc:>13}")
    _say(f"(exact match on {len(evalset)} held-out prompts; perplexity on {len(texts)} passages of WordNet example "
         f"sentences; definitions: {len(questions)} untrained 4-way questions, chance 25%)")
    _say(f"wall time {wall:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
    ok = tuned["exact_match"] > few["exact_match"] and checks["reload_max_diff"] <= 1e-5
    summary = {"zero_shot": zero["exact_match"], "few_shot": few["exact_match"], "fine_tuned": tuned["exact_match"],
               "merged": checks["merged_exact_match"], "forgetting": change, "steps": args.steps,
               "batch_size": args.batch_size, "lr": args.lr, "loss_first": result["loss_first"],
               "loss_last": result["loss_last"], "tokens_per_s": result["tokens_per_s"],
               "train_s": result["wall_s"], "wall_s": wall, "timings": timings, "adapter": str(adapter_dir), **checks}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary))
    if not ok:
        _say("the fine-tuned model did not beat the few-shot baseline, or the reloaded adapter differs")
    return 0 if ok else 1


def _example(evalset, result) -> str:
    r, pred = evalset[0], result["predictions"][0]
    word = r["prompt"].split('"')[1]
    return f'{word} -> "{M_first_line(pred)}" (accepted: {", ".join(r["answers"])})'


def M_first_line(text: str) -> str:
    return text.strip().split("\n")[0][:40]


def _size(path: Path) -> str:
    n = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{n / 1e6:.1f} MB"


def _round_trip(pm, model_name, adapter_dir, evalset, tok, gen) -> dict:
    import torch
    import peftlab
    from peftlab.models import load_model
    from peftlab.train import data as D, metrics as M

    enc = [{"input_ids": tok(r["prompt"])["input_ids"], "labels": 0} for r in evalset]
    batch = D.Collator(tok.pad_token_id, "left", position_ids=False)(enc)
    batch.pop("labels")

    @torch.no_grad()
    def logits(m):
        m.eval()
        return torch.cat([m(**{k: v[i:i + 50] for k, v in batch.items()}).logits[:, -1].float()
                          for i in range(0, len(enc), 50)])

    trained = logits(pm)
    base, _ = load_model(model_name, task="causal-lm")
    reloaded = peftlab.PeftModel.from_pretrained(base, str(adapter_dir))
    reload_diff = float((logits(reloaded) - trained).abs().max())
    merged = reloaded.merge_and_unload()
    merge_diff = float((logits(merged) - trained).abs().max())
    merged_em = M.eval_generation(merged, tok, evalset, **gen)["exact_match"]
    return {"reload_max_diff": reload_diff, "merge_max_diff": merge_diff,
            "merged_exact_match": merged_em}


if __name__ == "__main__":
    sys.exit(main())
