"""Prompt tuning, P-tuning, prefix tuning and P-tuning v2 on an encoder-decoder model (a tiny T5, SEQ_2_SEQ_LM):
HF PEFT interop both ways (logits and loss), generate() token for token, PEFT's file layout, clear refusals."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import perturb_trainable, tiny_llama

TOL = 1e-5
CONFIGS = {  # HF PEFT config class name -> fields (the same names in peftlab)
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=4)),
    "prompt-one-submodule": ("PromptTuningConfig", dict(num_virtual_tokens=4, num_transformer_submodules=1)),
    "p-tuning-mlp": ("PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=16)),
    "p-tuning-lstm": ("PromptEncoderConfig", dict(num_virtual_tokens=3, encoder_reparameterization_type="LSTM")),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=4)),
    "prefix-projection": ("PrefixTuningConfig", dict(num_virtual_tokens=4, prefix_projection=True,
                                                     encoder_hidden_size=24)),
}


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    return T5ForConditionalGeneration(cfg).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 128, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # a padded row, so the encoder mask matters
    labels = torch.randint(2, 128, (3, 7), generator=g)  # as long as the input: must not be taken for it
    labels[1, -1] = -100
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def _config(lib, name):
    cls, kw = CONFIGS[name]
    return getattr(lib, cls)(task_type="SEQ_2_SEQ_LM", **kw)


def _outputs(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits, out.loss


def _same(ours, theirs):
    (lo, so), (lt, st) = ours, theirs
    assert lo.shape == lt.shape == (3, 7, 128)  # decoder positions only: the decoder gets no virtual tokens
    assert (lo - lt).abs().max() <= TOL and abs(so - st) <= TOL


def _decoder_inputs(batch):
    """Decoder inputs and their mask given explicitly (PEFT grows a prefix's decoder mask by n)."""
    dec = batch["labels"].clamp_min(0)
    return {**batch, "decoder_input_ids": dec, "decoder_attention_mask": torch.ones_like(dec)}


@pytest.mark.parametrize("config_name", CONFIGS)
def test_peft_to_peftlab(config_name, tmp_path):
    theirs = peft.get_peft_model(tiny_t5(), _config(peft, config_name))
    perturb_trainable(theirs)
    theirs.eval().save_pretrained(tmp_path)
    ours = peftlab.PeftModel.from_pretrained(tiny_t5(), tmp_path).eval()
    for batch in (_batch(), _decoder_inputs(_batch())):
        _same(_outputs(ours, batch), _outputs(theirs, batch))


@pytest.mark.parametrize("config_name", CONFIGS)
def test_peftlab_to_peft(config_name, tmp_path):
    ours = peftlab.get_peft_model(tiny_t5(), _config(peftlab, config_name))
    perturb_trainable(ours)
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_t5(), tmp_path / "ours").eval()
    _same(_outputs(ours, _batch()), _outputs(theirs, _batch()))
    # The same tensor names and shapes (and config fields) PEFT writes for the same config.
    peft.get_peft_model(tiny_t5(), _config(peft, config_name)).save_pretrained(tmp_path / "ref")
    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ref_cfg = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    for key in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "peft_type", "task_type",
                "num_transformer_submodules", "encoder_hidden_size", "prefix_projection"):
        assert ours_cfg.get(key) == ref_cfg.get(key), key


@pytest.mark.parametrize("config_name", CONFIGS)
def test_generate_matches_peft(config_name, tmp_path):
    theirs = peft.get_peft_model(tiny_t5(), _config(peft, config_name))
    perturb_trainable(theirs, std=0.5)
    theirs.eval().save_pretrained(tmp_path)
    ours = peftlab.PeftModel.from_pretrained(tiny_t5(), tmp_path).eval()
    batch = _batch()
    gen = dict(max_new_tokens=6, do_sample=False)
    for kw in ({"attention_mask": batch["attention_mask"]}, {}):
        a = ours.generate(input_ids=batch["input_ids"], **kw, **gen)
        b = theirs.generate(input_ids=batch["input_ids"], **kw, **gen)
        assert a.shape == (3, 7) and torch.equal(a, b)  # decoder start + 6 new tokens
        assert not torch.equal(a, ours.get_base_model().generate(input_ids=batch["input_ids"], **kw, **gen))


@pytest.mark.parametrize("name", ["prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2"])
def test_trains_and_saved_layout(name, tmp_path):
    model = peftlab.get_peft_model(tiny_t5(), peftlab.get_method(name).make_config(num_virtual_tokens=4,
                                                                                   task_type="SEQ_2_SEQ_LM"))
    assert model.peft_config["default"].num_transformer_submodules == 2
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(**_batch()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval().save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    rows = 4 if name.startswith("prefix") or name.endswith("v2") else 8  # PEFT: n per submodule for embeddings
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape[0] == rows
    again = peftlab.PeftModel.from_pretrained(tiny_t5(), tmp_path).eval()
    _same(_outputs(again, _batch()), _outputs(model, _batch()))


def test_refusals():
    with pytest.raises(ValueError, match="task_type='SEQ_2_SEQ_LM'"):
        peftlab.get_peft_model(tiny_t5(), peftlab.PromptTuningConfig(num_virtual_tokens=4))
    with pytest.raises(ValueError, match="needs an encoder-decoder model"):
        peftlab.get_peft_model(tiny_llama(), peftlab.PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_2_SEQ_LM"))
    with pytest.raises(ValueError, match="num_transformer_submodules=1"):
        peftlab.get_peft_model(tiny_t5(), peftlab.PrefixTuningConfig(num_virtual_tokens=4, task_type="SEQ_2_SEQ_LM",
                                                                     num_transformer_submodules=1))
    with pytest.raises(ValueError, match="num_transformer_submodules=2"):
        peftlab.get_peft_model(tiny_llama(), peftlab.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM",
                                                                        num_transformer_submodules=2))


@pytest.mark.parametrize("name", ["prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2"])
def test_decoding_step_by_step_continues_from_its_own_cache(name):
    model = peftlab.get_peft_model(tiny_t5(), peftlab.get_method(name).make_config(num_virtual_tokens=4,
                                                                                   task_type="SEQ_2_SEQ_LM"))
    perturb_trainable(model.eval(), std=0.5)
    batch = _decoder_inputs(_batch())
    enc = {k: batch[k] for k in ("input_ids", "attention_mask")}
    dec, dec_mask = batch["decoder_input_ids"], batch["decoder_attention_mask"]
    with torch.no_grad():
        whole = model(**enc, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        first = model(**enc, decoder_input_ids=dec[:, :4], decoder_attention_mask=dec_mask[:, :4], use_cache=True)
        step = model(**enc, decoder_input_ids=dec[:, 4:5], decoder_attention_mask=dec_mask[:, :5],
                     past_key_values=first.past_key_values).logits
    assert (first.logits - whole[:, :4]).abs().max() <= TOL
    assert (step[:, 0] - whole[:, 4]).abs().max() <= TOL
