"""Composing per-task LoRAs without further training (issue 15's composition scenario), on real data.

SmolLM2-135M; three WordNet generation tasks (antonyms, hypernyms, noun category). One LoRA per task (r 8 on all
linear layers, trained on its task alone: the upper reference), then one adapter from the three by every
`add_weighted_adapter` type (weights 1 each: task arithmetic), by SMILE (`peftlab compose smile`, top-1 and top-2),
by LoraHub (weights searched per task on 5 of its training examples, 40 evaluations), and by TTMM (each prompt
merges the experts whose centroid is near its MiniLM embedding): once with the three task LoRAs as experts (each
centroid from its task's 160 training prompts), once by TTMM's own recipe (the 480 training prompts clustered
into 3 by bisecting k-means, one LoRA trained per cluster with the same budget). Each is scored on every task's
held-out words (exact match); a LoraHub row uses, for each task, the composition fitted for that task.
Reported beside the scores: the extra parameters of the composed adapter.
Run: .venv/bin/python benchmarks/composition.py [--steps 40] [--eval 50] [--rows merging,smile,lorahub,ttmm]
[--out rows.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

import peftlab
from peftlab.methods.lora.lorahub import lorahub
from peftlab.methods.smile import SmileConfig
from peftlab.methods.ttmm import SentenceEncoder, TTMMConfig, centroids, cluster_texts
from peftlab.models import model_path
from peftlab.models import load_model
from peftlab.train import loop as L
from peftlab.train import metrics as M
from peftlab.train.data import Collator, encode_causal
from peftlab.train.tasks import get_task

TASKS = ("wordnet-antonyms", "wordnet-hypernyms", "wordnet-noun-category")
TYPES = [("linear", {}), ("cat", {}), ("svd", {}), ("ties", {"density": 0.5}), ("ties_svd", {"density": 0.5}),
         ("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.5})]
LORA = dict(r=8, lora_alpha=16, target_modules="all-linear")


def scores(model, tok, n_eval: int) -> dict:
    model.eval()
    return {t: M.eval_generation(model, tok, get_task(t).eval[:n_eval], max_new_tokens=6, batch_size=50)["exact_match"]
            for t in TASKS}


def train_lora(records: list, directory: str, steps: int) -> str:
    base, tok = load_model("smollm2-135m")
    model = peftlab.get_peft_model(base.float(), peftlab.LoraConfig(task_type="CAUSAL_LM", **LORA))
    examples = encode_causal(records, tok, max_length=64)
    L.train(model, examples, Collator(tok.pad_token_id, "left"),
            L.TrainConfig(steps=steps, batch_size=8, lr=2e-3, progress=False, log_every=10 ** 6, seed=0))
    model.save_pretrained(directory)
    print(f"  trained {directory}", file=sys.stderr, flush=True)
    return directory


def train_per_task(root: str, steps: int) -> list[str]:
    return [train_lora(get_task(name).train[:160], f"{root}/{name}", steps) for name in TASKS]


def ttmm_rows(row, root: str, dirs: list, steps: int, n_eval: int) -> None:
    tok = load_model("smollm2-135m")[1]
    encoder = SentenceEncoder()
    prompts = {name: [r["prompt"] for r in get_task(name).train[:160]] for name in TASKS}
    by_task = torch.stack([torch.nn.functional.normalize(encoder(prompts[n]).mean(0), dim=0) for n in TASKS])
    tokenizer = str(model_path("smollm2-135m"))

    def run(experts, cents, label, note):
        model = peftlab.get_peft_model(load_model("smollm2-135m")[0].float(),
                                       TTMMConfig(expert_dirs=experts, centroids=cents.tolist(), tokenizer=tokenizer))
        row(label, scores(model, tok, n_eval), model.get_nb_trainable_parameters()[0], note)

    run(dirs, by_task, "TTMM over the 3 task LoRAs (centroid = each task's prompts)", "β 0.2, τ 0.01")
    records = [r for n in TASKS for r in get_task(n).train[:160]]
    emb = encoder([r["prompt"] for r in records])
    assignment = cluster_texts(emb, 3)
    purity = [max(sum(1 for i, a in enumerate(assignment) if a == k and i // 160 == t) for t in range(3))
              / max(1, assignment.count(k)) for k in range(3)]
    experts = [train_lora([r for r, a in zip(records, assignment) if a == k], f"{root}/cluster{k}", steps)
               for k in range(3)]
    run(experts, centroids(emb, assignment, 3), "TTMM recipe (480 prompts → 3 bisecting-k-means clusters, a LoRA each)",
        "cluster sizes " + "/".join(str(assignment.count(k)) for k in range(3))
        + ", purity " + "/".join(f"{p:.2f}" for p in purity))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", default="merging,smile,lorahub,ttmm", help="which compositions (base and own always)")
    args = ap.parse_args()
    wanted = set(args.rows.split(","))
    torch.set_num_threads(2)
    rows = []

    def row(label, s, extra, note=""):
        rows.append({"method": label, **s, "extra_params": extra, "note": note})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="peftlab-composition-") as root:
        dirs = train_per_task(root, args.steps)
        base, tok = load_model("smollm2-135m")
        row("base model", scores(base.float(), tok, args.eval), 0)
        own = {}
        for name, d in zip(TASKS, dirs):
            m = peftlab.PeftModel.from_pretrained(load_model("smollm2-135m")[0].float(), d)
            own[name] = scores(m, tok, args.eval)[name]
        one = peftlab.PeftModel.from_pretrained(load_model("smollm2-135m")[0].float(), dirs[0])
        lora_params = sum(p.numel() for n, p in one.named_parameters() if ".adapters.default." in n)   # (frozen)
        row("each task's own LoRA (upper reference)", own, 3 * lora_params, "3 adapters, one per task")
        model = peftlab.PeftModel.from_pretrained(load_model("smollm2-135m")[0].float(), dirs[0], adapter_name="t0")
        for i, d in enumerate(dirs[1:], 1):
            model.load_adapter(d, adapter_name=f"t{i}")
        for kind, options in (TYPES if "merging" in wanted else []):
            torch.manual_seed(0)
            t = time.time()
            model.add_weighted_adapter(["t0", "t1", "t2"], [1.0, 1.0, 1.0], kind, combination_type=kind, **options)
            model.set_adapter(kind)
            extra = sum(p.numel() for n, p in model.named_parameters() if f".adapters.{kind}." in n)
            row(f"add_weighted_adapter {kind}" + (f" (density {options['density']})" if options else ""),
                scores(model, tok, args.eval), extra, f"built in {time.time() - t:.1f} s")
            model.delete_adapter(kind)
        for top_k in ((1, 2) if "smile" in wanted else ()):
            smile = peftlab.get_peft_model(load_model("smollm2-135m")[0].float(),
                                           SmileConfig(adapter_dirs=dirs, top_k=top_k))
            row(f"SMILE (k 8, gate_k 4, top-{top_k})", scores(smile, tok, args.eval),
                smile.get_nb_trainable_parameters()[0])
        hub_scores, weights = {}, {}
        for name in (TASKS if "lorahub" in wanted else ()):
            model.add_adapter("hub", model.peft_config["t0"].replace(init_lora_weights=True))
            shots = encode_causal(get_task(name).train[-5:], tok, max_length=64)   # not among the LoRAs' 160
            batch = Collator(tok.pad_token_id, "left")(shots)
            res = lorahub(model, ["t0", "t1", "t2"], "hub", [batch], budget=40, seed=0)
            weights[name] = [round(w, 3) for w in res.weights]
            hub_scores[name] = scores(model, tok, args.eval)[name]
            model.delete_adapter("hub")
        if "lorahub" in wanted:
            row("LoraHub (5 shots per task, 40 evaluations)", hub_scores, lora_params,
                "weights per task: " + "; ".join(f"{n.replace('wordnet-', '')} {w}" for n, w in weights.items()))
        if "ttmm" in wanted:
            ttmm_rows(row, root, dirs, args.steps, args.eval)
    table(rows, args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def table(rows, args) -> None:
    print(f"Composition: {', '.join(TASKS)}; SmolLM2-135M fp32, per-task LoRA r 8 on all linear layers, {args.steps} "
          f"steps × 8 on 160 examples each; {args.eval} held-out words per task (exact match)\n")
    print("| composition | " + " | ".join(t.replace("wordnet-", "") for t in TASKS) + " | mean | % of own LoRA "
          "| extra parameters | note |")
    print("|---|" + "---|" * (len(TASKS) + 4))
    own = next(r for r in rows if r["method"].startswith("each task"))
    own_mean = sum(own[t] for t in TASKS) / len(TASKS)
    for r in rows:
        mean = sum(r[t] for t in TASKS) / len(TASKS)
        print(f"| {r['method']} | " + " | ".join(f"{100 * r[t]:.0f}%" for t in TASKS)
              + f" | {100 * mean:.1f}% | {100 * mean / own_mean:.0f}% | {r['extra_params']:,} | {r['note']} |")


if __name__ == "__main__":
    main()
