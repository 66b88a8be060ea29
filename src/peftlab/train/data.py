"""Training data: the user's JSONL, tokenisation (loss on completions only), chat templates, collators, label names.

Three record formats, one per file (docs/DESIGN.md, "The command line"):
  {"prompt": str, "completion": str}   causal LM; the loss is on the completion (and the EOS that ends it)
  {"text": str}                        causal LM; the loss is on every token
  {"text": str, "label": str|int}      classification; the label names are saved beside the adapter (labels.json)
Extra keys are kept on the record (e.g. "answers": every accepted completion, used by exact-match scoring;
"expert": the index of the record's task, which a TT-LoRA MoE router is trained to predict, batched as task_ids).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ..core.io import atomic_write_text

FORMATS = {"prompt-completion": ("prompt", "completion"), "text": ("text",), "classification": ("text", "label")}
LABELS_FILE = "labels.json"


class DataError(ValueError):
    """A problem with a data file; the message names the file and the line."""


def _format_of(record: dict) -> Optional[str]:
    keys = set(record)
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


class Records(list):
    """Records read from a file: a list, plus where each came from (for error messages)."""
    path: Optional[Path] = None
    lines: list[int] = []

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}" if self.path is not None and i < len(self.lines) else f"record {i + 1}"


def where(records: Sequence[dict], i: int) -> str:
    return records.where(i) if isinstance(records, Records) else f"record {i + 1}"


def read_jsonl(path: str | os.PathLike) -> Records:
    """Read one JSONL file of a single format; every problem is reported as `file:line: what is wrong`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (expected JSONL: one JSON object per line)")
    records, fmt, first_line = Records(), None, 0
    records.path, records.lines = path, []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}): {line.strip()[:80]!r}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object like {{\"prompt\": ..., \"completion\": ...}}, "
                                f"got {type(rec).__name__}")
            this = _format_of(rec)
            if this is None:
                raise DataError(f"{where}: the object has keys {sorted(rec)}; expected {{\"prompt\", \"completion\"}}, "
                                f"{{\"text\"}} or {{\"text\", \"label\"}}")
            for key in FORMATS[this]:
                ok = isinstance(rec[key], str) or (key == "label" and isinstance(rec[key], int)
                                                   and not isinstance(rec[key], bool))
                if not ok:
                    want = "a string or an integer" if key == "label" else "a string"
                    raise DataError(f"{where}: {key!r} must be {want}, got {type(rec[key]).__name__}")
            if this != "classification" and not "".join(rec[k] for k in FORMATS[this]).strip():
                raise DataError(f"{where}: the record is empty")
            if fmt is None:
                fmt, first_line = this, n
            elif this != fmt:
                raise DataError(f"{where}: this line is {this!r} data but line {first_line} was {fmt!r}; "
                                f"one file holds one format")
            records.append(rec)
            records.lines.append(n)
    if not records:
        raise DataError(f"{path}: the file has no records")
    return records


def data_format(records: Sequence[dict], where: str = "data") -> str:
    fmts = {_format_of(r) for r in records}
    if len(fmts) != 1 or None in fmts:
        raise DataError(f"{where}: records must all be one format ({', '.join(FORMATS)}), found {sorted(map(str, fmts))}")
    return fmts.pop()


# -- label names -----------------------------------------------------------------------------------------------
def label_names(records: Sequence[dict]) -> list[str]:
    """Sorted label names (integers sort numerically); the index in this list is the class id."""
    labels = {r["label"] for r in records}
    if len(labels) < 2:
        raise DataError(f"classification data needs at least 2 distinct labels, found {sorted(map(str, labels))}")
    return [str(x) for x in sorted(labels, key=lambda v: (isinstance(v, str), v))]


def save_labels(directory: str | os.PathLike, names: Sequence[str]) -> None:
    atomic_write_text(Path(directory) / LABELS_FILE, json.dumps({"labels": list(names)}, indent=2) + "\n")


def load_labels(directory: str | os.PathLike) -> Optional[list[str]]:
    path = Path(directory) / LABELS_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("labels"), list):
        raise DataError(f"{path}: expected {{\"labels\": [names...]}}")
    return [str(x) for x in data["labels"]]


# -- tokenisation ----------------------------------------------------------------------------------------------
def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as a user turn of the model's chat template, ending where the assistant's answer starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=True, but this tokenizer has no chat template; use plain prompts")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def _chat_completion(tokenizer, prompt: str, completion: str) -> str:
    # Render the whole conversation and cut off the prompt: the completion then carries the template's own
    # end-of-turn text (e.g. "<|im_end|>\n"), whatever the template is.
    head = chat_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": completion.strip()}], tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template renders the prompt differently with and without an answer; "
                         "use chat_template=False")
    return full[len(head):]


def encode_causal(records: Sequence[dict], tokenizer, max_length: int = 512, chat_template: bool = False) -> list[dict]:
    """Tokenise causal-LM records: {"input_ids", "labels"} lists, labels -100 on the prompt.

    Prompt and completion are tokenised separately and concatenated, so the loss boundary is exact and the
    prompt tokens match what evaluation feeds to generate(). Over-long examples lose prompt tokens from the
    left (the completion is what is learnt); an example whose completion alone is too long is an error.
    """
    eos = tokenizer.eos_token_id
    out = []
    for i, rec in enumerate(records):
        if "prompt" in rec:
            if chat_template:
                p_text, c_text = chat_prompt(tokenizer, rec["prompt"]), _chat_completion(tokenizer, rec["prompt"],
                                                                                         rec["completion"])
                p = tokenizer(p_text, add_special_tokens=False)["input_ids"]
                c = tokenizer(c_text, add_special_tokens=False)["input_ids"]
            else:
                p = tokenizer(rec["prompt"])["input_ids"]
                c = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            if len(c) >= max_length:
                raise DataError(f"{where(records, i)}: the completion is {len(c)} tokens, more than max_length={max_length}")
            p = p[max(0, len(p) + len(c) - max_length):]
            out.append({"input_ids": p + c, "labels": [-100] * len(p) + c, **_expert(records, i)})
        else:
            ids = tokenizer(rec["text"])["input_ids"] + ([eos] if eos is not None else [])
            ids = ids[:max_length]
            out.append({"input_ids": ids, "labels": list(ids), **_expert(records, i)})
    return out


def _expert(records: Sequence[dict], i: int) -> dict:
    """{"task_id": n} for a record with an "expert" key (the task label a TT-LoRA MoE router learns), else {}."""
    if "expert" not in records[i]:
        return {}
    e = records[i]["expert"]
    if not isinstance(e, int) or isinstance(e, bool) or e < 0:
        raise DataError(f"{where(records, i)}: \"expert\" must be the index (0, 1, ...) of the record's task "
                        f"expert, got {e!r}")
    return {"task_id": e}


def encode_classification(records: Sequence[dict], tokenizer, names: Sequence[str], max_length: int = 512) -> list[dict]:
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, rec in enumerate(records):
        label = str(rec["label"])
        if label not in index:
            raise DataError(f"{where(records, i)}: label {label!r} is not one of the {len(names)} training labels "
                            f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
        ids = tokenizer(rec["text"], truncation=True, max_length=max_length)["input_ids"]
        out.append({"input_ids": ids, "labels": index[label], **_expert(records, i)})
    return out


# -- batching --------------------------------------------------------------------------------------------------
@dataclass
class Collator:
    """Pads a list of encoded examples into tensors.

    Causal batches are padded on the left, so every row's completion ends at the last position: generation
    and `logits_to_keep` (only the tail positions that carry labels need logits) both rely on it. Position
    ids follow the attention mask, so models with absolute positions see the same positions as unpadded.
    Classification batches are padded on the right with one integer label per row.
    """
    pad_token_id: int
    padding_side: str = "left"
    position_ids: bool = True

    def __call__(self, examples: Sequence[dict]) -> dict:
        n = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), n), dtype=torch.long)
        seq_labels = isinstance(examples[0]["labels"], list)
        labels = torch.full((len(examples), n), -100, dtype=torch.long) if seq_labels else None
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            sl = slice(n - k, n) if self.padding_side == "left" else slice(0, k)
            ids[i, sl] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[i, sl] = 1
            if seq_labels:
                labels[i, sl] = torch.tensor(e["labels"], dtype=torch.long)
                # A sequence's first token has nothing before it to be predicted from; left of it is padding
                # (or nothing), so it must never be a target.
                labels[i, sl.start] = -100
        batch = {"input_ids": ids, "attention_mask": mask}
        batch["labels"] = labels if seq_labels else torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        if self.position_ids and seq_labels:
            batch["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        if "task_id" in examples[0]:  # records' "expert" labels: TT-LoRA MoE's router consumes them
            batch["task_ids"] = torch.tensor([e["task_id"] for e in examples], dtype=torch.long)
        return batch


def sample_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a fixed function of (seed, epoch), so a resumed run sees the same data."""
    order = list(range(n))
    random.Random(f"peftlab-{seed}-{epoch}").shuffle(order)
    return order


MEGA_BATCH = 50   # batches whose examples are sorted by length together (HF Trainer's group_by_length uses 50 too)


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, offset: int = 0) -> list[int]:
    """An epoch's order in which each batch holds examples of similar length (less padding), still random:
    the epoch's shuffled order is cut into mega-batches of MEGA_BATCH batches, each sorted by length and cut
    into batches, and the batches of a mega-batch are shuffled. `offset` examples at the start complete the
    previous epoch's last batch (when the epoch length is not a multiple of batch_size) and are left as drawn.
    A fixed function of its arguments, so a resumed run sees the same batches."""
    order = sample_order(len(lengths), seed, epoch)
    rng = random.Random(f"peftlab-groups-{seed}-{epoch}")
    out, span = order[:offset], batch_size * MEGA_BATCH
    for s in range(offset, len(order), span):
        mega = sorted(order[s:s + span], key=lambda i: lengths[i])
        groups = [mega[j:j + batch_size] for j in range(0, len(mega), batch_size)]
        # a short last batch of the epoch stays last (it is completed by the next epoch's first examples)
        full = groups if len(groups[-1]) == batch_size else groups[:-1]
        rng.shuffle(full)
        out.extend(i for g in full + groups[len(full):] for i in g)
    return out


AUTO_GROUP_PADDING = 0.25   # group_by_length=None groups batches when random ones would be this much padding


def padding_fraction(lengths: Sequence[int], batch_size: int, seed: int) -> float:
    """The share of padding in the batches of one epoch in random order (sample_order)."""
    order = sample_order(len(lengths), seed, 0)
    slots = real = 0
    for s in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[s:s + batch_size]]
        slots, real = slots + max(batch) * len(batch), real + sum(batch)
    return 1 - real / max(slots, 1)


class BatchStream:
    """Micro-batches in a deterministic order; `position` (micro-batches consumed) is the whole resume state.
    group_by_length: batches of similar-length examples (length_grouped_order), which pads less; None (auto):
    only when random batches would be at least AUTO_GROUP_PADDING padding. Grouping makes the batches less random
    (on the demo's antonym prompts, ~10% padding, it cost a few points of exact match), so it is kept for data
    whose lengths vary enough for padding to dominate."""

    def __init__(self, examples: Sequence[dict], batch_size: int, collate, seed: int = 0, position: int = 0,
                 group_by_length: Optional[bool] = None):
        if not examples:
            raise DataError("no training examples")
        self.examples, self.batch_size, self.collate, self.seed = examples, batch_size, collate, seed
        self.position = position
        lengths = [len(e["input_ids"]) for e in examples]
        if group_by_length is None:
            group_by_length = batch_size > 1 and padding_fraction(lengths, batch_size, seed) >= AUTO_GROUP_PADDING
        self.grouped = bool(group_by_length)
        self.lengths = lengths if self.grouped else None
        self._orders: dict[int, list[int]] = {}

    def _index(self, i: int) -> int:
        n = len(self.examples)
        epoch = i // n
        if epoch not in self._orders:
            if self.lengths is None:
                order = sample_order(n, self.seed, epoch)
            else:  # batches run on from the previous epoch when n is not a multiple of the batch size
                offset = (-epoch * n) % self.batch_size
                order = length_grouped_order(self.lengths, self.batch_size, self.seed, epoch, min(offset, n))
            self._orders = {epoch: order}
        return self._orders[epoch][i % n]

    @property
    def epoch(self) -> float:
        return self.position * self.batch_size / len(self.examples)

    def next(self, rank: int = 0, world: int = 1) -> dict:
        """The next micro-batch; with `world` processes, this process's share (rows rank, rank + world, ...)."""
        start = self.position * self.batch_size
        batch = self.collate([self.examples[self._index(i)] for i in range(start + rank, start + self.batch_size, world)])
        self.position += 1
        return batch


def batches(examples: Sequence[dict], batch_size: int, collate) -> Iterable[dict]:
    """Plain in-order batches (evaluation)."""
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size])
