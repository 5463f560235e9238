"""SM3 and optimizer-state re-seeding against direct computations."""

import pytest
import torch

from peft_sparse import SM3
from peft_sparse.optim import reseed_optimizer_state


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
