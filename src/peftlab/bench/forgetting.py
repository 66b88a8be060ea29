"""The forgetting probe a bench cell runs: the job layer's (general-English perplexity and the untrained
definitions task) for language-model heads; for encoders, which have no language-modelling head, the same
untrained task answered by embedding similarity, and how far the general-English embeddings moved.

Both are measured on the base model once and on every trained model, so "before" is always the pretrained base
(not the method's own initialisation: prompt methods start from random virtual tokens).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..train.jobs.evaluate import forgetting_probe


@torch.no_grad()
def sentence_embeddings(model, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled last hidden states, L2-normalised (all-MiniLM's sentence embedding). Prompt methods return
    their virtual positions first (PEFT's shapes), so the last L positions are the input's."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=128,
                            return_tensors="pt").to(dev)
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1][:, -enc["input_ids"].shape[1]:]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out)


def encoder_probe(model, tokenizer, texts: list[str], questions: list[dict], reference: Optional[torch.Tensor]):
    """definitions_acc: a gloss's embedding nearest its verb among the 4 choices (chance 25%); general_drift:
    1 - mean cosine between these and the base model's general-English embeddings (0 = unchanged)."""
    glosses = sentence_embeddings(model, tokenizer, [q["prompt"] for q in questions])
    choices = sentence_embeddings(model, tokenizer, [c.strip() for q in questions for c in q["choices"]])
    sims = (glosses.unsqueeze(1) * choices.view(len(questions), -1, glosses.shape[-1])).sum(-1)
    acc = float((sims.argmax(-1) == torch.tensor([q["answer"] for q in questions])).float().mean())
    general = sentence_embeddings(model, tokenizer, texts)
    drift = 0.0 if reference is None else float(1 - (general * reference).sum(-1).mean())
    return {"definitions_acc": acc, "general_drift": drift, "definitions_n": len(questions)}, general


class Probe:
    """probe(model) -> the forgetting metrics of the model's kind (`headline` names the one the table shows)."""

    def __init__(self, data, tok, job_config, size: int):
        self.lm: Optional[Callable] = forgetting_probe(data, tok, job_config, size)
        self.tok = tok
        self.reference: Optional[torch.Tensor] = None
        if self.lm is None:
            from ..train.tasks import forgetting_inputs
            self.texts, self.questions = forgetting_inputs(n_questions=size)

    @property
    def headline(self) -> str:
        """The one forgetting number the table and plots show (relative change, in %)."""
        return "general_ppl" if self.lm is not None else "general_drift"

    def __call__(self, model) -> dict:
        if self.lm is not None:
            return self.lm(model)
        metrics, general = encoder_probe(model, self.tok, self.texts, self.questions, self.reference)
        if self.reference is None:
            self.reference = general  # the first model probed is the base
        return metrics
