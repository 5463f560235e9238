"""SpIEL against hand-written dense references of the thesis's algorithm (thesis §7.3.1): per-entry-age AdamW with
re-seeded moments across reselections, the drop criteria, growth exclusion, and loading adapters saved before
per-entry ages existed."""

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from peft_sparse import SpIELConfig

ROWS, COLS = 6, 8


class Quadratic(nn.Module):
    """``loss = 0.5 * ||W' - T||^2`` through a Linear: with the identity as input, ``dL/dW' = W' - T`` exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(COLS, ROWS, bias=False)

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        out = self.lin(torch.eye(COLS))  # [COLS, ROWS] = W'^T
        return 0.5 * ((out - target.t()) ** 2).sum()


def make(seed=0, **config):
    torch.manual_seed(seed)
    base = Quadratic()
    w0 = base.lin.weight.detach().clone()
    options = dict(target_modules=["lin"], num_tunable_weights=10, reselection_steps=3, accumulation_steps=2)
    options.update(config)
    model = get_peft_model(base, SpIELConfig(**options))
    return model, model.base_model.model.lin, w0


def reference_adamw(w0, target, steps, positions_after, initial, lr, betas, eps, wd, gamma, seeded, amsgrad=False):
    """Per-entry-age AdamW on the active positions of a dense matrix, written out step by step.

    ``positions_after[t]``: the set of active positions after update t (read from the run; which positions are
    chosen is tested elsewhere). A position new after a reselection starts with value 0 and, if ``seeded``, moments
    set to the mean gradient and mean squared gradient over the ``gamma`` updates before the reselection with age
    ``gamma`` (else zero moments, age 0); a kept position keeps value, moments and age. ``amsgrad``: the denominator
    uses the running max of the second moment (seeded like it).
    """
    b1, b2 = betas
    w0, target = w0.double().view(-1), target.double().view(-1)
    state = {p: dict(value=0.0, m=0.0, v=0.0, vmax=0.0, age=0) for p in initial}
    history = []  # dense gradient before each update (for the estimates of grown entries)
    for t in range(1, steps + 1):
        dense = w0 - target
        for p, s in state.items():
            dense[p] += s["value"]
        history.append(dense.clone())
        for p, s in state.items():
            g = float(dense[p])
            s["m"] = b1 * s["m"] + (1 - b1) * g
            s["v"] = b2 * s["v"] + (1 - b2) * g * g
            s["vmax"] = max(s["vmax"], s["v"])
            s["age"] += 1
            a = s["age"]
            second = s["vmax"] if amsgrad else s["v"]
            s["value"] *= 1 - lr * wd
            s["value"] -= lr / (1 - b1**a) * s["m"] / (math.sqrt(second) / math.sqrt(1 - b2**a) + eps)
        new = positions_after[t]
        if set(new) != set(state):
            phase = torch.stack(history[-gamma:])
            mean, mean_sq = phase.mean(0), (phase**2).mean(0)
            state = {p: s for p, s in state.items() if p in new}
            for p in new:
                if p not in state:
                    if seeded:
                        m, v = float(mean[p]) * (1 - b1**gamma), float(mean_sq[p]) * (1 - b2**gamma)
                        state[p] = dict(value=0.0, m=m, v=v, vmax=v, age=gamma)
                    else:
                        state[p] = dict(value=0.0, m=0.0, v=0.0, vmax=0.0, age=0)
    return state


@pytest.mark.parametrize(
    "selection, options, config",
    [
        ("ag", {}, {}),
        ("random", {"foreach": True}, {}),
        ("ag", {"amsgrad": True, "fused": True}, {}),
        ("ag", {}, {"ag_seed_moments": False}),
    ],
)
def test_adamw_with_reselections_equals_per_entry_age_reference(selection, options, config):
    model, layer, w0 = make(selection=selection, total_steps=30, initial_reselection_rate=1.0, **config)
    target = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(5))
    values = layer.sparse_values["default"]
    lr, betas, eps, wd = 0.05, (0.8, 0.95), 1e-8, 0.1
    optimizer = torch.optim.AdamW([values], lr=lr, betas=betas, eps=eps, weight_decay=wd, **options)
    initial = layer.sparse_indices["default"].tolist()
    positions_after, steps = {}, 11  # reselections after updates 2 (all), 5 (8 entries), 8 (7), 11 (6)
    for t in range(1, steps + 1):
        model(target).backward()
        optimizer.step()
        optimizer.zero_grad()
        positions_after[t] = layer.sparse_indices["default"].tolist()
    changes = [t for t in range(2, steps + 1) if set(positions_after[t]) != set(positions_after[t - 1])]
    assert set(positions_after[1]) == set(initial)
    assert len(changes) >= 3, changes  # the positions did move, several times
    expected = reference_adamw(
        w0,
        target,
        steps,
        positions_after,
        initial,
        lr,
        betas,
        eps,
        wd,
        2,
        selection == "ag" and config.get("ag_seed_moments", True),
        options.get("amsgrad"),
    )
    got = dict(zip(layer.sparse_indices["default"].tolist(), values.detach().tolist()))
    ages = dict(zip(layer.sparse_indices["default"].tolist(), layer.spiel_age["default"].tolist()))
    assert set(got) == set(expected)
    for p, s in expected.items():
        assert math.isclose(got[p], s["value"], rel_tol=1e-4, abs_tol=1e-6), (p, got[p], s["value"])
        assert ages[p] == s["age"], p
    assert len({s["age"] for s in expected.values()}) > 1  # entries of different ages were compared


def test_a_fresh_adamw_after_loading_starts_every_age_with_its_own_step(tmp_path):
    # a trained adapter (ages > 0) continued with a new optimizer: the moments are new, so the ages restart with them
    model, layer, _ = make(selection="random", reselection_steps=100, accumulation_steps=100)
    target = torch.randn(ROWS, COLS)
    values = layer.sparse_values["default"]
    optimizer = torch.optim.AdamW([values], lr=0.05, weight_decay=0.0)
    for _ in range(3):
        model(target).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert layer.spiel_age["default"].tolist() == [3] * values.numel()
    before = values.detach().clone()
    model(target).backward()
    grad = values.grad.clone()
    fresh = torch.optim.AdamW([values], lr=0.05, weight_decay=0.0)
    fresh.step()
    # first Adam step: m / (1 - b1) = g and sqrt(v / (1 - b2)) = |g|: every entry moves by lr * sign(g)
    torch.testing.assert_close(values.detach(), before - 0.05 * grad / (grad.abs() + 1e-8))
    assert layer.spiel_age["default"].tolist() == [1] * values.numel()


def reselect_by_hand(drop_criterion, values, anchor, **config):
    """One later reselection (k = 0.3 * 10 = 3, T unknown) of a 10-entry random-growth delta with given values."""
    model, layer, _ = make(selection="random", drop_criterion=drop_criterion, initial_reselection_rate=0.3, **config)
    with torch.no_grad():
        layer.sparse_values["default"].copy_(values)
        if drop_criterion == "change_since_reselection":
            layer.spiel_anchor["default"].copy_(anchor)
    before = layer.sparse_indices["default"].clone()
    changed = layer.reselect("default", None, 5)  # S = 3, gamma = 2: 5 = S + gamma, a later reselection
    after = layer.sparse_indices["default"]
    return changed, sorted(torch.nonzero(after != before).squeeze(1).tolist()), layer


VALUES = torch.tensor([0.5, -0.05, 0.4, 0.02, -0.6, 0.3, 0.01, 0.7, -0.2, 0.9])
ANCHOR = torch.tensor([0.49, 0.0, 0.41, -0.5, 0.0, 0.0, 0.6, 0.0, 0.0, 0.0])


def test_drop_criterion_magnitude_drops_the_smallest_values():
    # |phi|: slots 6 (0.01), 3 (0.02), 1 (0.05) are the three smallest
    changed, slots, _ = reselect_by_hand("magnitude", VALUES, ANCHOR)
    assert changed == 3 and slots == [1, 3, 6]


def test_drop_criterion_change_since_reselection_drops_the_smallest_changes():
    # |phi - phi_0| = [0.01, 0.05, 0.01, 0.52, 0.6, 0.3, 0.59, 0.7, 0.2, 0.9]: slots 0, 2 (0.01) and 1 (0.05)
    changed, slots, layer = reselect_by_hand("change_since_reselection", VALUES, ANCHOR)
    assert changed == 3 and slots == [0, 1, 2]
    # phi_0 is reset to the values right after the reselection (grown entries at 0)
    expected = VALUES.clone()
    expected[[0, 1, 2]] = 0
    torch.testing.assert_close(layer.spiel_anchor["default"], expected)


def ma_reselect(regrow_dropped):
    model, layer, _ = make(selection="ma", initial_reselection_rate=0.1, regrow_dropped=regrow_dropped)
    indices = layer.sparse_indices["default"]
    with torch.no_grad():
        layer.sparse_values["default"].copy_(torch.arange(1.0, 11.0))  # slot 0 changed least: dropped
    o, i = divmod(int(indices[0]), COLS)
    layer.spiel_row_stats["default"].fill_(1.0)
    layer.spiel_col_stats["default"].fill_(1.0)
    layer.spiel_row_stats["default"][o] = 10.0  # the dropped position has the largest r[o] * c[i] ...
    layer.spiel_col_stats["default"][i] = 10.0
    before = indices.clone()
    changed = layer.reselect("default", None, 5)  # k = int(0.1 * 10) = 1
    return changed, before, layer.sparse_indices["default"].clone(), (o, i)


def test_ma_growth_excludes_every_active_position_when_asked():
    changed, before, after, (o, i) = ma_reselect(False)
    # ... but it was active at this reselection, so it cannot come back: the best inactive position (row o or
    # column i, score 10) takes slot 0
    assert changed == 1 and after[0] != before[0]
    row, col = divmod(int(after[0]), COLS)
    assert (row == o or col == i) and int(after[0]) not in before.tolist()
    assert torch.equal(after[1:], before[1:])


@pytest.mark.parametrize("regrow_dropped", [None, True])
def test_ma_growth_regrows_the_dropped_position_by_default(regrow_dropped):
    changed, before, after, _ = ma_reselect(regrow_dropped)
    assert changed == 0 and torch.equal(after, before)


def test_regrow_dropped_defaults():
    assert not SpIELConfig(selection="ag").excludes_dropped_from_growth
    assert not SpIELConfig(selection="ma").excludes_dropped_from_growth
    assert SpIELConfig(selection="random").excludes_dropped_from_growth
    assert SpIELConfig(selection="ma", regrow_dropped=False).excludes_dropped_from_growth
    assert not SpIELConfig(selection="random", regrow_dropped=True).excludes_dropped_from_growth
    assert SpIELConfig(selection="ag", regrow_dropped=False).excludes_dropped_from_growth


def strip_entry_state(path):
    from safetensors.torch import load_file, save_file

    file = path / "adapter_model.safetensors"
    tensors = load_file(file)
    old = {k: v for k, v in tensors.items() if "spiel_age" not in k and "spiel_anchor" not in k}
    assert len(old) < len(tensors)
    save_file(old, file)


def _saved_after_six_updates(tmp_path):
    """A random-growth SpIEL layer trained for 6 AdamW updates and saved to ``tmp_path``; (layer, target)."""
    model, layer, _ = make(selection="random")
    target = torch.randn(ROWS, COLS)
    optimizer = torch.optim.AdamW([layer.sparse_values["default"]], lr=0.05)
    for _ in range(6):
        model(target).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert int(layer.spiel_step["default"]) == 6 and int(layer.spiel_age["default"].min()) < 6
    model.save_pretrained(tmp_path)
    return layer, target


def test_adapter_saved_without_ages_loads_with_ages_at_the_update_count(tmp_path):
    layer, target = _saved_after_six_updates(tmp_path)
    strip_entry_state(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Quadratic(), tmp_path, is_trainable=True)
    lin = loaded.base_model.model.lin
    assert torch.equal(lin.sparse_indices["default"], layer.sparse_indices["default"])
    assert torch.equal(lin.sparse_values["default"], layer.sparse_values["default"])
    assert lin.spiel_age["default"].tolist() == [6] * 10 and lin.spiel_age["default"].dtype == torch.int32
    # training continues
    optimizer = torch.optim.AdamW([lin.sparse_values["default"]], lr=0.05)
    loaded(target).backward()
    optimizer.step()
    assert int(lin.spiel_step["default"]) == 7 and lin.spiel_age["default"].tolist() == [1] * 10


def test_adapter_round_trip_keeps_ages(tmp_path):
    layer, _ = _saved_after_six_updates(tmp_path)
    loaded = PeftModel.from_pretrained(Quadratic(), tmp_path, is_trainable=True)
    lin = loaded.base_model.model.lin
    assert torch.equal(lin.spiel_age["default"], layer.spiel_age["default"])
    assert len(set(layer.spiel_age["default"].tolist())) > 1
