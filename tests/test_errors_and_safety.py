"""Bad input gets clear errors; loading is safe; saving is atomic."""
from __future__ import annotations

import json

import pytest
import torch

import peftlab
from conftest import tiny_llama, token_batch


def test_unknown_target_lists_near_matches():
    with pytest.raises(ValueError, match=r"q_prj.*matched no module.*Near matches: .*q_proj"):
        peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(target_modules=["q_prj"]))


def test_unknown_method_suggests():
    with pytest.raises(ValueError, match=r"unknown method 'lorra'.*'lora'"):
        peftlab.get_method("lorra")


def test_adapter_for_other_base_names_module_and_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4))
    model.save_pretrained(tmp_path)
    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: lora_A\.weight has shape \(4, 32\) "
                                         r"in the file, but this model needs \(4, 48\)"):
        peftlab.PeftModel.from_pretrained(bigger, tmp_path)


def test_corrupted_and_missing_files(tmp_path):
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4))
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    with pytest.raises(ValueError, match="corrupted or truncated"):
        peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path / "nope")


def test_unknown_peft_type_and_unknown_keys(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "NOT_A_METHOD"}))
    with pytest.raises(ValueError, match="NOT_A_METHOD.*does not implement"):
        peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["some_field_from_a_newer_peft"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="some_field_from_a_newer_peft"):
        peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", "a\\b", "", "x.y"])
def test_adapter_names_cannot_escape_the_directory(bad):
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4))
    with pytest.raises(ValueError, match="invalid adapter name"):
        model.add_adapter(bad, peftlab.LoraConfig(r=2))


def test_legacy_bin_is_read_weights_only(tmp_path):
    batch = token_batch()
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    torch.save(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)

    class Evil:  # a pickle that would run code when unpickled without weights_only
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4))
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

    import peftlab.core.io as io

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt  # the process dies mid-write
    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_pickle_save_refused(tmp_path):
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4))
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)


def test_mixed_batch_unknown_adapter():
    model = peftlab.get_peft_model(tiny_llama(), peftlab.LoraConfig(r=4))
    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"):
        model(**token_batch(batch=2), adapter_names=["default", "nope"])


def test_load_tensors_recognises_safetensors_by_content(tmp_path):
    # CorDA cache files keep the name the user chose: ours are safetensors, PEFT's are torch.save dicts.
    from safetensors.torch import save_file
    from peftlab.core.io import load_tensors
    t = {"a": torch.arange(6.0).reshape(2, 3)}
    save_file(t, str(tmp_path / "cache.pt"))
    torch.save(t, tmp_path / "peft_cache.pt")
    for name in ("cache.pt", "peft_cache.pt"):
        assert torch.equal(load_tensors(tmp_path / name)["a"], t["a"]), name
