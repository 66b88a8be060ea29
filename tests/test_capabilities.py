"""Declared capabilities: what a method supports is read from its declarations, and asking for what it does not
support is a clear error naming the method (no bare AttributeError from a probed method)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import peftlab
from conftest import tiny_llama, token_batch
from peftlab.core.lowrank import LowRankOperands
from peftlab.core.tuner import adapted_layers
from peftlab.methods.lora import LoraLinear


@pytest.mark.parametrize("method", ["vera", "lora-fa", "ia3"])
def test_weight_conversion_on_a_method_without_it_is_a_clear_error(method, tmp_path):
    model = peftlab.get_peft_model(tiny_llama(), peftlab.get_method(method).make_config())
    model.save_pretrained(tmp_path / "initial")
    peft_type = model.peft_config["default"].peft_type
    with pytest.raises(ValueError, match=rf"adapter 'default' is {peft_type}, which has no conversion.*LORA"):
        model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    assert not (tmp_path / "converted" / "adapter_model.safetensors").exists()


def test_weighted_combination_of_a_method_without_it_is_a_clear_error():
    model = peftlab.get_peft_model(tiny_llama(), peftlab.get_method("vera").make_config())
    model.add_adapter("b", peftlab.get_method("vera").make_config())
    with pytest.raises(ValueError, match=r"VERA adapters cannot be combined \(only IA3, LORA support"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="linear")


def test_prepare_on_a_method_without_calibration_is_a_clear_error():
    cfg = peftlab.get_method("lora").make_config()
    assert cfg.calibration_data is None
    with pytest.raises(TypeError, match=r"LoraConfig \(LORA\) needs no calibration data"):
        cfg.prepare(tiny_llama(), [token_batch()])


def test_every_declared_field_exists_and_data_needs_are_declared():
    for info in peftlab.list_methods():
        names = {f.name for f in dataclasses.fields(info.config_cls)}
        for field in (info.rank_field, info.alpha_field, info.dropout_field, info.run_length_field):
            assert field is None or field in names, (info.name, field)
        assert info.saves in ("adapter", "model")
    assert peftlab.get_method("adalora").run_length_field == "total_step"
    assert peftlab.get_method("full").saves == "model"
    assert peftlab.get_method("child-tuning").make_config().calibration_data == "task"


def test_a_lora_subclass_that_changes_forward_must_state_its_lowrank_form():
    with pytest.raises(TypeError, match="must also define lowrank_operands and joins_sibling_group"):
        class Scaled(LoraLinear):  # noqa: F841 - defining it is the test
            def forward(self, x, base_layer, result):
                return 2 * super().forward(x, base_layer, result)


@pytest.mark.parametrize("method,training,expected", [
    ("lora", True, True), ("dora", True, True), ("dora", False, True),
    ("lora-fa", True, True), ("lora-dropout", True, False), ("lora-dropout", False, True)])
def test_lowrank_operands_describe_the_layer_output(method, training, expected):
    """A layer's operands compute what its own forward computes: c ⊙ (W x + s·B A x) + b."""
    model = peftlab.get_peft_model(tiny_llama(), peftlab.get_method(method).make_config(r=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.train(training)
    _, layer = next(adapted_layers(model.model))
    adapter = layer.adapters["default"]
    ops = adapter.lowrank_operands(layer.base_layer)
    assert (ops is not None) == expected
    if ops is None:
        return
    assert isinstance(ops, LowRankOperands)
    x = torch.randn(5, ops.weight.shape[1])
    with torch.no_grad():
        z = x @ ops.weight.t() + ops.scale * (x @ ops.lora_A.t()) @ ops.lora_B.t()
        c = ops.column_scale()
        want = (z if c is None else z * c) + (0 if ops.bias is None else ops.bias)
        got = layer(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
