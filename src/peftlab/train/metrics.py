"""Metrics and the model-running evaluators: exact match, accuracy, macro-F1, perplexity, multiple choice, forgetting.

Generation is greedy and batched with left padding (answers are a few tokens, so a small max_new_tokens);
a generated answer is its first line, stripped, compared case-insensitively with every accepted answer.
"""
from __future__ import annotations

import copy
import math
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .data import Collator, chat_prompt


# -- plain metrics ---------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    line = text.strip().split("\n", 1)[0]
    return re.sub(r"[\s.,;:!?\"']+$", "", line.strip()).strip().strip('"').lower()


def exact_match(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal (after normalize_answer) to one of their accepted answers."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists")
    hits = sum(normalize_answer(p) in {normalize_answer(a) for a in ans} for p, ans in zip(predictions, answers))
    return hits / max(len(predictions), 1)


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return sum(int(p == g) for p, g in zip(pred, gold)) / max(len(gold), 1)


def macro_f1(pred: Sequence[int], gold: Sequence[int], num_labels: Optional[int] = None) -> float:
    """Mean F1 over the classes present in gold or predictions (a class never seen nor predicted is skipped)."""
    classes = sorted(set(gold) | set(pred)) if num_labels is None else [c for c in range(num_labels)
                                                                         if c in set(gold) | set(pred)]
    f1s = []
    for c in classes:
        tp = sum(1 for p, g in zip(pred, gold) if p == c and g == c)
        fp = sum(1 for p, g in zip(pred, gold) if p == c and g != c)
        fn = sum(1 for p, g in zip(pred, gold) if p != c and g == c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / max(len(f1s), 1)


# -- evaluators that run the model -----------------------------------------------------------------------------
def _device(model) -> torch.device:
    return next(model.parameters()).device


def forward_accepts(model, name: str) -> bool:
    """Whether the Transformers model's forward (under a PeftModel: its base's) takes the keyword `name`."""
    import inspect
    from ..core.model import PeftModel
    hf = model.get_base_model() if isinstance(model, PeftModel) else model
    try:
        return name in inspect.signature(hf.forward).parameters
    except (TypeError, ValueError):
        return False


def _input_positions(logits: torch.Tensor, length: int) -> torch.Tensor:
    """The logits of the last `length` positions (batch, length, V): prompt methods also return their virtual
    positions, first (HF PEFT's shape), so the positions of the inputs are always the last ones."""
    return logits[:, logits.shape[1] - length:] if logits.shape[1] > length else logits


def _eval_mode(model):
    was = model.training
    model.eval()
    return was


def _cache_ok(model) -> bool:
    """Reusing a KV cache across calls needs a plain forward: not prompt methods, which rewrite every input."""
    from ..core.model import PeftModel
    if isinstance(model, PeftModel) and model.rewrites_inputs:
        return False
    return forward_accepts(model, "past_key_values")


@torch.no_grad()
def _prefix_cache(model, ids: list[int], dev):
    return model(input_ids=torch.tensor([ids], device=dev), use_cache=True).past_key_values


def _first_line_done(tokenizer, start: int):
    """A stopping criterion for generate(): a row is done once its answer's first line is complete, i.e. its text
    so far, leading whitespace dropped, holds a newline (normalize_answer reads exactly that line)."""
    from transformers import StoppingCriteria

    class FirstLineDone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
            return torch.tensor(["\n" in t.lstrip() for t in texts], device=input_ids.device)
    return FirstLineDone()


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 6, batch_size: int = 64,
                     chat_template: bool = False, prefix: str = "", first_line: bool = False) -> list[str]:
    """Greedy continuations of prefix + each prompt (decoded, special tokens dropped).

    A shared prefix (few-shot demonstrations) is run through the model once: its KV cache is copied for every
    batch, so the cost is the prompts' own tokens. Prefix and prompt are tokenised separately in every path, so
    the tokens are the same with and without the cache. first_line: only the first line of each answer is
    wanted (leading whitespace dropped), so a row stops once that line has ended, and the batch when every row
    has; that line is what it would have been."""
    was = _eval_mode(model)
    dev, out = _device(model), []
    eos = tokenizer.eos_token_id
    pre = tokenizer(prefix)["input_ids"] if prefix else []
    cache = _prefix_cache(model, pre, dev) if pre and not chat_template and _cache_ok(model) else None
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            if chat_template:
                enc = [tokenizer(chat_prompt(tokenizer, prefix + p), add_special_tokens=False)["input_ids"]
                       for p in chunk]
            elif pre:
                enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
            else:
                enc = [tokenizer(p)["input_ids"] for p in chunk]
            batch = Collator(tokenizer.pad_token_id, "left", position_ids=False)(
                [{"input_ids": e, "labels": 0} for e in enc])
            ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
            kw = {}
            if pre and not chat_template:
                # [prefix][left padding][prompt]: the padding is masked and positions follow the mask
                ids = torch.cat([torch.tensor([pre], device=dev).expand(len(chunk), -1), ids], 1)
                mask = torch.cat([torch.ones(len(chunk), len(pre), dtype=mask.dtype, device=dev), mask], 1)
                if cache is not None:
                    kw["past_key_values"] = copy.deepcopy(cache)
                    kw["past_key_values"].reorder_cache(torch.zeros(len(chunk), dtype=torch.long, device=dev))
            if first_line:
                from transformers import StoppingCriteriaList
                kw["stopping_criteria"] = StoppingCriteriaList([_first_line_done(tokenizer, ids.shape[1])])
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **kw)
            out.extend(tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was)
    return out


def eval_generation(model, tokenizer, records: Sequence[dict], few_shot: Sequence[dict] = (),
                    max_new_tokens: int = 6, batch_size: int = 64, chat_template: bool = False) -> dict:
    """Exact match of greedy answers; records carry "prompt" and "answers" (or "completion")."""
    prefix = "".join(f"{r['prompt']}{r['completion']}\n\n" for r in few_shot)
    preds = generate_answers(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, batch_size,
                             chat_template, prefix=prefix, first_line=True)   # exact match reads the first line
    answers = [r.get("answers") or [r["completion"]] for r in records]
    return {"exact_match": exact_match(preds, answers), "n": len(records), "predictions": preds}


@torch.no_grad()
def sequence_logprobs(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32) -> list[tuple[float, int]]:
    """(sum of log p(continuation | context), number of continuation tokens) for each (context, continuation).

    Pairs that share a context (a multiple-choice question and its choices) run the context once and score
    the continuations on copies of its KV cache."""
    contexts = {ctx for ctx, _ in pairs}
    if len(contexts) < len(pairs) and all(tokenizer(c)["input_ids"] for c in contexts) and _cache_ok(model):
        return _shared_context_logprobs(model, tokenizer, pairs, batch_size)
    was = _eval_mode(model)
    dev, out = _device(model), []
    try:
        for i in range(0, len(pairs), batch_size):
            ex = []
            for ctx, cont in pairs[i:i + batch_size]:
                c = tokenizer(ctx)["input_ids"]
                k = tokenizer(cont, add_special_tokens=False)["input_ids"]
                ex.append({"input_ids": c + k, "labels": [-100] * len(c) + k})
            batch = {k: v.to(dev) for k, v in Collator(tokenizer.pad_token_id, "left")(ex).items()}
            labels = batch.pop("labels")
            if forward_accepts(model, "logits_to_keep"):
                # left padding puts every continuation at the end: only those positions need the LM head
                first = int((labels != -100).any(0).nonzero()[0]) if (labels != -100).any() else 0
                if first >= 1:
                    batch["logits_to_keep"] = labels.shape[1] - first + 1
                    labels = labels[:, first - 1:]
            if not forward_accepts(model, "position_ids"):
                batch.pop("position_ids")
            logits = _input_positions(model(**batch).logits.float(), labels.shape[1])
            lp = torch.log_softmax(logits[:, :-1], -1)
            tgt = labels[:, 1:]
            tok_lp = lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (tgt != -100)
            out.extend(zip(tok_lp.sum(-1).tolist(), (tgt != -100).sum(-1).tolist()))
    finally:
        model.train(was)
    return out


@torch.no_grad()
def _shared_context_logprobs(model, tokenizer, pairs, batch_size: int) -> list[tuple[float, int]]:
    was = _eval_mode(model)
    dev = _device(model)
    groups: dict[str, list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(ctx, []).append(i)
    out: list = [None] * len(pairs)
    ctxs = list(groups)
    step = max(1, batch_size // max(len(v) for v in groups.values()))  # contexts per batch
    try:
        for i in range(0, len(ctxs), step):
            chunk = ctxs[i:i + step]
            enc = [{"input_ids": tokenizer(c)["input_ids"], "labels": 0} for c in chunk]
            b = Collator(tokenizer.pad_token_id, "left", position_ids=False)(enc)
            ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            last = torch.log_softmax(res.logits[:, -1].float(), -1)                 # (C, V): predicts token 1
            rows = [(j, k) for j, c in enumerate(chunk) for k in groups[c]]
            owner = torch.tensor([j for j, _ in rows], device=dev)
            cache = res.past_key_values
            cache.reorder_cache(owner)                                               # one copy per continuation
            conts = [tokenizer(pairs[k][1], add_special_tokens=False)["input_ids"] for _, k in rows]
            n = max(len(c) for c in conts)
            cid = torch.full((len(rows), n), tokenizer.pad_token_id, dtype=torch.long, device=dev)
            cmask = torch.zeros_like(cid)
            for r, c in enumerate(conts):
                cid[r, :len(c)] = torch.tensor(c, device=dev)
                cmask[r, :len(c)] = 1                                                # right padding: causal, harmless
            cpos = mask.sum(-1)[owner].unsqueeze(1) + torch.arange(n, device=dev)
            logp = torch.log_softmax(model(input_ids=cid, attention_mask=torch.cat([mask[owner], cmask], 1),
                                           position_ids=cpos, past_key_values=cache).logits.float(), -1)
            for r, (j, k) in enumerate(rows):
                c = conts[r]
                total = float(last[j, c[0]]) + sum(float(logp[r, t - 1, c[t]]) for t in range(1, len(c)))
                out[k] = (total, len(c))
    finally:
        model.train(was)
    return out


def eval_multiple_choice(model, tokenizer, records: Sequence[dict], batch_size: int = 32) -> dict:
    """Accuracy picking the choice with the highest mean per-token log-probability after the prompt.

    records: {"prompt": str, "choices": [str, ...], "answer": index}."""
    pairs = [(r["prompt"], c) for r in records for c in r["choices"]]
    scores = sequence_logprobs(model, tokenizer, pairs, batch_size)
    hits, k = 0, 0
    for r in records:
        s = scores[k:k + len(r["choices"])]
        k += len(r["choices"])
        best = max(range(len(s)), key=lambda j: s[j][0] / max(s[j][1], 1))
        hits += int(best == r["answer"])
    return {"accuracy": hits / max(len(records), 1), "n": len(records)}


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 32) -> float:
    """Token-level perplexity: exp(total NLL / number of predicted tokens) over all texts.

    The context is "" — the tokenizer's BOS where it adds one (then every token is scored), else nothing
    (then the first token, which has nothing to be predicted from, is not scored)."""
    scores = sequence_logprobs(model, tokenizer, [("", t) for t in texts], batch_size)
    nll = -sum(s for s, _ in scores)
    n = sum(k for _, k in scores)
    return math.exp(nll / max(n, 1))


@torch.no_grad()
def eval_classification(model, tokenizer, examples: Sequence[dict], num_labels: int, batch_size: int = 32) -> dict:
    """Accuracy and macro-F1 of a sequence-classification model on encoded examples ({"input_ids", "labels"})."""
    was = _eval_mode(model)
    dev, preds, gold = _device(model), [], []
    try:
        collate = Collator(tokenizer.pad_token_id, "right")
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size])
            gold.extend(batch.pop("labels").tolist())
            logits = model(**{k: v.to(dev) for k, v in batch.items()}).logits
            preds.extend(logits.argmax(-1).tolist())
    finally:
        model.train(was)
    return {"accuracy": accuracy(preds, gold), "macro_f1": macro_f1(preds, gold, num_labels), "n": len(gold),
            "predictions": preds}


@torch.no_grad()
def eval_loss(model, examples: Sequence[dict], collate, batch_size: int = 16) -> float:
    """Mean loss over labelled positions (causal) or rows (classification), weighted by their count."""
    from ..core.model import PeftModel
    from .label_loss import gathered_loss, head_of
    was = _eval_mode(model)
    dev, total, count = _device(model), 0.0, 0
    hf = model.get_base_model() if isinstance(model, PeftModel) else model
    head = head_of(hf)
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(dev) for k, v in collate(examples[i:i + batch_size]).items()}
            if not forward_accepts(model, "position_ids"):
                batch.pop("position_ids", None)
            labels = batch["labels"]
            if labels.dim() == 2 and head is not None:  # the LM head only where there are labels (label_loss.py)
                with gathered_loss(hf, head):
                    n = int((labels[:, 1:] != -100).sum())
                    total += float(model(**batch).loss) * n if n else 0.0
                count += n
                continue
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            if labels.dim() == 2:  # causal: position t predicts token t+1
                logits = _input_positions(logits, labels.shape[1])
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
                n = int((labels[:, 1:] != -100).sum())
            else:
                loss, n = F.cross_entropy(logits, labels, reduction="sum"), labels.numel()
            total += float(loss)
            count += n
    finally:
        model.train(was)
    return total / max(count, 1)


# -- forgetting ------------------------------------------------------------------------------------------------
def forgetting_probe(model, tokenizer, texts: Sequence[str], probe_records: Sequence[dict] = (),
                     probe_name: str = "probe", batch_size: int = 32) -> dict:
    """What a run did not train: perplexity on general English and accuracy on an untrained multiple-choice task."""
    out = {"general_ppl": perplexity(model, tokenizer, texts, batch_size), "general_n": len(texts)}
    if probe_records:
        r = eval_multiple_choice(model, tokenizer, probe_records, batch_size)
        out.update({f"{probe_name}_acc": r["accuracy"], f"{probe_name}_n": r["n"]})
    return out


def forgetting_change(before: dict, after: dict) -> dict:
    """before/after/change for every numeric probe metric (change = after - before; relative for perplexity)."""
    out = {}
    for k, b in before.items():
        if k.endswith("_n") or k not in after or not isinstance(b, (int, float)):
            continue
        a = after[k]
        out[k] = {"before": b, "after": a, "change": a - b}
        if k.endswith("ppl"):
            out[k]["relative_change"] = (a - b) / b
    return out
