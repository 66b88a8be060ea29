"""The conformance matrix: every registered method runs through the same checks on a tiny LLaMA.

A method joins by registering itself. Its config is built from the registry with the method's own defaults
and declarations: a method that takes the run's length (`MethodInfo.run_length_field`) gets a short one, and a
method that looks at data first (`config.calibration_data`) is prepared on a few token batches. SMALL_MODEL
below holds the settings a 32-dim toy model needs where a method's defaults are sized for real models.
"""
from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch

import peftlab
from conftest import perturb_trainable, tiny_llama, token_batch

ALL = sorted(m.name for m in peftlab.list_methods())


# removed when the test session ends (its finaliser runs at interpreter exit)
_CORDA_CACHES = tempfile.TemporaryDirectory(prefix="peftlab-corda-")


def _corda_cached():
    # A cache file, so a saved adapter can be loaded onto a fresh base without the calibration data.
    from peftlab.methods.lora import CordaConfig
    cache = tempfile.mkdtemp(dir=_CORDA_CACHES.name)
    cache = os.path.join(cache, "corda_cache.safetensors")
    return dict(r=4, target_modules=["q_proj", "v_proj"], corda_config=CordaConfig(cache_file=cache))


def _tt_lora_experts():
    # stage 2 builds on stage-1 tt-lora adapters: two of them, trained (perturbed) and saved once per session
    if not os.listdir(_TT_LORA_EXPERTS.name):
        with torch.random.fork_rng():   # the caller's seed still decides the router's initialisation
            _save_tt_lora_experts()
    return dict(expert_dirs=[os.path.join(_TT_LORA_EXPERTS.name, f"task{i}") for i in range(2)])


def _save_tt_lora_experts():
    for i in range(2):
        m = peftlab.get_peft_model(tiny_llama(), peftlab.get_method("tt-lora").make_config(r=2))
        perturb_trainable(m, seed=i, std=0.3)
        m.save_pretrained(os.path.join(_TT_LORA_EXPERTS.name, f"task{i}"))


_TT_LORA_EXPERTS = tempfile.TemporaryDirectory(prefix="peftlab-tt-lora-experts-")
_LORA_SOURCES = tempfile.TemporaryDirectory(prefix="peftlab-smile-sources-")


def _smile_sources():
    # SMILE is built from finished LoRA adapters: two, saved once per session (the caller's seed untouched)
    dirs = [os.path.join(_LORA_SOURCES.name, f"task{i}") for i in range(2)]
    if not os.listdir(_LORA_SOURCES.name):
        with torch.random.fork_rng():
            for i, d in enumerate(dirs):
                m = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
                perturb_trainable(m, seed=i, std=0.3)
                m.save_pretrained(d)
    return dict(adapter_dirs=dirs, top_k=2)


_CHAR_TOKENIZER = tempfile.TemporaryDirectory(prefix="peftlab-char-tokenizer-")


def _ttmm_experts():
    # TTMM merges finished LoRAs by the prompt's text: the SMILE sources as experts, two centroids, and the
    # character tokenizer the toy model's ids decode with (the sentence encoder is the embedded MiniLM-L6)
    from test_train import char_tokenizer
    tok_dir = _CHAR_TOKENIZER.name
    if not os.listdir(tok_dir):
        char_tokenizer().save_pretrained(tok_dir)
    cents = torch.nn.functional.normalize(torch.randn(2, 384, generator=torch.Generator().manual_seed(0)), dim=-1)
    return dict(expert_dirs=_smile_sources()["adapter_dirs"], centroids=cents.tolist(), tokenizer=tok_dir, beta=2.0,
                tau=0.0)


SMALL_MODEL = {
    "bitfit": lambda: dict(add_bias=True),  # the tiny LLaMA has no biases: BitFit there means adding them
    "fourierft": lambda: dict(n_frequency=64, init_weights=True),  # 1000 frequencies exceed its 16×32 layers
    "corda": _corda_cached,
    "tt-lora-moe": _tt_lora_experts,
    "smile": _smile_sources,
    "ttmm": _ttmm_experts,
    "wegeft": lambda: dict(r=8),  # the paper's rank 64 exceeds the toy model's 32 dimensions
}


def build(name: str, seed: int = 0):
    return build_on(name, tiny_llama(seed))


def build_on(name: str, model):
    info = peftlab.get_method(name)
    overrides = SMALL_MODEL.get(name, dict)()
    if info.run_length_field is not None:
        overrides.setdefault(info.run_length_field, 10)
    cfg = info.make_config(**overrides)
    if cfg.calibration_data is not None:
        cfg.prepare(model, _calibration_batches())
    return peftlab.get_peft_model(model, cfg)


def _calibration_batches():
    return [token_batch(seed=s) for s in range(3)]


def _perturb(model, seed=0):
    perturb_trainable(model, seed, std=0.05)


def _logits(model, batch):
    """The logits of the input positions (prompt methods also return their virtual positions, first, as PEFT)."""
    with torch.no_grad():
        return model(**batch).logits[:, -batch["input_ids"].shape[1]:]


@pytest.fixture(scope="module")
def batch():
    return token_batch()


@pytest.mark.parametrize("name", ALL)
def test_identity_at_init(name, batch):
    info = peftlab.get_method(name)
    if not info.identity_at_init:
        pytest.skip(f"{name} does not promise an unchanged model at step 0")
    base = _logits(tiny_llama(), batch)
    model = build(name).eval()
    torch.testing.assert_close(_logits(model, batch), base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_only_adapter_parameters_train(name, batch):
    info = peftlab.get_method(name)
    base = tiny_llama()
    base_params = {id(p) for p in base.parameters()}
    model = build_on(name, base)
    trainable, total = model.get_nb_trainable_parameters()
    if info.kind == "full":  # the reference row: everything trains
        assert trainable == total
        return
    assert 0 < trainable < total
    if info.kind != "selective":  # selective methods train chosen base entries; everyone else adds parameters
        leaked = [n for n, p in model.named_parameters() if p.requires_grad and id(p) in base_params]
        assert not leaked, f"base parameters left trainable: {leaked[:5]}"
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no trainable parameter got a gradient"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", ALL)
def test_disable_adapter_gives_base_output(name, batch):
    model = build(name).eval()
    _perturb(model)
    reference = copy.deepcopy(model).unload().eval()  # the base as the method left it (PiSSA: the residual)
    adapted = _logits(model, batch)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, batch), _logits(reference, batch), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model, batch), adapted)  # and back on afterwards
    assert (adapted - _logits(reference, batch)).abs().max() > 1e-4, "perturbed adapter changed nothing"


@pytest.mark.parametrize("name", ALL)
def test_merge_unmerge(name, batch):
    info = peftlab.get_method(name)
    model = build(name).eval()
    _perturb(model)
    if not info.mergeable:
        with pytest.raises(TypeError, match="cannot be merged"):
            model.merge_adapter()
        return
    base_state = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    unmerged = _logits(model, batch)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model, batch), unmerged, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    for k, v in model.get_base_model().state_dict().items():
        torch.testing.assert_close(v, base_state[k], atol=1e-5, rtol=1e-5, msg=f"unmerge did not restore {k}")
    torch.testing.assert_close(_logits(model, batch), unmerged, atol=1e-5, rtol=1e-5)
    merged_model = copy.deepcopy(model).merge_and_unload()
    assert not any(type(m).__module__.startswith("peftlab") for m in merged_model.modules())
    torch.testing.assert_close(_logits(merged_model, batch), unmerged, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip(name, batch, tmp_path):
    model = build(name).eval()
    _perturb(model)
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=1e-5, rtol=1e-5)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference unless is_trainable=True
    # Trainable again on request (methods that fold a reparametrisation away on save may train fewer tensors).
    trainable = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert 0 < trainable.get_nb_trainable_parameters()[0] <= model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("name", ALL)
def test_listed_with_metadata(name):
    info = peftlab.get_method(name)
    assert info.kind in ("delta-weight", "activation", "input", "selective", "full")
    assert info.description
    d = info.as_dict()
    assert d["name"] == name and isinstance(d["mergeable"], bool)
