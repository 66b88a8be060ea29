"""PaFi: the task-agnostic mask of smallest-magnitude weights, and that only those entries train."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import tiny_llama, token_batch
from peftlab.methods.pafi import PafiConfig
from test_selective import _changed, _logits, _train_steps

TARGETS = ["q_proj", "down_proj"]


def _by_hand(model, density, scope):
    """The masks written out: sort |W| (position breaks ties) and take the smallest ⌊density·n⌋."""
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    ws = {n: model.get_submodule(n).weight.detach() for n in names}
    if scope == "per_matrix":
        out = {}
        for n, w in ws.items():
            k = int(density * w.numel())
            order = sorted(range(w.numel()), key=lambda i: (abs(float(w.reshape(-1)[i])), i))[:k]
            m = torch.zeros(w.numel(), dtype=torch.bool)
            m[order] = True
            out[n] = m.view_as(w)
        return out
    flat = torch.cat([w.reshape(-1) for w in ws.values()])
    k = int(density * flat.numel())
    order = sorted(range(flat.numel()), key=lambda i: (abs(float(flat[i])), i))[:k]
    m = torch.zeros(flat.numel(), dtype=torch.bool)
    m[order] = True
    out, start = {}, 0
    for n, w in ws.items():
        out[n] = m[start: start + w.numel()].view_as(w)
        start += w.numel()
    return out


@pytest.mark.parametrize("scope", ["global", "per_matrix"])
def test_pafi_trains_exactly_the_smallest_magnitude_entries(scope):
    batch = token_batch()
    model = tiny_llama()
    expected = _by_hand(model, 0.05, scope)
    pm = peftlab.get_peft_model(model, PafiConfig(density=0.05, scope=scope, target_modules=TARGETS))
    assert pm.get_nb_trainable_parameters()[0] == sum(int(m.sum()) for m in expected.values())
    before = {k: v.clone() for k, v in pm.model.state_dict().items()}
    _train_steps(pm, batch)
    changed = _changed(before, pm.model)
    for n, mask in expected.items():
        c = changed[n + ".weight"]
        assert c.any() and not (c & ~mask).any(), n       # only selected entries move
    assert not any(c.any() for k, c in changed.items() if "peftlab_selective" not in k
                   and k.rsplit(".weight", 1)[0] not in expected)


def test_pafi_file_round_trip_and_unload(tmp_path):
    batch = token_batch()
    pm = peftlab.get_peft_model(tiny_llama(), PafiConfig(density=0.02, target_modules=TARGETS))
    _train_steps(pm, batch)
    tuned = _logits(pm, batch)
    pm.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in keys} == {"pafi_positions", "pafi_values"}
    # the mask is stored as the positions of its entries (4 bytes each), not a byte per weight
    stored = sum(t.numel() * t.element_size() for t in keys.values())
    weights = sum(m.weight.numel() for n, m in tiny_llama().named_modules() if n.rsplit(".", 1)[-1] in TARGETS)
    assert stored <= 8 * 0.02 * weights * 1.01 + 64 and stored < weights / 4
    loaded = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, batch), tuned)
    torch.testing.assert_close(_logits(loaded.unload(), batch), _logits(tiny_llama(), batch))
    # a file from before positions (a dense bool mask per weight) still loads, to the same model
    from safetensors.torch import save_file
    legacy = {}
    for k, t in keys.items():
        if k.endswith("pafi_positions"):
            weight = tiny_llama().get_submodule(k.rsplit(".", 1)[0].removeprefix("base_model.model.")).weight
            mask = torch.zeros(weight.numel(), dtype=torch.bool)
            mask[t.long()] = True
            legacy[k.replace("pafi_positions", "pafi_mask")] = mask.view(weight.shape)
        else:
            legacy[k] = t
    save_file(legacy, str(tmp_path / "adapter_model.safetensors"))
    old = peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(old, batch), tuned)


def test_pafi_refuses_positions_that_do_not_fit(tmp_path):
    pm = peftlab.get_peft_model(tiny_llama(), PafiConfig(density=0.02, target_modules=TARGETS))
    pm.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    from safetensors.torch import save_file
    key = next(k for k in keys if k.endswith("pafi_positions"))
    keys[key] = keys[key].flip(0).contiguous()          # not increasing: the values would land in the wrong places
    save_file(keys, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(Exception, match="strictly increasing flat positions"):
        peftlab.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_pafi_config_errors():
    with pytest.raises(ValueError, match=r"density .* must be in \(0, 1\]"):
        PafiConfig(density=0)
    with pytest.raises(ValueError, match="scope must be one of"):
        PafiConfig(scope="layer")
