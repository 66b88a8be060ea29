"""The whole fine-tune, end to end: `peftlab train` vs HF PEFT + transformers.Trainer on the same job (issue 19).

Jobs (--jobs, comma-separated):
  causal-lora   SmolLM2-135M, LoRA r=16 α=32 on all linear layers, 640 WordNet antonym prompt/completion pairs as
                JSONL (loss on the completions), 40 steps × batch 8, lr 2e-3, cosine, 2 warmup steps
  causal-dora   the same with DoRA
  demo-lora     the demo's fine-tune: the same LoRA on all 2,468 training pairs, 80 steps × batch 16
  cls-lora      MiniLM-L6, LoRA r=16 α=32 on query/key/value/dense + a trained head, 1,300 WordNet supersense
                {"text","label"} glosses, 60 steps × batch 16, lr 5e-4
Each run is a fresh subprocess (so peak RSS is its own), the two libraries alternating, --reps times. The peftlab
side is `peftlab train` itself (the CLI's main, evaluation and forgetting probe off); the HF side is
AutoModelFor... + peft.get_peft_model + transformers.Trainer with the same encoded examples and collation
(remove_unused_columns=False), the same optimizer settings (AdamW, weight decay 0, clip 1.0) and schedule.
Measured per run: training time (peftlab: the loop's elapsed time; HF: train_runtime), non-padding training
tokens, tokens/s, the process's wall time and peak RSS up to the end of training, time to the first optimizer
step, the loss curve; then (untimed) the loss on 300 held-out records — and accuracy for classification —
computed by one function for both (plain forward, full logits).
Ratios are medians over the reps of peftlab tokens/s ÷ HF tokens/s, taken pairwise (run i of each).
Run: .venv/bin/python benchmarks/end_to_end.py [--reps 3] [--jobs causal-lora,causal-dora,cls-lora] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.time()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

JOBS = {
    "causal-lora": dict(model="smollm2-135m", task="wordnet-antonyms", n=640, steps=40, batch=8, lr=2e-3,
                        dora=False),
    "causal-dora": dict(model="smollm2-135m", task="wordnet-antonyms", n=640, steps=40, batch=8, lr=2e-3,
                        dora=True),
    "demo-lora": dict(model="smollm2-135m", task="wordnet-antonyms", n=2468, steps=80, batch=16, lr=2e-3,
                      dora=False),
    "cls-lora": dict(model="minilm-l6", task="wordnet-supersense", n=1300, steps=60, batch=16, lr=5e-4,
                     dora=False),
}
WARMUP = 2


EVAL_N = 300   # held-out records scored after training (outside the timed part): loss, and accuracy for classification


def write_data(job: str, path: Path) -> None:
    """The job's training records as JSONL (the first n of the built-in task's training split), and beside it
    (path + ".eval") the first EVAL_N records of its held-out split."""
    from peftlab.train.tasks import get_task
    spec = JOBS[job]
    task = get_task(spec["task"])
    keys = ("prompt", "completion") if task.kind == "generation" else ("text", "label")
    for records, target in ((task.train[:spec["n"]], path), (task.eval[:EVAL_N], Path(str(path) + ".eval"))):
        with open(target, "w") as f:
            for rec in records:
                f.write(json.dumps({k: rec[k] for k in keys}) + "\n")


def held_out(model, tok, data: Path, labels) -> dict:
    """Loss (and accuracy) of a trained model on the held-out records, computed the same way for both libraries:
    plain forward, full logits, mean cross-entropy over the label tokens."""
    import torch
    import torch.nn.functional as F
    from peftlab.train import data as D
    records = D.read_jsonl(str(data) + ".eval")
    model.eval()
    if labels is None:
        examples, collate = D.encode_causal(records, tok, 512), D.Collator(tok.pad_token_id, "left")
    else:
        records = [r for r in records if str(r["label"]) in labels]
        examples, collate = D.encode_classification(records, tok, labels, 512), D.Collator(tok.pad_token_id, "right")
    total, count, hits = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            batch = collate(examples[i:i + 32])
            y = batch.pop("labels")
            batch.pop("position_ids", None)
            logits = model(**batch).logits.float()
            if labels is None:
                total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), reduction="sum"))
                count += int((y[:, 1:] != -100).sum())
            else:
                total += float(F.cross_entropy(logits, y, reduction="sum"))
                count += len(y)
                hits += int((logits.argmax(-1) == y).sum())
    out = {"eval_loss": total / count}
    if labels is not None:
        out["eval_accuracy"] = hits / count
    return out


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_peftlab(job: str, data: Path, out: Path, extra: tuple = ()) -> dict:
    from peftlab.cli import main
    from peftlab.train import loop
    spec = JOBS[job]
    marks: dict = {}
    step = loop.optimizer_step

    def timed_step(*a, **kw):  # instrumentation only: when the first optimizer step ends
        lr = step(*a, **kw)
        marks.setdefault("first_step", time.time())
        return lr
    loop.optimizer_step = timed_step
    argv = ["train", "--model", spec["model"], "--data", str(data), "--method", "dora" if spec["dora"] else "lora",
            "--r", "16", "--alpha", "32", "--steps", str(spec["steps"]), "--batch-size", str(spec["batch"]),
            "--lr", str(spec["lr"]), "--schedule", "cosine", "--warmup", str(WARMUP), "--log-every", "1",
            "--save-every", "0", "--no-eval-before", "--no-forgetting", "--no-progress", "--output", str(out)]
    if spec["model"] == "smollm2-135m":
        argv += ["--target-modules", "all-linear"]
    else:
        argv += ["--target-modules", "query,key,value,dense"]
    rc = main(argv + list(extra))
    if rc:
        raise SystemExit(f"peftlab train failed (exit {rc})")
    run = json.loads((out / "run.json").read_text())
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    res = {"train_s": run["train_s"], "tokens": run["train_tokens"], "losses": losses,
           "first_step_s": marks["first_step"] - T_START, "wall_s": time.time() - T_START, "peak_rss": peak_rss()}
    import peftlab
    from peftlab.models import load_model
    from peftlab.train.data import load_labels
    labels = load_labels(out / "adapter")
    base, tok = load_model(spec["model"], task="causal-lm" if labels is None else "seq-cls",
                           num_labels=len(labels) if labels else None)
    res.update(held_out(peftlab.PeftModel.from_pretrained(base, str(out / "adapter")), tok, data, labels))
    return res


def worker_hf(job: str, data: Path, out: Path) -> dict:
    import torch
    import peft
    import transformers
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, Trainer,
                              TrainerCallback, TrainingArguments)
    from peftlab.models import model_path
    from peftlab.train import data as D
    transformers.utils.logging.set_verbosity_error()
    spec = JOBS[job]
    path = model_path(spec["model"])
    tok = AutoTokenizer.from_pretrained(path)
    records = D.read_jsonl(data)
    if spec["model"] == "smollm2-135m":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        examples, collate = D.encode_causal(records, tok, 512), D.Collator(tok.pad_token_id, "left")
        cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                              use_dora=spec["dora"], task_type="CAUSAL_LM")
    else:
        names = D.label_names(records)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names), dtype=torch.float32)
        examples, collate = D.encode_classification(records, tok, names, 512), D.Collator(tok.pad_token_id, "right")
        cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["query", "key", "value", "dense"],
                              lora_dropout=0.0, use_dora=spec["dora"], task_type="SEQ_CLS")
    model = peft.get_peft_model(model, cfg)
    marks: dict = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks["begin"] = time.time()

        def on_step_end(self, args, state, control, **kw):
            marks.setdefault("first_step", time.time())

    args = TrainingArguments(output_dir=str(out), max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
                             learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=WARMUP,
                             weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
                             include_num_input_tokens_seen="non_padding", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[Clock()])
    metrics = trainer.train().metrics
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    res = {"train_s": metrics["train_runtime"], "tokens": int(trainer.state.num_input_tokens_seen),
           "losses": losses, "first_step_s": marks["first_step"] - T_START, "wall_s": time.time() - T_START,
           "peak_rss": peak_rss()}
    res.update(held_out(model, tok, data, None if spec["model"] == "smollm2-135m" else names))
    return res


def run_worker(lib: str, job: str, data: Path, out: Path, peftlab_args: str = "") -> dict:
    """One run in a fresh subprocess; its RESULT line."""
    cmd = [sys.executable, __file__, "--worker", lib, "--job", job, "--data", str(data), "--out", str(out)]
    if lib == "peftlab" and peftlab_args:
        cmd.append(f"--peftlab-args={peftlab_args}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{lib} {job} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarise(job: str, runs: dict) -> dict:
    ours, theirs = runs["peftlab"], runs["hf"]
    tps = {lib: [r["tokens"] / r["train_s"] for r in rs] for lib, rs in runs.items()}
    ratio = [a / b for a, b in zip(tps["peftlab"], tps["hf"])]
    med = lambda lib, key: statistics.median(r[key] for r in runs[lib])  # noqa: E731
    return {"job": job, "tokens_per_s_ratio": statistics.median(ratio), "ratios": ratio,
            "tokens_per_s": {lib: statistics.median(v) for lib, v in tps.items()},
            "train_s": {lib: med(lib, "train_s") for lib in runs}, "wall_s": {lib: med(lib, "wall_s") for lib in runs},
            "first_step_s": {lib: med(lib, "first_step_s") for lib in runs},
            "peak_rss_gb": {lib: med(lib, "peak_rss") / 2**30 for lib in runs},
            "loss_first": {lib: statistics.median(r["losses"][0] for r in runs[lib]) for lib in runs},
            "loss_last5": {lib: statistics.median(sum(r["losses"][-5:]) / 5 for r in runs[lib]) for lib in runs},
            "eval_loss": {lib: statistics.median(r["eval_loss"] for r in runs[lib]) for lib in runs},
            "eval_accuracy": {lib: statistics.median(r.get("eval_accuracy", float("nan")) for r in runs[lib])
                              for lib in runs},
            "tokens": {lib: runs[lib][0]["tokens"] for lib in runs}, "reps": len(ours), "runs": runs,
            "theirs_reps": len(theirs)}


def print_summary(rows: list[dict], file=None) -> None:
    file = file or sys.stdout
    print("\n| job | tokens/s peftlab | tokens/s HF PEFT + Trainer | ratio (median; each rep) | train s | "
          "process wall s | first step at s | peak RSS GB | train loss first → last 5 | held-out loss | held-out acc |",
          file=file)
    print("|---|---|---|---|---|---|---|---|---|---|---|", file=file)
    for r in rows:
        pair = lambda key, fmt: f"{fmt.format(r[key]['peftlab'])} / {fmt.format(r[key]['hf'])}"  # noqa: E731
        each = ", ".join(f"{x:.2f}" for x in r["ratios"])
        print(f"| {r['job']} | {r['tokens_per_s']['peftlab']:.0f} | {r['tokens_per_s']['hf']:.0f} | "
              f"**{r['tokens_per_s_ratio']:.2f}×** ({each}) | {pair('train_s', '{:.1f}')} | "
              f"{pair('wall_s', '{:.1f}')} | {pair('first_step_s', '{:.1f}')} | {pair('peak_rss_gb', '{:.2f}')} | "
              f"{r['loss_first']['peftlab']:.2f} → {r['loss_last5']['peftlab']:.3f} / "
              f"{r['loss_first']['hf']:.2f} → {r['loss_last5']['hf']:.3f} | {pair('eval_loss', '{:.3f}')} | "
              f"{pair('eval_accuracy', '{:.1%}') if r['job'].startswith('cls') else '—'} |", file=file)
    print("(pairs are peftlab / HF; medians over the reps)", file=file)
    file.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["peftlab", "hf"])
    ap.add_argument("--job", choices=list(JOBS))
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--jobs", default="causal-lora,causal-dora,cls-lora")
    ap.add_argument("--libs", default="peftlab,hf")
    ap.add_argument("--json-out", default=None, help="write every run's measurements here")
    ap.add_argument("--md-out", default=None, help="write the environment, the command and the table here")
    ap.add_argument("--peftlab-args", default="", help="extra `peftlab train` flags, e.g. --no-group-by-length "
                    "(to measure what one lever gives)")
    args = ap.parse_args()
    if args.worker:
        import warnings
        warnings.filterwarnings("ignore")
        fn = worker_peftlab if args.worker == "peftlab" else worker_hf
        extra = {"extra": tuple(args.peftlab_args.split())} if args.worker == "peftlab" else {}
        res = fn(args.job, Path(args.data), Path(args.out), **extra)   # wall time and peak RSS: to the end of training
        print("RESULT " + json.dumps(res), flush=True)
        return
    import torch
    import transformers
    import peft
    env = (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
           f"{os.cpu_count()} cpus, {torch.get_num_threads()} threads")
    print(env)
    rows = []
    libs = args.libs.split(",")
    with tempfile.TemporaryDirectory(prefix="peftlab-e2e-") as tmp:
        for job in args.jobs.split(","):
            data = Path(tmp) / f"{job}.jsonl"
            write_data(job, data)
            runs: dict = {lib: [] for lib in libs}
            for rep in range(args.reps):
                order = libs if rep % 2 == 0 else libs[::-1]   # alternate who goes first
                for lib in order:
                    res = run_worker(lib, job, data, Path(tmp) / f"{job}-{lib}-{rep}", args.peftlab_args)
                    runs[lib].append(res)
                    print(f"  {job} rep {rep + 1} {lib}: {res['tokens'] / res['train_s']:.0f} tokens/s, "
                          f"train {res['train_s']:.1f} s, wall {res['wall_s']:.1f} s, "
                          f"peak {res['peak_rss'] / 2**30:.2f} GB, loss {res['losses'][0]:.2f} → "
                          f"{res['losses'][-1]:.3f}, held-out loss {res['eval_loss']:.3f}", flush=True)
            if set(libs) == {"peftlab", "hf"}:
                rows.append(summarise(job, runs))
                print_summary(rows[-1:])
    if rows:
        print("\nAll jobs:")
        print_summary(rows)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    if args.md_out and rows:
        with open(args.md_out, "w") as f:
            f.write(f"# peftlab train vs HF PEFT + transformers.Trainer, end to end\n\n{env}\n\n"
                    f"`python benchmarks/end_to_end.py {' '.join(sys.argv[1:])}`\n\n"
                    + __doc__.split("Run:")[0].strip() + "\n")
            print_summary(rows, f)


if __name__ == "__main__":
    main()
