"""SpIEL-AG statistics in the units of the gradient the optimizer steps with (``ag_statistics``)."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import spiel_layers, tiny_llama, token_batch
from peft import get_peft_model

from peft_sparse import SpIELConfig


def spiel_config(**overrides) -> SpIELConfig:
    kwargs = {"target_modules": ["q_proj", "v_proj", "down_proj"], "density": 0.2, "init_weights": False}
    kwargs.update(overrides)
    return SpIELConfig(**kwargs)


@functools.lru_cache(maxsize=None)
def _clipped_run(loss_factor: float, ag_statistics: str, updates: int = 7):
    """SpIEL-AG (S=4, gamma=2), AdamW, the loss multiplied by ``loss_factor`` and every update's gradients clipped to
    norm 1e-3 (so the clipped gradients, and the updates, do not depend on ``loss_factor``)."""
    torch.manual_seed(0)
    config = spiel_config(reselection_steps=4, accumulation_steps=2, ag_statistics=ag_statistics)
    peft_model = get_peft_model(tiny_llama(), config).train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for i in range(updates):
        for j in range(2):
            x = token_batch(seed=2 * i + j, length=9)
            (peft_model(x, labels=x).loss * loss_factor / 2).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1e-3)
        assert float(norm) > 1e-3  # clipping really happens in every update
        optimizer.step()
        optimizer.zero_grad()
    state = {}
    for name, layer in spiel_layers(peft_model).items():
        values = layer.sparse_values["default"]
        moments = optimizer.state[values]
        state[name] = (layer.sparse_indices["default"].clone(), values.detach().clone(), moments["exp_avg_sq"].clone())
    return state


def test_statistics_as_stepped_do_not_depend_on_the_gradient_scale_that_clipping_removes():
    small, large = _clipped_run(1.0, "as_stepped"), _clipped_run(1000.0, "as_stepped")
    for name in small:
        assert torch.equal(small[name][0], large[name][0]), name
        torch.testing.assert_close(large[name][1], small[name][1], rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(large[name][2], small[name][2], rtol=1e-3, atol=1e-12)


def test_raw_statistics_seed_moments_in_the_units_of_the_unclipped_gradient():
    # right after the first reselection (update gamma = 2) the same positions are chosen (top-k does not depend on
    # the scale), but the moments seeded from the raw statistics are 1000**2 times larger for the run whose loss is
    # 1000 times larger; the runs then diverge
    small, large = _clipped_run(1.0, "raw", updates=2), _clipped_run(1000.0, "raw", updates=2)
    ratios = []
    for name in small:
        assert torch.equal(small[name][0], large[name][0]), name
        ratios.append(float(large[name][2].max() / small[name][2].max()))
    assert max(ratios) > 1e3


def test_ag_statistics_is_validated():
    with pytest.raises(ValueError, match="ag_statistics"):
        spiel_config(ag_statistics="clipped")


def test_estimation_reuses_the_backwards_value_gradient(monkeypatch):
    import peft_sparse.tuners.spiel.layer as layer_module

    gathered = []
    original = layer_module.sddmm

    def counting(a, b, indices, ncols, backend):
        gathered.append(indices)
        return original(a, b, indices, ncols, backend)

    monkeypatch.setattr(layer_module, "sddmm", counting)
    torch.manual_seed(0)
    # S=4, gamma=3: updates 1-3 are the first estimation phase
    peft_model = get_peft_model(tiny_llama(), spiel_config(reselection_steps=4, accumulation_steps=3)).train()
    layers = spiel_layers(peft_model)
    for seed in range(3):  # three micro-batches of update 1: the first picks candidates, the others gather them
        x = token_batch(seed=seed, length=9)
        peft_model(x, labels=x).loss.backward()
    # the layer gathered only its candidates' gradient; its values' gradient came from the backward
    assert len(gathered) == 2 * len(layers)
    for layer in layers.values():
        assert sum(idx is layer.spiel_candidates["default"] for idx in gathered) == 2
        pending = layer._pending_values["default"]
        torch.testing.assert_close(pending, layer.sparse_values["default"].grad, rtol=1e-6, atol=1e-9)
        pending.zero_()  # a copy: the statistics do not alias the gradient autograd accumulated
        assert layer.sparse_values["default"].grad.abs().sum() > 0
