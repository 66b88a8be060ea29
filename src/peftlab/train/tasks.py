"""Built-in tasks from WordNet, with fixed seeds and splits: what `--task NAME` means.

  wordnet-antonyms     generation: 'Q: What is the antonym of "X"?\\nA:' -> " Y"; exact match against every
                       antonym of X on the same side; split by connected groups of pairs, so no pair (and no
                       prompt word) appears in two splits.
  wordnet-supersense   classification: a noun's gloss -> its lexicographer category (26 classes, noun.animal,
                       ...); accuracy and macro-F1; at most 300 training glosses per category.
  wordnet-hypernyms    generation: 'Q: What is "X" a kind of?\\nA:' -> a one-word hypernym of a sense of the noun X;
                       exact match against all of them; one record per word, split at random by word.
  wordnet-noun-category  generation: 'Q: What kind of thing is "X"?\\nA:' -> the lexicographer category of a noun
                       whose senses all share one (animal, artifact, ...; 25 classes); exact match.
  wordnet-definitions  multiple choice: 'Q: Which word means "<verb gloss>"?\\nA:' with 4 one-word verbs;
                       accuracy (chance 25%). Trained by no other task (antonyms are adjectives, supersense
                       uses noun glosses): the untrained task of the forgetting probe.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Optional

from . import wordnet

TASKS = ("wordnet-antonyms", "wordnet-supersense", "wordnet-definitions", "wordnet-hypernyms",
         "wordnet-noun-category")
DEFINITION_PROMPT = 'Q: Which word means "{gloss}"?\nA:'


@dataclass
class Task:
    name: str
    kind: str                    # "generation", "classification" or "multiple-choice"
    description: str
    train: list[dict]
    eval: list[dict]
    test: list[dict]
    labels: Optional[list[str]] = None       # classification label names; index = class id
    metrics: tuple[str, ...] = ()
    max_new_tokens: int = 6                  # generation tasks: answers are short
    few_shot_pool: list[dict] = field(default_factory=list)

    def few_shot(self, k: int, seed: int = 0) -> list[dict]:
        """k fixed training examples for few-shot prompting (never from eval/test)."""
        pool = self.few_shot_pool or self.train
        return random.Random(seed).sample(pool, k) if k else []

    def split(self, name: str) -> list[dict]:
        if name not in ("train", "eval", "test"):
            raise ValueError(f"unknown split {name!r}; expected train, eval or test")
        return getattr(self, name)


def list_tasks() -> list[str]:
    return list(TASKS)


def get_task(name: str, seed: int = 0) -> Task:
    """A built-in task by name; the splits depend only on `seed` (and the WordNet version installed)."""
    key = name.strip().lower()
    if key not in TASKS:
        import difflib
        near = difflib.get_close_matches(key, TASKS, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown task {name!r}.{hint} Built-in tasks: {', '.join(TASKS)}; or pass your own "
                         f"JSONL with --data")
    return _build(key, seed)


@functools.lru_cache(maxsize=None)
def _build(name: str, seed: int) -> Task:
    wordnet.ensure_wordnet()
    if name == "wordnet-antonyms":
        s = wordnet.split_pairs(wordnet.antonym_pairs(), seed=seed)
        return Task(name, "generation", "adjective antonyms, exact match on held-out pairs", s["train"], s["eval"],
                    s["test"], metrics=("exact_match",), max_new_tokens=6,
                    # one-token, single-answer pairs make clean few-shot demonstrations
                    few_shot_pool=[r for r in s["train"] if len(r["answers"]) == 1 and " " not in r["completion"][1:]])
    if name == "wordnet-supersense":
        s = wordnet.split_supersense(seed=seed, n_eval=1000, n_test=2000, max_train_per_label=300)
        return Task(name, "classification", "noun gloss -> lexicographer category (26 classes)", s["train"],
                    s["eval"], s["test"], labels=sorted(wordnet.NOUN_SUPERSENSES), metrics=("accuracy", "macro_f1"))
    if name in ("wordnet-hypernyms", "wordnet-noun-category"):
        hyper = name == "wordnet-hypernyms"
        s = wordnet.split_records(wordnet.hypernym_records() if hyper else wordnet.noun_category_records(), seed,
                                  n_eval=200, n_test=400, max_train=3000)
        return Task(name, "generation", "noun -> a one-word hypernym, exact match on held-out words" if hyper else
                    "noun -> its WordNet category (25), exact match on held-out words", s["train"], s["eval"],
                    s["test"], metrics=("exact_match",), max_new_tokens=6)
    if name == "wordnet-definitions":
        records = definition_questions(seed)
        return Task(name, "multiple-choice", "verb gloss -> the verb, 4 choices (chance 25%)", records[600:],
                    records[:200], records[200:600], metrics=("accuracy",))
    raise AssertionError(name)


def definition_questions(seed: int = 0) -> list[dict]:
    """Multiple-choice questions from verb synsets whose first word is one word; 3 distractors from other synsets."""
    synsets = [s for s in wordnet.load_synsets("v") if s.gloss and " " not in s.words[0] and "-" not in s.words[0]
               and len(s.gloss.split()) >= 3]
    rng = random.Random(f"definitions-{seed}")
    rng.shuffle(synsets)
    vocab = sorted({s.words[0] for s in synsets})
    out, seen = [], set()
    for s in synsets:
        word = s.words[0]
        if word in seen:  # one question per word: a word's other senses would leak its answer across splits
            continue
        seen.add(word)
        own = {w.lower() for w in s.words}
        distractors = []
        while len(distractors) < 3:
            d = rng.choice(vocab)
            if d.lower() not in own and d not in distractors:
                distractors.append(d)
        answer = rng.randrange(4)
        choices = distractors[:answer] + [word] + distractors[answer:]
        out.append({"prompt": DEFINITION_PROMPT.format(gloss=s.gloss), "choices": [" " + c for c in choices],
                    "answer": answer, "completion": " " + word})
    return out


def general_english_passages(n: int = 24, per: int = 8, seed: int = 1234) -> list[str]:
    """n passages of `per` WordNet example sentences each, for the perplexity probe. Single fragments are too
    short for a meaningful perplexity (the first words of a fragment carry no context)."""
    sents = wordnet.general_english_text(n * per, seed=seed)
    return [" ".join(s[0].upper() + s[1:] + ("" if s[-1] in ".!?" else ".") for s in sents[i:i + per])
            for i in range(0, n * per, per)]


def knowledge_texts(n_passages: int = 32, per: int = 8, seed: int = 0) -> list[str]:
    """General English passages for calibrating knowledge-preserving methods (CorDA KPM). Drawn from the end of
    the same shuffle whose start the forgetting probe reads, so the probe never scores text the method saw."""
    sents = wordnet.general_english_text(seed=1234 + seed)[-n_passages * per:]
    return [" ".join(sents[i:i + per]) for i in range(0, len(sents), per)]


def forgetting_inputs(n_passages: int = 24, n_questions: int = 100, seed: int = 0) -> tuple[list[str], list[dict]]:
    """What the forgetting probe measures a model on: general English passages and untrained definition questions."""
    return general_english_passages(n_passages, seed=1234 + seed), get_task("wordnet-definitions", seed).test[:n_questions]
