"""SM3 and optimizer-state re-seeding against direct computations."""

import copy

import pytest
import torch

from peft_sparse import SM3, _device
from peft_sparse.optim import correct_adam_step_for_age, reseed_optimizer_state, sm3_accumulate


def sm3_dense_reference(param, grads, lr, eps=1e-30):
    """SM3-II on a 2-D tensor written with explicit loops."""
    p = param.clone().double()
    rows, cols = p.shape
    r, c = [0.0] * rows, [0.0] * cols
    for g in grads:
        nu = [[min(r[o], c[i]) + float(g[o, i]) ** 2 for i in range(cols)] for o in range(rows)]
        r = [max(nu[o]) for o in range(rows)]
        c = [max(nu[o][i] for o in range(rows)) for i in range(cols)]
        for o in range(rows):
            for i in range(cols):
                p[o, i] -= lr * float(g[o, i]) / (nu[o][i] ** 0.5 + eps)
    return p.float(), torch.tensor(r), torch.tensor(c)


def test_sm3_matches_reference_on_a_dense_matrix():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5, 7))
    grads = [torch.randn(5, 7) for _ in range(3)]
    expected, r, c = sm3_dense_reference(param.detach(), grads, lr=0.1)
    opt = SM3([param], lr=0.1)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[param]["row_accumulator"], r)
    torch.testing.assert_close(opt.state[param]["col_accumulator"], c)


def test_sm3_vector_momentum_and_weight_decay():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = SM3([param], lr=0.5, momentum=0.5, weight_decay=0.1)
    param.grad = torch.tensor([2.0, 1.0])
    opt.step()
    # nu = g^2, update = g/|g| = sign(g); momentum buffer = 0.5 * sign(g); decay first
    expected = torch.tensor([1.0, -2.0]) * (1 - 0.05) - 0.5 * 0.5 * torch.tensor([1.0, 1.0])
    torch.testing.assert_close(param.detach(), expected)


def sm3_masked_reference(rows, cols, steps):
    """SM3-II accumulators over a full matrix where only masked entries exist, with explicit loops.

    ``steps``: list of (mask, grad) over the full matrix. nu = min(r, c) + g^2 at each masked entry; every row and
    column accumulator becomes the max of itself and the nu of its masked entries.
    """
    r, c = [0.0] * rows, [0.0] * cols
    nus = []
    for mask, g in steps:
        nu = {}
        for o in range(rows):
            for i in range(cols):
                if mask[o, i]:
                    nu[o, i] = min(r[o], c[i]) + float(g[o, i]) ** 2
        r = [max([r[o]] + [v for (oo, _), v in nu.items() if oo == o]) for o in range(rows)]
        c = [max([c[i]] + [v for (_, ii), v in nu.items() if ii == i]) for i in range(cols)]
        nus.append(nu)
    return torch.tensor(r), torch.tensor(c), nus


def test_sm3_accumulate_is_sm3_ii_across_a_reselection():
    torch.manual_seed(1)
    rows, cols = 6, 5
    first = torch.randperm(rows * cols)[:8]
    second = torch.cat([first[:3], torch.randperm(rows * cols)[:5]]).unique()  # positions change in between
    steps = []
    for positions, n in ((first, 3), (second, 3)):
        mask = torch.zeros(rows * cols, dtype=torch.bool)
        mask[positions] = True
        for _ in range(n):
            steps.append((mask.view(rows, cols), torch.randn(rows, cols) * 3))
    r_ref, c_ref, nus = sm3_masked_reference(rows, cols, steps)
    row_acc, col_acc = torch.zeros(rows), torch.zeros(cols)
    for (mask, g), nu_ref in zip(steps, nus):
        flat = mask.reshape(-1).nonzero().squeeze(1)
        nu = sm3_accumulate(row_acc, col_acc, flat // cols, flat % cols, g.reshape(-1)[flat])
        torch.testing.assert_close(nu, torch.tensor([nu_ref[int(p) // cols, int(p) % cols] for p in flat]))
    torch.testing.assert_close(row_acc, r_ref)
    torch.testing.assert_close(col_acc, c_ref)


def test_sm3_accumulators_never_decrease_when_an_entry_moves():
    # hand-computed: (0, 0) with g = 3 gives r0 = c0 = 9; then only (0, 1) with g = 1: nu = min(9, 0) + 1 = 1,
    # and r0 stays max(9, 1) = 9 (SM3-II), c1 becomes 1
    row_acc, col_acc = torch.zeros(2), torch.zeros(2)
    sm3_accumulate(row_acc, col_acc, torch.tensor([0]), torch.tensor([0]), torch.tensor([3.0]))
    nu = sm3_accumulate(row_acc, col_acc, torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]))
    assert nu.tolist() == [1.0] and row_acc.tolist() == [9.0, 0.0] and col_acc.tolist() == [9.0, 1.0]


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("momentum", 1.0), ("weight_decay", -1.0), ("eps", -1.0)])
def test_sm3_rejects_bad_hyperparameters(field, value):
    kwargs = {"lr": 0.1, field: value}
    with pytest.raises(ValueError, match=field):
        SM3([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_adam_moments_are_seeded_to_bias_corrected_estimates():
    param = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([param], lr=0.1, betas=(0.8, 0.9), amsgrad=True)
    for _ in range(3):
        param.grad = torch.ones(4)
        opt.step()
    slots = torch.tensor([1, 3])
    reseed_optimizer_state(opt, param, slots, torch.tensor([0.5, -0.25]), torch.tensor([0.3, 0.1]))
    state = opt.state[param]
    torch.testing.assert_close(state["exp_avg"][slots] / (1 - 0.8**3), torch.tensor([0.5, -0.25]))
    torch.testing.assert_close(state["exp_avg_sq"][slots] / (1 - 0.9**3), torch.tensor([0.3, 0.1]))
    torch.testing.assert_close(state["max_exp_avg_sq"][slots], state["exp_avg_sq"][slots])
    untouched = torch.ones(2) * (1 - 0.8**3)
    torch.testing.assert_close(state["exp_avg"][torch.tensor([0, 2])], untouched)
    reseed_optimizer_state(opt, param, slots)
    assert state["exp_avg"][slots].abs().sum() == 0 and state["exp_avg_sq"][slots].abs().sum() == 0


def test_other_optimizers_have_per_entry_state_reset():
    param = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(4)
    opt.step()
    reseed_optimizer_state(opt, param, torch.tensor([0, 2]))
    assert opt.state[param]["momentum_buffer"].tolist() == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "ages",
    [
        # many entries, few distinct ages (one correction per age, gathered), one of them older than the step count
        [12] * 300 + [3] * 200 + [7] * 100 + [40] * 10,
        # fewer entries than distinct ages (corrections per entry)
        [1, 12, 2, 40, 11],
    ],
    ids=["per-age-table", "per-entry"],
)
@pytest.mark.parametrize("reads_free", [True, False], ids=["cpu-paths", "accelerator-paths"])
def test_adam_step_is_redone_with_each_entrys_own_bias_correction(ages, reads_free, monkeypatch):
    # accelerator-paths: the coefficients per entry, the step's as a tensor, nothing read on the host
    monkeypatch.setattr(_device, "host_reads_are_free", lambda device: reads_free)
    torch.manual_seed(0)
    lr, wd, (beta1, beta2), eps = 1e-2, 0.1, (0.9, 0.99), 1e-8
    param = torch.nn.Parameter(torch.randn(len(ages)))
    opt = torch.optim.AdamW([param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    for _ in range(12):
        param.grad = torch.randn(len(ages))
        opt.step()
    before = param.detach().double().clone()
    twin = torch.nn.Parameter(param.detach().clone())
    twin_opt = torch.optim.AdamW([twin], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    param.grad = torch.randn(len(ages))
    twin.grad = param.grad.clone()
    opt.step()
    twin_opt.step()  # torch's own update, left uncorrected
    age = torch.tensor(ages, dtype=torch.int32) + 1  # counting the step just made
    assert correct_adam_step_for_age(opt, param, age)
    state = opt.state[param]
    m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
    expected = []
    for n, a in enumerate(age.tolist()):
        step = lr * (m[n] / (1 - beta1**a)) / ((v[n] / (1 - beta2**a)).sqrt() + eps)
        expected.append(before[n] * (1 - lr * wd) - step)
    torch.testing.assert_close(param.detach().double(), torch.stack(expected), rtol=1e-6, atol=1e-9)
    at_step = age == 13
    # entries as old as the optimizer's step keep torch's update bit for bit; the others moved
    assert torch.equal(param.detach()[at_step], twin.detach()[at_step])
    assert (param.detach()[~at_step] != twin.detach()[~at_step]).all()


def test_age_correction_leaves_entries_as_old_as_the_step_alone():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(50))
    opt = torch.optim.AdamW([param], lr=1e-2)
    for _ in range(4):
        param.grad = torch.randn(50)
        opt.step()
    before = param.detach().clone()
    # every entry as old as the optimizer's step count: nothing to redo
    assert not correct_adam_step_for_age(opt, param, torch.full((50,), 4, dtype=torch.int64))
    assert torch.equal(param.detach(), before)
    # an optimizer without Adam's moments is left alone
    sgd_param = torch.nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([sgd_param], lr=0.1)
    sgd_param.grad = torch.ones(3)
    sgd.step()
    assert not correct_adam_step_for_age(sgd, sgd_param, torch.tensor([0, 1, 1]))
    assert torch.equal(sgd_param.detach(), torch.full((3,), 0.9))
