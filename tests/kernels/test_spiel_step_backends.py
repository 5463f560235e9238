"""A whole SpIEL training step on the Triton kernels (interpreter on CPU) equals the PyTorch path."""

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_sparse
from peft_sparse import SpIELConfig
from peft_sparse.kernels import _triton

pytestmark = pytest.mark.skipif(_triton.triton is None, reason="triton is not installed")


@pytest.mark.parametrize("selection", ["ag", "ma"])
def test_training_steps_match_between_backends(selection):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1,
    ))
    results = {}
    for backend in ("torch", "triton"):
        config = SpIELConfig(target_modules=["q_proj", "down_proj"], density=0.1, init_weights=False,
                             selection=selection, reselection_steps=2, accumulation_steps=1, kernel_backend=backend)
        model = get_peft_model(copy.deepcopy(base), config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        g = torch.Generator().manual_seed(1)
        logits, grads = [], []
        for _ in range(2):  # the second update triggers a reselection (AG candidates / MA top-k on the backend)
            x = torch.randint(0, 32, (2, 7), generator=g)
            out = model(input_ids=x, labels=x)
            out.loss.backward()
            logits.append(out.logits.detach())
            grads.append([p.grad.clone() for p in params])
            optimizer.step()
            optimizer.zero_grad()
        deltas = [(i.clone(), v.detach().clone()) for _, i, v, _ in peft_sparse.sparse_deltas(model)]
        results[backend] = logits, grads, deltas
    (la, ga, da), (lb, gb, db) = results["torch"], results["triton"]
    for a, b in zip(la, lb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for step_a, step_b in zip(ga, gb):
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for (ia, va), (ib, vb) in zip(da, db):
        assert torch.equal(ia, ib)
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-6)
