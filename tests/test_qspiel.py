"""qSpIEL: SpIEL over bitsandbytes 4-bit NF4 weights on the CPU backend, against dequantised dense references."""

import warnings

import pytest
import torch
import torch.nn.functional as F

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import dequantize_4bit  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

import peft_sparse  # noqa: E402
from peft_sparse import SpIELConfig  # noqa: E402

VOCAB = 64
QUANT = dict(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
)


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    torch.manual_seed(0)
    # in/out features multiples of the NF4 block size, as bitsandbytes' CPU kernels expect
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    path = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_4bit(path):
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**QUANT), device_map="cpu")
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def q_proj(model):
    return model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")


def dense_reference_weight(layer, adapter="default"):
    """DEQUANT(W) in the compute dtype plus the delta, each sum rounded once (float32 -> bf16)."""
    params = layer.get_base_layer().weight
    w = dequantize_4bit(params.data, params.quant_state).to(torch.bfloat16).float().view(-1)
    w[layer.sparse_indices[adapter].long()] += layer.sparse_values[adapter].detach().float()
    return w.view(layer.weight_shape).to(torch.bfloat16)


def small_deltas(model, scale=1e-3):
    g = torch.Generator().manual_seed(5)
    for _, _, values, _ in peft_sparse.sparse_deltas(model):
        values.data = torch.randn(values.shape, generator=g) * scale


def test_forward_and_value_gradients_match_the_dequantised_reference(saved_base):
    model = get_peft_model(load_4bit(saved_base), SpIELConfig(target_modules="all-linear", density=0.05))
    small_deltas(model)
    layer = q_proj(model)
    assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    w = dense_reference_weight(layer)
    assert y.dtype == x.dtype  # like Linear4bit: computed in bf16, returned in the input's dtype
    torch.testing.assert_close(y, F.linear(x.detach().to(torch.bfloat16), w).float(), rtol=0, atol=0)
    dy = torch.randn_like(y)
    y.backward(dy)
    # the backward sees dy rounded to the compute dtype, as the forward returned it through a cast
    dense_grad = (
        dy.reshape(-1, 64).to(torch.bfloat16).float().t() @ x.detach().reshape(-1, 64).to(torch.bfloat16).float()
    )
    expected = dense_grad.view(-1)[layer.sparse_indices["default"].long()]
    torch.testing.assert_close(layer.sparse_values["default"].grad, expected, rtol=1e-5, atol=1e-6)
    assert layer.get_base_layer().weight.grad is None


@pytest.mark.parametrize("selection", ["ag", "ma"])
def test_trainer_reselects_saves_and_reloads_into_a_fresh_4bit_base(saved_base, tmp_path, selection):
    model = get_peft_model(
        load_4bit(saved_base),
        SpIELConfig(
            target_modules="all-linear", density=0.05, selection=selection, reselection_steps=3, accumulation_steps=2
        ),
    )
    start = q_proj(model).sparse_indices["default"].clone()
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, VOCAB, (32, 1), generator=g) + torch.arange(12)) % VOCAB
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    optimizers = {"optimizer_cls_and_kwargs": (peft_sparse.SM3, {"lr": 1e-2})} if selection == "ma" else {}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=7,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=data, **optimizers).train()
    layer = q_proj(model)
    assert int(layer.spiel_step["default"]) == 7
    assert len(set(layer.sparse_indices["default"].tolist()) & set(start.tolist())) < start.numel() // 2
    assert any(v.abs().sum() > 0 for _, _, v, _ in peft_sparse.sparse_deltas(model))

    model.save_pretrained(tmp_path / "adapter")
    fresh = PeftModel.from_pretrained(load_4bit(saved_base), tmp_path / "adapter")
    model.eval()
    fresh.eval()
    x = ids[:4]
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)


def test_merge_into_4bit_touches_only_changed_blocks_and_unmerges_exactly(saved_base):
    model = get_peft_model(load_4bit(saved_base), SpIELConfig(target_modules="all-linear", density=0.01))
    small_deltas(model)
    layer = q_proj(model)
    params = layer.get_base_layer().weight
    packed, absmax = params.data.clone(), params.quant_state.absmax.clone()
    target = dense_reference_weight(layer).float().view(-1)  # what the adapter computes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.merge()
    assert any("re-quantised" in str(w.message) for w in caught)
    blocks = torch.unique(layer.sparse_indices["default"].long() // params.quant_state.blocksize)
    changed_bytes = (params.data.view(-1) != packed.view(-1)).nonzero().squeeze(1)
    assert set((changed_bytes * 2 // 64).tolist()) <= set(blocks.tolist())
    changed_absmax = (params.quant_state.absmax != absmax).nonzero().squeeze(1)
    assert set(changed_absmax.tolist()) <= set(blocks.tolist())
    merged = dequantize_4bit(params.data, params.quant_state).float().view(-1)
    original = dequantize_4bit(packed, params.quant_state).float()  # absmax restored below; compare other blocks
    in_blocks = torch.zeros_like(merged, dtype=torch.bool).view(-1, 64)
    in_blocks[blocks] = True
    in_blocks = in_blocks.view(-1)
    # within touched blocks: close to W + delta (NF4 resolution); elsewhere untouched
    assert (merged[in_blocks] - target[in_blocks]).abs().max() < 0.01
    layer.unmerge()
    assert torch.equal(params.data, packed) and torch.equal(params.quant_state.absmax, absmax)
    torch.testing.assert_close(dequantize_4bit(params.data, params.quant_state).float(), original)


def test_merge_and_unload_dequantize_is_exact(saved_base):
    model = get_peft_model(load_4bit(saved_base), SpIELConfig(target_modules="all-linear", density=0.05))
    small_deltas(model)
    expected = {
        name: dense_reference_weight(model.get_submodule("base_model.model." + name))
        for name, _, _, _ in peft_sparse.sparse_deltas(model)
    }
    merged = model.merge_and_unload(dequantize=True)
    for name, weight in expected.items():
        linear = merged.get_submodule(name)
        assert type(linear) is torch.nn.Linear and linear.weight.dtype == torch.bfloat16
        assert torch.equal(linear.weight, weight), name


def test_triton_backend_matches_the_torch_path(saved_base):
    pytest.importorskip("triton")
    outputs = {}
    for backend in ("torch", "triton"):
        model = get_peft_model(
            load_4bit(saved_base),
            SpIELConfig(target_modules=["q_proj", "down_proj"], density=0.05, kernel_backend=backend),
        )
        small_deltas(model)
        x = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        outputs[backend] = out.logits.detach(), [v.grad.clone() for _, _, v, _ in peft_sparse.sparse_deltas(model)]
    torch.testing.assert_close(outputs["torch"][0], outputs["triton"][0], rtol=0, atol=0)
    for a, b in zip(outputs["torch"][1], outputs["triton"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
