"""The generic checks PEFT runs on its own tuners, for SpIEL on a plain MLP, a tiny GPT-2 and a tiny Llama."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import dense_delta, snapshot, spiel_layers, tiny_gpt2, tiny_llama, tiny_mlp, token_batch
from peft import PeftModel, get_peft_model
from torch import nn

from peft_sparse import SpIELConfig


@dataclass
class Toy:
    name: str
    build: Callable[[], nn.Module]
    target_modules: object
    num_targets: int

    def inputs(self) -> torch.Tensor:
        if self.name == "mlp":
            return torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
        return token_batch()

    def output(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        out = model(inputs)
        return out if torch.is_tensor(out) else out.logits

    def loss(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        if self.name == "mlp":
            return model(inputs).pow(2).mean()
        return model(inputs, labels=inputs).loss

    def config(self, **overrides) -> SpIELConfig:
        kwargs = {"target_modules": self.target_modules, "density": 0.25, "init_weights": False, "selection": "random"}
        kwargs.update(overrides)
        return SpIELConfig(**kwargs)

    def fresh_base(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A newly built base model (other random init) carrying ``state``."""
        torch.manual_seed(1234)
        model = self.build()
        model.load_state_dict(state)
        return model.eval()


TOYS = [
    Toy("mlp", tiny_mlp, ["lin0", "lin1"], 2),
    Toy("gpt2", tiny_gpt2, ["c_attn", "c_proj", "c_fc"], 8),
    Toy("llama", tiny_llama, "all-linear", 14),
]


@pytest.fixture(params=TOYS, ids=[t.name for t in TOYS])
def toy(request) -> Toy:
    return request.param


def wrapped(toy: Toy, **overrides):
    """(base state before wrapping, PEFT model in eval mode)."""
    base = toy.build()
    state = snapshot(base)
    return state, get_peft_model(base, toy.config(**overrides)).eval()


def dense_reference(toy: Toy, state, peft_model, adapter="default") -> nn.Module:
    """A plain model with ``W + dense(delta)`` in every targeted weight, added by hand."""
    reference = toy.fresh_base(state)
    with torch.no_grad():
        for name, layer in spiel_layers(peft_model).items():
            if adapter not in layer.sparse_values:
                continue
            weight = reference.get_submodule(name.removeprefix("base_model.model.")).weight
            weight += dense_delta(layer.sparse_indices[adapter], layer.sparse_values[adapter], weight.shape)
    return reference


def adapter_param_names(model: nn.Module) -> set[str]:
    """Names of the delta values of every adapter, found by identity (not by the container's name)."""
    values = {id(v) for layer in spiel_layers(model).values() for v in layer.sparse_values.values()}
    return {n for n, p in model.named_parameters() if id(p) in values}


def adapter_buffer_names(model: nn.Module) -> set[str]:
    """Names of the buffers SpIEL layers add (indices, shapes, training state), not those of the wrapped layers."""
    names = set()
    for layer_name, layer in spiel_layers(model).items():
        names |= {f"{layer_name}.{n}" for n, _ in layer.named_buffers() if not n.startswith("base_layer.")}
    return names


def test_injection_and_dense_reference(toy):
    state, peft_model = wrapped(toy)
    layers = spiel_layers(peft_model)
    assert len(layers) == toy.num_targets
    for layer in layers.values():
        numel = layer.get_base_layer().weight.numel()
        assert layer.sparse_indices["default"].numel() == round(0.25 * numel)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == adapter_param_names(peft_model) and len(trainable) == toy.num_targets
    inputs = toy.inputs()
    with torch.no_grad():
        out = toy.output(peft_model, inputs)
        expected = toy.output(dense_reference(toy, state, peft_model), inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_forward_and_backward_are_finite(toy, dtype):
    state, peft_model = wrapped(toy)
    inputs = toy.inputs()
    with torch.no_grad():
        expected = toy.output(dense_reference(toy, state, peft_model), inputs)
    peft_model.to(dtype)
    for layer in spiel_layers(peft_model).values():
        assert layer.get_base_layer().weight.dtype == dtype
        assert layer.sparse_indices["default"].dtype == torch.int32
    out = toy.output(peft_model, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    peft_model.train()
    toy.loss(peft_model, inputs).float().backward()
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_cpu_autocast_bf16(toy):
    state, peft_model = wrapped(toy)
    inputs = toy.inputs()
    with torch.no_grad():
        expected = toy.output(dense_reference(toy, state, peft_model), inputs)
    # eval mode (no dropout), so the output is comparable; gradients flow all the same
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = toy.output(peft_model, inputs)
        loss = toy.loss(peft_model, inputs)
    assert torch.isfinite(out).all() and torch.isfinite(loss)
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
    loss.backward()
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32 and param.grad.dtype == torch.float32, name
            assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_only_adapter_parameters_change(toy):
    _, peft_model = wrapped(toy)
    peft_model.train()
    params_before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    adapter_buffers = adapter_buffer_names(peft_model)
    assert adapter_buffers
    buffers_before = {n: b.detach().clone() for n, b in peft_model.named_buffers() if n not in adapter_buffers}
    # every parameter goes to the optimizer, with weight decay: frozen ones must still not move
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=1e-2, weight_decay=0.1)
    inputs = toy.inputs()
    for _ in range(3):
        toy.loss(peft_model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = adapter_param_names(peft_model)
    for name, param in peft_model.named_parameters():
        if name in adapter:
            assert not torch.equal(param, params_before[name]), name
        else:
            assert torch.equal(param, params_before[name]), name
    for name, buffer in peft_model.named_buffers():
        if name not in adapter_buffers:
            assert torch.equal(buffer, buffers_before[name]), name


def test_save_load_round_trip(toy, tmp_path):
    state, peft_model = wrapped(toy, seed=3)
    peft_model.train()
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=1e-2)
    inputs = toy.inputs()
    toy.loss(peft_model, inputs).backward()
    optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        expected = toy.output(peft_model, inputs)
        reference = toy.output(dense_reference(toy, state, peft_model), inputs)
    torch.testing.assert_close(expected, reference, rtol=1e-5, atol=1e-5)
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()

    # loading with another seed: the injection draws other positions, the saved ones must replace them
    loaded = PeftModel.from_pretrained(toy.fresh_base(state), tmp_path, config=toy.config(seed=4)).eval()
    with torch.no_grad():
        assert torch.equal(toy.output(loaded, inputs), expected)
    trainable = PeftModel.from_pretrained(toy.fresh_base(state), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == adapter_param_names(trainable)


def test_delete_adapter(toy):
    state, peft_model = wrapped(toy, seed=1)
    inputs = toy.inputs()
    with torch.no_grad():
        first = toy.output(peft_model, inputs)
    peft_model.add_adapter("other", toy.config(seed=2))
    peft_model.set_adapter("other")
    with torch.no_grad():
        other = toy.output(peft_model, inputs)
        expected_other = toy.output(dense_reference(toy, state, peft_model, "other"), inputs)
    torch.testing.assert_close(other, expected_other, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, first, atol=1e-4)

    peft_model.delete_adapter("other")
    assert list(peft_model.peft_config) == ["default"] and peft_model.active_adapters == ["default"]
    assert not any(".other" in n for n in peft_model.state_dict())
    with torch.no_grad():
        assert torch.equal(toy.output(peft_model, inputs), first)

    # with the last adapter gone, PeftModel has no active config (as for LoRA); the wrapped model is the base again
    peft_model.delete_adapter("default")
    assert not peft_model.peft_config
    assert all(not layer.sparse_values for layer in spiel_layers(peft_model).values())
    with torch.no_grad():
        base_out = toy.output(toy.fresh_base(state), inputs)
        assert torch.equal(toy.output(peft_model.base_model.model, inputs), base_out)


def test_disable_adapter(toy):
    state, peft_model = wrapped(toy)
    inputs = toy.inputs()
    with torch.no_grad():
        base_out = toy.output(toy.fresh_base(state), inputs)
        adapted = toy.output(peft_model, inputs)
        assert not torch.allclose(adapted, base_out, atol=1e-4)
        with peft_model.disable_adapter():
            assert torch.equal(toy.output(peft_model, inputs), base_out)
        assert torch.equal(toy.output(peft_model, inputs), adapted)
