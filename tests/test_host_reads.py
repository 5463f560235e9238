"""Off the CPU, SpIEL's training updates read nothing back on the host.

Reading a value of an accelerator tensor waits for the device. ``peft_sparse._device.host_reads_are_free`` tells the
code where reads are free (the CPU); forcing it to say no on the CPU runs the accelerator's paths here, where
``HostReads`` records every read peft_sparse's code makes. The same training with reads allowed is the reference:
avoiding the reads must not change a single number.
"""

import pytest
import torch
from helpers import HostReads, spiel_layers, tiny_llama, token_batch
from peft import get_peft_model

import peft_sparse
from peft_sparse import SpIELConfig, _device
from peft_sparse.kernels.positions import build_sorted_positions
from peft_sparse.optim import correct_adam_step_for_age
from peft_sparse.selection import grow_by_accumulated_gradient, is_member, place_growth, plan_drop
from peft_sparse.selection.schedule import in_estimation_phase, is_reselection_step

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESELECTION_STEPS, ACCUMULATION_STEPS, UPDATES = 4, 2, 11
PHASE = (RESELECTION_STEPS, ACCUMULATION_STEPS, None)  # in_estimation_phase's arguments after the update


@pytest.fixture
def reads_wait(monkeypatch):
    """Run the code paths of a device whose reads wait for it (an accelerator) on the CPU."""
    monkeypatch.setattr(_device, "host_reads_are_free", lambda device: False)


def build(selection: str, optimizer_name: str, mixed: bool = False, device: str = "cpu"):
    """A tiny Llama with SpIEL on every projection (with ``mixed``: gradient checkpointing on), its trainable
    parameters and an optimizer for them."""
    config = SpIELConfig(
        target_modules=TARGETS,
        match_lora_rank=2,
        selection=selection,
        reselection_steps=RESELECTION_STEPS,
        accumulation_steps=ACCUMULATION_STEPS,
    )
    base = tiny_llama().to(device)
    if mixed:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.train()
    model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name == "sm3":
        return model, params, peft_sparse.SM3(params, lr=1e-2)
    return model, params, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def update_kind(step: int, selection: str) -> str:
    """``"reselection"`` if update ``step`` ends with one, ``"phase start"`` if it starts a SpIEL-AG estimation
    phase, else ``"plain"``."""
    if is_reselection_step(step, RESELECTION_STEPS, None, ACCUMULATION_STEPS):
        return "reselection"
    starts_phase = in_estimation_phase(step, *PHASE) and not in_estimation_phase(step - 1, *PHASE)
    return "phase start" if selection == "ag" and starts_phase else "plain"


def train(selection: str, optimizer_name: str, mixed: bool = False) -> tuple[dict, list[list[tuple[str, str]]], int]:
    """``UPDATES`` updates (with ``mixed``: under bfloat16 autocast, with gradient checkpointing); returns every
    layer's final indices and values, the reads of each update and the number of distinct weight shapes."""
    model, params, optimizer = build(selection, optimizer_name, mixed)
    batch = token_batch(batch=2, length=9)
    reads = []
    for _ in range(UPDATES):
        recorder = HostReads()
        with recorder:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
        reads.append(recorder.reads)
    layers = spiel_layers(model)
    state = {
        name: (layer.sparse_indices["default"].clone(), layer.sparse_values["default"].detach().clone())
        for name, layer in layers.items()
    }
    return state, reads, len({tuple(layer.weight_shape) for layer in layers.values()})


@pytest.mark.parametrize(
    "selection, optimizer_name, mixed",
    [("ag", "adamw", False), ("random", "adamw", False), ("ma", "sm3", False), ("ma", "adamw", False)]
    + [("ag", "adamw", True)],  # bfloat16 autocast (a fresh W + delta per product) and gradient checkpointing
)
def test_updates_read_nothing_off_the_cpu_and_train_the_same(selection, optimizer_name, mixed, monkeypatch):
    expected, cpu_reads, _ = train(selection, optimizer_name, mixed)
    assert any(cpu_reads), "the CPU paths read on the host (else this test would show nothing)"
    monkeypatch.setattr(_device, "host_reads_are_free", lambda device: False)
    got, reads, shapes = train(selection, optimizer_name, mixed)
    adapters = len(got)
    assert adapters == 2 * len(TARGETS)
    for step, update_reads in enumerate(reads, start=1):
        kind = update_kind(step, selection)
        if kind == "reselection":
            # how many grown positions are new (one read per adapter); SpIEL-MA's growth of all adapters at once a
            # few per distinct weight shape and one for its checks
            limit = {"ag": adapters, "random": adapters, "ma": adapters + 4 * shapes + 1}[selection]
            assert len(update_reads) <= limit, (step, update_reads)
        elif kind == "phase start":
            # SpIEL-AG's candidates, once per estimation phase: the top-k of a dense gradient, cut at a threshold
            assert len(update_reads) <= 2 * adapters, (step, update_reads)
        else:
            assert update_reads == [], (step, update_reads)
    for name, (indices, values) in expected.items():
        assert torch.equal(got[name][0], indices), name
        assert torch.equal(got[name][1], values), name


@pytest.mark.parametrize("lr", [1e-2, torch.tensor(1e-2)], ids=["float-lr", "tensor-lr"])
def test_adam_age_correction_reads_nothing_off_the_cpu_and_matches_the_cpu_path(lr, monkeypatch):
    torch.manual_seed(0)
    ages = torch.tensor([12] * 300 + [3] * 200 + [7] * 100 + [13] * 50, dtype=torch.int32)
    param = torch.nn.Parameter(torch.randn(ages.numel()))
    opt = torch.optim.AdamW([param], lr=lr, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)
    for _ in range(13):
        param.grad = torch.randn(ages.numel())
        opt.step()
    twin = torch.nn.Parameter(param.detach().clone())
    twin_opt = torch.optim.AdamW([twin], lr=lr, betas=(0.9, 0.99), weight_decay=0.1, foreach=False)
    twin_opt.load_state_dict(opt.state_dict())
    assert correct_adam_step_for_age(opt, param, ages)  # the CPU: the range of ages read, one table of coefficients
    monkeypatch.setattr(_device, "host_reads_are_free", lambda device: False)
    recorder = HostReads()
    with recorder:
        assert correct_adam_step_for_age(twin_opt, twin, ages)  # coefficients per entry, the step's as a tensor
    assert recorder.reads == []
    assert torch.equal(twin.detach(), param.detach())
    # every age equal to the step: the CPU skips the correction, the other path adds exactly zero
    same = twin.detach().clone()
    assert correct_adam_step_for_age(twin_opt, twin, torch.full_like(ages, 13))
    assert torch.equal(twin.detach(), same)


def test_drop_and_growth_plans_read_at_most_once_off_the_cpu(reads_wait):
    gen = torch.Generator().manual_seed(5)
    numel = 50_000
    indices = torch.randperm(numel, generator=gen)[:4_000].int()
    values = torch.randn(4_000, generator=gen)
    recorder = HostReads()
    with recorder:
        drop, excluded = plan_drop(indices, values, 1_500)
        dropped = indices[drop].long()
        # growth: 500 of the dropped positions again, 1,000 new ones
        free = torch.ones(numel, dtype=torch.bool)
        free[indices.long()] = False
        new = free.nonzero().squeeze(1)[torch.randperm(int(free.sum()), generator=gen)[:1_000]]
        grown = torch.cat([dropped[torch.randperm(1_500, generator=gen)[:500]], new])
        recorder.reads.clear()  # the test's own reads
        slots, new_positions, chosen = place_growth(indices, drop, grown)
    assert recorder.reads == [("_local_scalar_dense", recorder.reads[0][1])]  # the count of new positions
    kept = torch.ones(4_000, dtype=torch.bool)
    kept[drop] = False
    assert torch.equal(excluded, indices[kept].long().sort().values)
    regrown = torch.isin(grown, dropped)
    assert torch.equal(new_positions, grown[~regrown]) and torch.equal(chosen, grown[~regrown])
    assert torch.equal(slots, drop[~torch.isin(dropped, grown)][: new_positions.numel()])
    # SpIEL-AG's growth among as many distinct candidates as entries: at least k are allowed, nothing is read
    candidates = torch.randperm(numel, generator=gen)[:4_000]
    recorder.reads.clear()
    with recorder:
        chosen = grow_by_accumulated_gradient(candidates, torch.randn(4_000, generator=gen), excluded, 1_500)
    assert recorder.reads == [] and chosen.numel() == 1_500
    assert not torch.isin(candidates[chosen], excluded).any()
    with pytest.raises(ValueError, match="growth chose 1501 positions for 1500 dropped slots"):
        place_growth(indices, drop, torch.arange(1_501) + numel)


def test_membership_and_row_pointers_read_nothing_off_the_cpu(reads_wait):
    gen = torch.Generator().manual_seed(6)
    members = torch.randint(0, 100_000, (3_000,), generator=gen).unique()
    query = torch.randint(0, 100_000, (2_000,), generator=gen)
    positions = torch.randperm(64 * 48, generator=gen)[:300]
    recorder = HostReads()
    with recorder:
        hit = is_member(members, query)  # the size the CPU answers with a table
        order = build_sorted_positions(positions, 64, 48)
    assert recorder.reads == []
    assert torch.equal(hit, torch.isin(query, members))
    rows = positions.sort().values // 48
    assert torch.equal(
        order.crow, torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(rows, minlength=64).cumsum(0)])
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("selection, optimizer_name", [("ag", "adamw"), ("random", "adamw"), ("ma", "sm3")])
def test_cuda_updates_do_not_synchronize(selection, optimizer_name):
    # on a real device: torch raises on any synchronisation during the updates that neither reselect nor start an
    # estimation phase (the first update is left free: the value gradient's strategy is timed once per shape)
    model, params, optimizer = build(selection, optimizer_name, device="cuda")
    batch = token_batch(batch=2, length=9).cuda()
    checked = 0
    for step in range(1, UPDATES + 1):
        quiet = step > 1 and update_kind(step, selection) == "plain"
        torch.cuda.set_sync_debug_mode("error" if quiet else "default")
        try:
            model(input_ids=batch, labels=batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked += quiet
    assert checked >= 4
