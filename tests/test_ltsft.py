"""LT-SFT: exact selection, rewinding, the sparse phase, L1, the Trainer recipe, save/load/merge.

Every number is checked against an independent dense PyTorch computation.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_gpt2, tiny_llama, tiny_llama_classifier, token_batch
from ltsft_helpers import (
    batches,
    brute_force_topk,
    effective,
    rebuild,
    targeted,
    tiny_bert_mlm,
)
from peft import PeftModel, get_peft_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import peft_sparse
from peft_sparse import LTSFTConfig
from peft_sparse.selection import ChangeSource, allocate_budgets, largest_changes, largest_changes_per_tensor


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: a second intra-op thread only adds contention on a busy 2-core machine
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------- top-K selection
def _reference_scores(sources: list[ChangeSource]) -> list[torch.Tensor]:
    out = []
    for s in sources:
        d = (s.current.float() - s.reference.float()).abs().reshape(-1).clone()
        if s.excluded is not None and s.excluded.numel():
            d[s.excluded.long()] = float("-inf")
        out.append(d)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_largest_changes_is_exact_with_ties_and_exclusions(seed):
    generator = torch.Generator().manual_seed(seed)
    sources = []
    for i in range(4):
        shape = (
            int(torch.randint(1, 30, (1,), generator=generator)),
            int(torch.randint(1, 9, (1,), generator=generator)),
        )
        before = torch.randn(shape, generator=generator)
        after = before.clone()
        moved = torch.rand(shape, generator=generator) < 0.6
        steps = torch.randint(-3, 4, shape, generator=generator).float() * 0.25  # few distinct values: many ties
        after[moved] += steps[moved]
        excluded = torch.randperm(before.numel(), generator=generator)[: before.numel() // 5] if i % 2 else None
        sources.append(ChangeSource(after, before, excluded))
    available = sum(s.numel - s.num_excluded for s in sources)
    for k in (0, 1, available // 3, available // 2 + 1, available):
        expected = brute_force_topk(_reference_scores(sources), k)
        for chunk, sample in ((5, 8), (7, 1 << 20), (1 << 20, 3)):  # tiny samples force several rounds
            got = largest_changes(sources, k, chunk_size=chunk, sample_size=sample, seed=seed)
            assert got.count == k
            for g, e in zip(got.indices, expected):
                assert torch.equal(g.cpu(), e), (k, chunk, sample)


def test_largest_changes_threshold_and_errors():
    before = torch.zeros(10)
    after = torch.tensor([0.0, 3.0, 1.0, 1.0, 2.0, 1.0, 0.0, 0.5, 1.0, 0.0])
    got = largest_changes([ChangeSource(after, before)], 4)
    assert got.indices[0].tolist() == [1, 2, 3, 4]  # 3, 2, then the first two of the four 1.0s
    assert got.threshold == 1.0 and got.ties == 2
    with pytest.raises(ValueError, match="only 10 positions"):
        largest_changes([ChangeSource(after, before)], 11)
    with pytest.raises(ValueError, match="NaN"):
        largest_changes([ChangeSource(torch.tensor([1.0, float("nan")]), torch.zeros(2))], 1)
    with pytest.raises(ValueError, match="shape"):
        ChangeSource(torch.zeros(3), torch.zeros(4))


def test_largest_changes_per_tensor_matches_reference():
    torch.manual_seed(0)
    sources = [ChangeSource(torch.randn(5, 7), torch.zeros(5, 7)), ChangeSource(torch.randn(11), torch.zeros(11))]
    budgets = allocate_budgets([(35, 1), (11, 1)], num_tunable_weights=9)
    got = largest_changes_per_tensor(sources, budgets)
    for g, s, b in zip(got.indices, sources, budgets):
        assert torch.equal(g, brute_force_topk([s.current.abs()], b)[0])


# --------------------------------------------------------------------------------------------- targets and phases
def test_default_targets_are_the_base_model_without_norms_or_head():
    model = get_peft_model(tiny_bert_mlm(), LTSFTConfig(num_tunable_weights=100, untie_output_embeddings=True))
    targets = set(model.peft_config["default"].target_modules)
    assert {
        "bert.embeddings.word_embeddings",
        "bert.embeddings.position_embeddings",
        "bert.embeddings.token_type_embeddings",
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.1.output.dense",
    } <= targets
    assert not any("LayerNorm" in t or t.startswith("cls.") for t in targets)
    # tied to the MLM decoder: left out unless untied
    tied = get_peft_model(tiny_bert_mlm(), LTSFTConfig(num_tunable_weights=100))
    assert set(tied.peft_config["default"].target_modules) == targets - {"bert.embeddings.word_embeddings"}
    llama = get_peft_model(tiny_llama(), LTSFTConfig(num_tunable_weights=100))
    assert "model.embed_tokens" in llama.peft_config["default"].target_modules
    assert "lm_head" not in llama.peft_config["default"].target_modules


def test_dense_phase_trains_targets_and_heads_only_then_sparse_phase_trains_values_only():
    model = get_peft_model(tiny_llama_classifier(), LTSFTConfig(num_tunable_weights=300, modules_to_save=["score"]))
    tuner = model.base_model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.base_layer.weight" in n for n in trainable)
    assert any("modules_to_save.default" in n for n in trainable)
    assert not any("norm" in n for n in trainable)
    assert peft_sparse.ltsft.current_phase(model).dense
    with torch.no_grad():
        for _, layer, kind in targeted(model):
            layer.base_tensor(kind).add_(torch.randn_like(layer.base_tensor(kind)))
    peft_sparse.ltsft.select_and_rewind(model, verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("ltsft_values" in n or "ltsft_bias_values" in n or "modules_to_save" in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if "ltsft_" in n and p.requires_grad) == 300
    assert tuner.phase("default") == "sparse"


def _train(model, steps, optimizer, seed=0, batch_fn=token_batch):
    model.train()
    for i in range(steps):
        ids = batch_fn(seed + i)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_selection_is_the_exact_global_topk_and_rewind_is_bit_exact():
    base = tiny_bert_mlm()
    theta0 = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, LTSFTConfig(num_tunable_weights=257, modules_to_save=["cls.predictions.transform"]))
    _train(
        model,
        3,
        torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.1),
        batch_fn=lambda i: batches(1, seed=i)[0],
    )
    entries = targeted(model)
    theta1 = [layer.base_tensor(kind).detach().clone() for _, layer, kind in entries]
    reference = [layer.theta0("default", kind) for _, layer, kind in entries]
    expected = brute_force_topk([(a - b).abs() for a, b in zip(theta1, reference)], 257)
    report = peft_sparse.ltsft.select_and_rewind(model, verbose=False)
    assert report.selected == 257 and report.total == 257
    for (name, layer, kind), exp in zip(entries, expected):
        assert torch.equal(layer.deltas_of("default")[kind][0].long(), exp), f"{name}.{kind}"
        assert not layer.deltas_of("default")[kind][1].any()  # phase 2 starts at theta0
    # every base tensor and the head are back at theta0, bit for bit
    state = {
        k.replace(".base_layer", "").replace(".original_module", ""): v
        for k, v in model.base_model.model.state_dict().items()
    }
    for key, value in theta0.items():
        assert torch.equal(state[key], value), key
    head = model.base_model.model.cls.predictions.transform.modules_to_save["default"]
    for key, value in head.state_dict().items():
        assert torch.equal(value, theta0[f"cls.predictions.transform.{key}"]), key


def test_per_tensor_scope_selects_the_same_fraction_of_each_tensor():
    model = get_peft_model(tiny_llama(), LTSFTConfig(density=0.05, selection_scope="per_tensor"))
    with torch.no_grad():
        for _, layer, kind in targeted(model):
            layer.base_tensor(kind).add_(torch.randn_like(layer.base_tensor(kind)))
    entries = targeted(model)
    diffs = [(layer.base_tensor(kind) - layer.theta0("default", kind)).abs() for _, layer, kind in entries]
    budget = model.base_model.ltsft_state["default"].budget
    budgets = allocate_budgets([(d.numel(), 1) for d in diffs], num_tunable_weights=budget)
    peft_sparse.ltsft.select_and_rewind(model, verbose=False)
    for (_, layer, kind), d, b in zip(entries, diffs, budgets):
        assert torch.equal(layer.deltas_of("default")[kind][0].long(), brute_force_topk([d], b)[0])


def test_sparse_phase_changes_only_selected_entries_even_with_weight_decay():
    base = tiny_bert_mlm()
    model = get_peft_model(base, LTSFTConfig(num_tunable_weights=200))
    _train(model, 2, torch.optim.AdamW(_trainable(model), lr=1e-2), batch_fn=lambda i: batches(1, seed=i)[0])
    peft_sparse.ltsft.select_and_rewind(model, verbose=False)
    theta0 = {n: p.detach().clone() for n, p in model.base_model.model.named_parameters() if "ltsft_" not in n}
    _train(
        model,
        4,
        torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.5),
        batch_fn=lambda i: batches(1, seed=10 + i)[0],
    )
    for name, param in model.base_model.model.named_parameters():
        if "ltsft_" not in name:
            assert torch.equal(param, theta0[name]), name  # the base never moves
    for name, layer, kind in targeted(model):
        indices, _values = layer.deltas_of("default")[kind]
        merged = effective(layer, kind).reshape(-1)
        untouched = torch.ones(merged.numel(), dtype=torch.bool)
        untouched[indices.long()] = False
        assert torch.equal(merged[untouched], layer.base_tensor(kind).reshape(-1)[untouched].float()), name
    assert (
        sum(int(v.ne(0).sum()) for _, layer, kind in targeted(model) for v in [layer.deltas_of("default")[kind][1]])
        > 0
    )


def test_final_adapter_equals_dense_masked_training():
    """theta0 + phi equals a dense model trained with masked gradients (plain SGD, so masking is exact)."""
    base = tiny_bert_mlm()
    reference = rebuild(base)
    model = get_peft_model(base, LTSFTConfig(num_tunable_weights=300))
    _train(model, 2, torch.optim.SGD(_trainable(model), lr=0.5), batch_fn=lambda i: batches(1, seed=i)[0])
    peft_sparse.ltsft.select_and_rewind(model, verbose=False)
    masks = {}
    for name, layer, kind in targeted(model):
        mask = torch.zeros(layer.base_tensor(kind).numel(), dtype=torch.bool)
        mask[layer.deltas_of("default")[kind][0].long()] = True
        masks[f"{name}.{kind}"] = mask.view_as(layer.base_tensor(kind))
    params = dict(reference.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in masks)
    ref_opt = torch.optim.SGD([params[n] for n in masks], lr=0.5)
    opt = torch.optim.SGD(_trainable(model), lr=0.5)
    model.train()
    reference.train()
    for i in range(3):
        ids = batches(1, seed=20 + i)[0]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        reference(input_ids=ids, labels=ids).loss.backward()
        for name, mask in masks.items():
            params[name].grad *= mask
        ref_opt.step()
        ref_opt.zero_grad()
    for name, layer, kind in targeted(model):
        torch.testing.assert_close(effective(layer, kind), params[f"{name}.{kind}"].detach(), rtol=0, atol=2e-6)


# --------------------------------------------------------------------------------------------- L1
def _base_state(model) -> dict:
    """The wrapped model's base weights under the plain model's keys."""
    return {
        k.replace(".base_layer", ""): v.clone()
        for k, v in model.base_model.model.state_dict().items()
        if "ltsft_" not in k
    }


def _l1_reference_grads(perturbed, micro_batches, items_mode):
    """Dense reference: the task loss over the whole accumulated batch, on a plain model."""
    ref = tiny_llama()
    ref.load_state_dict(perturbed)
    ref.train()
    if items_mode:  # token-mean over every micro-batch together
        logits = [ref(input_ids=ids).logits for ids in micro_batches]
        losses = [
            F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            for lg, ids in zip(logits, micro_batches)
        ]
        task = sum(losses) / sum(ids[:, 1:].numel() for ids in micro_batches)
    else:  # mean of the micro-batch means
        task = sum(ref(input_ids=ids, labels=ids).loss for ids in micro_batches) / len(micro_batches)
    return ref, task


@pytest.mark.parametrize("items_mode", [False, True])
def test_dense_l1_gradient_matches_reference_with_gradient_accumulation(items_mode):
    base = tiny_llama()
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}
    lam = 5.0
    model = get_peft_model(base, LTSFTConfig(num_tunable_weights=100, dense_l1_reg=lam))
    n_params = sum(p.numel() for p in theta0.values())
    assert model.base_model.ltsft_state["default"].num_model_parameters == n_params
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # theta != theta0, so the L1 term has a gradient
        for _, layer, kind in targeted(model):
            layer.base_tensor(kind).add_(torch.randn(layer.base_tensor(kind).shape, generator=generator) * 0.01)
    perturbed = _base_state(model)
    micro = [token_batch(1), token_batch(2)]
    model.train()
    total_items = sum(ids[:, 1:].numel() for ids in micro)
    for ids in micro:
        if items_mode:
            model(input_ids=ids, labels=ids, num_items_in_batch=total_items).loss.backward()
        else:
            (model(input_ids=ids, labels=ids).loss / len(micro)).backward()
    ref, task = _l1_reference_grads(perturbed, micro, items_mode)
    reg = sum(
        (p - theta0[n]).abs().sum()
        for n, p in ref.named_parameters()
        if n.rsplit(".", 1)[0] in model.peft_config["default"].target_modules
    )
    (task + lam / n_params * reg).backward()
    ref_params = dict(ref.named_parameters())
    for name, layer, kind in targeted(model):
        torch.testing.assert_close(
            layer.base_tensor(kind).grad, ref_params[f"{name}.{kind}"].grad, rtol=1e-5, atol=1e-7
        )


def test_l1_term_is_scaled_with_the_loss_by_a_grad_scaler():
    """fp16 training scales the loss; the L1 term is part of it, so unscaled gradients are unchanged."""
    grads = []
    for scaled in (False, True):
        model = get_peft_model(tiny_llama(), LTSFTConfig(num_tunable_weights=10, dense_l1_reg=50.0))
        with torch.no_grad():
            for _, layer, kind in targeted(model):
                layer.base_tensor(kind).add_(0.01)
        params = _trainable(model)
        optimizer = torch.optim.SGD(params, lr=0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
        model.train()
        ids = token_batch(0)
        scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
        scaler.unscale_(optimizer)
        grads.append([p.grad.clone() for p in params])
    for plain, unscaled in zip(*grads):
        torch.testing.assert_close(unscaled, plain, rtol=1e-5, atol=1e-8)


def test_sparse_l1_is_on_the_values_and_autocast_bf16_keeps_it_float32():
    model = get_peft_model(tiny_llama(), LTSFTConfig(num_tunable_weights=50, sparse_l1_reg=2.0))
    peft_sparse.ltsft.select_and_rewind(model, verbose=False)
    tuner = model.base_model
    n_params = tuner.ltsft_state["default"].num_model_parameters
    with torch.no_grad():
        for _, layer, kind in targeted(model):
            layer.deltas_of("default")[kind][1].normal_()
    values = [layer.deltas_of("default")[kind][1] for _, layer, kind in targeted(model)]
    expected = 2.0 / n_params * sum(v.abs().sum() for v in values)
    torch.testing.assert_close(peft_sparse.ltsft.l1_penalty(model), expected)
    model.train()
    ids = token_batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert out.loss.dtype == torch.float32 and tuner.last_l1_penalty.dtype == torch.float32
    torch.testing.assert_close(tuner.last_l1_penalty, expected.detach())
    out.loss.backward()
    for v in values:
        if v.numel():
            assert v.grad is not None and v.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():  # evaluation losses are the task loss alone
        evaluated = model(input_ids=ids, labels=ids).loss
        task = F.cross_entropy(model(input_ids=ids).logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(evaluated, task)


# --------------------------------------------------------------------------------------------- Trainer
class _Tokens(Dataset):
    def __init__(self, count: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 64, (count, 8), generator=generator)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path, name, **overrides):
    kwargs = {
        "output_dir": str(tmp_path / name),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def test_trainer_two_phase_recipe_with_l1_and_gradient_accumulation(tmp_path, capsys):
    base = tiny_llama()
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}
    lam = 3.0
    model = get_peft_model(base, LTSFTConfig(num_tunable_weights=120, dense_l1_reg=lam, sparse_l1_reg=lam))
    with torch.no_grad():
        for _, layer, kind in targeted(model):
            layer.base_tensor(kind).add_(0.01)
    perturbed = _base_state(model)
    data = _Tokens(4)
    captured = {}

    logged = []

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs))

    dense = Trainer(
        model=model,
        args=_args(tmp_path, "dense", gradient_accumulation_steps=2, max_grad_norm=0.0, max_steps=1),
        train_dataset=data,
        callbacks=[Capture()],
    )
    dense.train()
    # reference: the step's 4 sequences as one token-mean loss plus the L1 term, counted once
    ref = tiny_llama()
    ref.load_state_dict(perturbed)
    ref.train()
    logits = ref(input_ids=data.ids).logits
    task = F.cross_entropy(logits[:, :-1].reshape(-1, 64), data.ids[:, 1:].reshape(-1))
    targets = model.peft_config["default"].target_modules
    reg = sum((p - theta0[n]).abs().sum() for n, p in ref.named_parameters() if n.rsplit(".", 1)[0] in targets)
    n_params = model.base_model.ltsft_state["default"].num_model_parameters
    (task + lam / n_params * reg).backward()
    ref_params = dict(ref.named_parameters())
    for name, grad in captured.items():
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        torch.testing.assert_close(grad, ref_params[key].grad, rtol=1e-4, atol=1e-7)
    assert logged[0]["ltsft_phase"] == 1 and logged[0]["ltsft_l1"] > 0

    report = peft_sparse.ltsft.select_and_rewind(model)
    assert report.selected == 120
    with pytest.raises(ValueError, match="fresh optimizer"):
        dense.train()  # the old optimizer holds the dense weights, not the values
    sparse = Trainer(model=model, args=_args(tmp_path, "sparse", weight_decay=0.1), train_dataset=data)
    sparse.train()
    out = capsys.readouterr().out
    assert "dense phase, iteration 1/1" in out and "sparse phase, iteration 1/1" in out and "LT-SFT selection" in out
    assert any(v.ne(0).any() for _, layer, kind in targeted(model) for v in [layer.deltas_of("default")[kind][1]])
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(rebuild(tiny_llama()), tmp_path / "adapter").eval()
    ids = token_batch(5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=0, atol=0)


def test_phases_iterator_runs_n_iterations_and_accumulates_the_mask(tmp_path):
    base = tiny_llama()
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LTSFTConfig(num_tunable_weights=101, n_iterations=2))
    seen, first = [], None
    for phase in peft_sparse.ltsft.phases(model, verbose=False):
        seen.append((phase.phase, phase.iteration))
        if phase.dense and phase.iteration == 2:
            # iteration 2 starts from theta0 + phi: the deltas of iteration 1 were added into the base
            for _, layer, kind in targeted(model):
                expected = layer.theta0("default", kind).clone().reshape(-1)
                indices, values = layer.deltas_of("default")[kind]
                expected[indices.long()] += values.detach()
                assert torch.equal(layer.base_tensor(kind).detach().reshape(-1), expected)
        Trainer(
            model=model, args=_args(tmp_path, f"{phase.phase}{phase.iteration}", max_steps=2), train_dataset=_Tokens(4)
        ).train()
        if not phase.dense and phase.iteration == 1:
            first = {
                f"{n}.{k}": (m.deltas_of("default")[k][0].clone(), m.deltas_of("default")[k][1].detach().clone())
                for n, m, k in targeted(model)
            }
            assert sum(i.numel() for i, _ in first.values()) == 50
    assert seen == [("dense", 1), ("sparse", 1), ("dense", 2), ("sparse", 2)]
    total = 0
    for name, layer, kind in targeted(model):
        indices, _ = layer.deltas_of("default")[kind]
        assert torch.unique(indices).numel() == indices.numel()
        assert torch.isin(first[f"{name}.{kind}"][0], indices).all()
        total += indices.numel()
    assert total == 101
    state = {
        k.replace(".base_layer", ""): v for k, v in model.base_model.model.state_dict().items() if "ltsft_" not in k
    }
    for key, value in theta0.items():
        assert torch.equal(state[key], value), key
    with pytest.raises(ValueError, match="finished all"):
        peft_sparse.ltsft.start_dense_phase(model)


def test_dense_phase_after_a_forward_without_backward_starts_from_theta0_plus_phi():
    # a sparse-phase forward with gradients leaves its deltas merged in the base weights for the backward; starting
    # the next dense phase must see the base weights, not W + delta, and add phi exactly once
    model = get_peft_model(tiny_llama(), LTSFTConfig(density=0.05, selection_scope="per_tensor", n_iterations=2))
    peft_sparse.ltsft.select_and_rewind(model, verbose=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer, kind in targeted(model):
            values = layer.deltas_of("default")[kind][1]
            values.copy_(torch.randn(values.shape, generator=gen))
    base = {(name, kind): layer.base_tensor(kind).detach().clone() for name, layer, kind in targeted(model)}
    model.train()
    out = model(input_ids=token_batch()).logits  # kept alive, no backward
    assert any(not torch.equal(layer.base_tensor(kind), base[name, kind]) for name, layer, kind in targeted(model))
    peft_sparse.ltsft.start_dense_phase(model)
    for name, layer, kind in targeted(model):
        assert torch.equal(layer.theta0("default", kind), base[name, kind]), (name, kind)
        expected = base[name, kind].clone().reshape(-1)
        indices, values = layer.deltas_of("default")[kind]
        expected[indices.long()] += values.detach()
        assert torch.equal(layer.base_tensor(kind).detach().reshape(-1), expected), (name, kind)
    del out
    for name, layer, kind in targeted(model):  # freeing the graph later changes nothing
        assert torch.equal(layer.theta0("default", kind), base[name, kind]), (name, kind)


# --------------------------------------------------------------------------------------------- saving, merging
@pytest.mark.parametrize("builder", ["gpt2", "bert"])
def test_save_load_merge_unmerge(tmp_path, builder):
    base = tiny_gpt2() if builder == "gpt2" else tiny_bert_mlm()
    config = LTSFTConfig(num_tunable_weights=400, untie_output_embeddings=True)
    model = get_peft_model(rebuild(base), config)
    _train(model, 2, torch.optim.AdamW(_trainable(model), lr=1e-2), batch_fn=lambda i: batches(1, seed=i)[0])
    peft_sparse.ltsft.select_and_rewind(model, verbose=False)
    _train(model, 2, torch.optim.AdamW(_trainable(model), lr=1e-2), batch_fn=lambda i: batches(1, seed=5 + i)[0])
    kinds = {kind for _, layer, kind in targeted(model) if layer.deltas_of("default")[kind][1].numel()}
    assert "bias" in kinds
    assert any(
        layer.is_embedding and layer.deltas_of("default")["weight"][1].numel() for _, layer, _ in targeted(model)
    )
    ids = batches(1, seed=99)[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(rebuild(base), tmp_path).eval()
    assert loaded.peft_config["default"].peft_type == "LTSFT"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
        before = {k: v.clone() for k, v in loaded.base_model.model.state_dict().items()}
        loaded.merge_adapter()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        loaded.unmerge_adapter()
        for key, value in loaded.base_model.model.state_dict().items():
            assert torch.equal(value, before[key]), key
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_transformers_load_adapter_reads_the_saved_sizes(tmp_path):
    base = tiny_bert_mlm()
    model = get_peft_model(rebuild(base), LTSFTConfig(num_tunable_weights=300))
    with torch.no_grad():
        for _, layer, kind in targeted(model):
            layer.base_tensor(kind).add_(torch.randn_like(layer.base_tensor(kind)))
    peft_sparse.ltsft.select_and_rewind(model, verbose=False)
    with torch.no_grad():
        for _, layer, kind in targeted(model):
            layer.deltas_of("default")[kind][1].normal_()
    sizes = model.peft_config["default"].delta_sizes
    assert sum(w + b for w, b in sizes.values()) == 300 and any(b for _, b in sizes.values())
    model.save_pretrained(tmp_path)
    ids = batches(1, seed=4)[0]
    plain = rebuild(base)
    plain.load_adapter(str(tmp_path))  # transformers' loader checks shapes before copying
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=0, atol=0)


def test_untie_output_embeddings_freezes_a_copy():
    model = get_peft_model(tiny_bert_mlm(), LTSFTConfig(num_tunable_weights=100, untie_output_embeddings=True))
    inner = model.base_model.model
    decoder, embeddings = inner.cls.predictions.decoder, inner.bert.embeddings.word_embeddings
    assert decoder.weight is not embeddings.get_base_layer().weight
    assert not decoder.weight.requires_grad and embeddings.get_base_layer().weight.requires_grad
    assert torch.equal(decoder.weight, embeddings.get_base_layer().weight)
    assert "bert.embeddings.word_embeddings" in model.peft_config["default"].target_modules


# --------------------------------------------------------------------------------------------- errors
def test_config_and_phase_errors():
    with pytest.raises(ValueError, match="only one of num_tunable_weights, density"):
        LTSFTConfig(num_tunable_weights=3, density=0.1)
    with pytest.raises(ValueError, match="density must be in"):
        LTSFTConfig(density=1.5)
    with pytest.raises(ValueError, match="n_iterations"):
        LTSFTConfig(n_iterations=0)
    with pytest.raises(ValueError, match="selection_scope"):
        LTSFTConfig(selection_scope="layer")
    with pytest.raises(ValueError, match="dense_l1_reg"):
        LTSFTConfig(dense_l1_reg=-1.0)
    with pytest.raises(ValueError, match="exceeds the"):
        get_peft_model(tiny_llama(), LTSFTConfig(num_tunable_weights=10**9))
    with pytest.raises(ValueError, match="tied to the output embedding"):
        get_peft_model(tiny_gpt2(), LTSFTConfig(num_tunable_weights=10, target_modules=["wte", "c_fc"]))
    model = get_peft_model(tiny_llama(), LTSFTConfig(num_tunable_weights=10))
    with pytest.raises(ValueError, match="dense phase"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="no LT-SFT adapter is in the sparse phase"):
        peft_sparse.ltsft.start_dense_phase(model)
    peft_sparse.ltsft.select_and_rewind(model, verbose=False)
    with pytest.raises(ValueError, match="no LT-SFT adapter is in the dense phase"):
        peft_sparse.ltsft.select_and_rewind(model)


def test_deleting_a_dense_adapter_rewinds_the_base():
    base = tiny_llama()
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LTSFTConfig(num_tunable_weights=10))
    model.add_adapter("other", LTSFTConfig(num_tunable_weights=10, inference_mode=True))
    _train(model, 1, torch.optim.SGD(_trainable(model), lr=1.0))
    model.base_model.delete_adapter("default")
    state = {
        k.replace(".base_layer", ""): v for k, v in model.base_model.model.state_dict().items() if "ltsft_" not in k
    }
    for key, value in theta0.items():
        assert torch.equal(state[key], value), key
