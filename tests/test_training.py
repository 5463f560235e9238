"""Drop and grow during training, against dense references (thesis §7.3)."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import peft_sparse
from peft_sparse import SM3, SpIELConfig
from peft_sparse.selection import reselection_count

VOCAB = 48


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def batches(n, batch=4, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, length), generator=g) for _ in range(n)]


def layer_of(model, name="model.layers.0.self_attn.q_proj"):
    return model.get_submodule("base_model.model." + name)


def dense_grad(reference, name, x):
    """Gradient of the dense weight ``name`` of ``reference`` (a plain model) on batch ``x``."""
    reference.zero_grad()
    weight = reference.get_submodule(name).weight
    weight.requires_grad_(True)
    reference(input_ids=x, labels=x).loss.backward()
    return weight.grad.detach().clone()


def run_loop(model, optimizer, data):
    for x in data:
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_ag_selects_candidates_and_seeds_adam_moments():
    base = tiny_llama()
    reference = copy.deepcopy(base)
    config = SpIELConfig(target_modules=["q_proj"], density=0.05, reselection_steps=4, accumulation_steps=2)
    model = get_peft_model(base, config)
    layer = layer_of(model)
    budget = layer.sparse_values["default"].numel()
    optimizer = torch.optim.AdamW([layer.sparse_values["default"]], lr=0.0, weight_decay=0.0)
    # lr = 0 keeps the weights fixed, so a dense model gives the reference gradients
    # S = 4, gamma = 2: reselections after updates 2 (all entries) and 6, estimation phases 1-2 and 5-6
    data = batches(6)
    run_loop(model, optimizer, data[:2])
    name = "model.layers.0.self_attn.q_proj"
    g = {t: dense_grad(reference, name, data[t - 1]).view(-1) for t in (1, 2, 5, 6)}
    first = torch.topk(g[1].abs(), budget).indices
    assert set(layer.sparse_indices["default"].tolist()) == set(first.tolist())

    before = layer.sparse_indices["default"].clone()
    run_loop(model, optimizer, data[2:])
    candidates = torch.topk(g[5].abs(), budget).indices
    mean = (g[5] + g[6])[candidates] / 2
    mean_sq = (g[5] ** 2 + g[6] ** 2)[candidates] / 2
    k = reselection_count(6, budget, 4, 0.2, None, accumulation_steps=2)
    kept = set(before[k:].tolist())  # all values are 0: the stable sort drops the first k slots
    order = [i for i in torch.argsort(mean.abs(), descending=True).tolist() if candidates[i].item() not in kept][:k]
    grown = {candidates[i].item() for i in order}
    after = layer.sparse_indices["default"]
    assert set(after.tolist()) == kept | grown
    assert after.unique().numel() == budget
    state = optimizer.state[layer.sparse_values["default"]]
    lookup = {candidates[i].item(): i for i in range(budget)}
    new_slots = [s for s in range(budget) if after[s] != before[s]]
    assert new_slots, "the second reselection should grow new positions"
    for slot in new_slots:
        # seeded as gamma = 2 updates' worth of moments: bias correction by the entry's age 2
        i = lookup[after[slot].item()]
        assert math.isclose(state["exp_avg"][slot].item() / (1 - 0.9**2), mean[i].item(), rel_tol=1e-4, abs_tol=1e-9)
        assert math.isclose(state["exp_avg_sq"][slot].item() / (1 - 0.999**2), mean_sq[i].item(), rel_tol=1e-4)
        assert int(layer.spiel_age["default"][slot]) == 2
    assert all(int(layer.spiel_age["default"][s]) == 6 for s in range(budget) if s not in new_slots)


def sm3_reference(grads, positions, rows, cols):
    """Row/column SM3-II accumulators, entry by entry: each becomes the max of itself and its entries' nu."""
    r, c = [0.0] * rows, [0.0] * cols
    for grad, pos in zip(grads, positions):
        nu = {}
        for g, p in zip(grad.tolist(), pos.tolist()):
            o, i = divmod(p, cols)
            nu[p] = min(r[o], c[i]) + g * g
        new_r, new_c = list(r), list(c)
        for p, v in nu.items():
            o, i = divmod(p, cols)
            new_r[o] = max(new_r[o], v)
            new_c[i] = max(new_c[i], v)
        r, c = new_r, new_c
    return torch.tensor(r), torch.tensor(c)


@pytest.mark.parametrize("regrow_dropped", [None, False])
def test_ma_grows_by_row_column_statistics_with_sm3(regrow_dropped):
    config = SpIELConfig(
        target_modules=["q_proj"],
        density=0.05,
        selection="ma",
        reselection_steps=4,
        accumulation_steps=4,
        regrow_dropped=regrow_dropped,
    )
    model = get_peft_model(tiny_llama(), config)
    layer = layer_of(model)
    values = layer.sparse_values["default"]
    optimizer = SM3([values], lr=1e-3)
    grads, positions = [], []
    for x in batches(4):
        model(input_ids=x, labels=x).loss.backward()
        grads.append(values.grad.clone())
        positions.append(layer.sparse_indices["default"].long().clone())
        optimizer.step()
        optimizer.zero_grad()
    rows, cols = layer.weight_shape
    r, c = sm3_reference(grads, positions, rows, cols)
    torch.testing.assert_close(layer.spiel_row_stats["default"], r)
    torch.testing.assert_close(layer.spiel_col_stats["default"], c)
    scores = (r[:, None] * c[None, :]).view(-1)
    if regrow_dropped is False:
        scores[positions[-1]] = -1  # the reference code's MA growth excludes every active position, dropped or not
    # (by default the first reselection drops every entry and grows the top-k of all positions)
    expected = torch.topk(scores, values.numel()).indices
    assert set(layer.sparse_indices["default"].tolist()) == set(expected.tolist())
    # SM3's accumulators are the layer's statistics (one copy, saved with the adapter)
    assert optimizer.state[values]["row_accumulator"] is layer.spiel_row_stats["default"]
    assert optimizer.state[values]["col_accumulator"] is layer.spiel_col_stats["default"]


def test_ma_growth_of_every_layer_is_one_call_and_each_equals_its_dense_top_k(monkeypatch):
    """The reselections due after one update are finished together: SpIEL-MA's growth of all 14 projections (five
    shapes) is one call, and each layer's new positions are still the top-k of its own dense score matrix."""
    import peft_sparse.tuners.spiel.layer as layer_module

    config = SpIELConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        density=0.05,
        selection="ma",
        reselection_steps=4,
        accumulation_steps=4,
    )
    model = get_peft_model(tiny_llama(), config)
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "spiel_row_stats")}
    assert len(layers) == 14
    calls = []
    original = layer_module.grow_by_momentum_approximation_many

    def spy(row_stats, *args):
        calls.append(len(row_stats))
        return original(row_stats, *args)

    monkeypatch.setattr(layer_module, "grow_by_momentum_approximation_many", spy)
    values = [m.sparse_values["default"] for m in layers.values()]
    optimizer = torch.optim.Adam(values, lr=1e-3)
    run_loop(model, optimizer, batches(4))  # the first reselection, after update 4, replaces every entry
    assert calls == [14]
    for name, layer in layers.items():
        r, c = layer.spiel_row_stats["default"], layer.spiel_col_stats["default"]
        scores = (r[:, None] * c[None, :]).view(-1)
        # equal scores (the products of equal statistics) go to the lower position
        expected = torch.sort(scores, descending=True, stable=True).indices[: layer.sparse_values["default"].numel()]
        assert set(layer.sparse_indices["default"].tolist()) == set(expected.tolist()), name


def test_reselecting_together_equals_reselecting_layer_by_layer(monkeypatch):
    """Several reselections (every entry, then 20 %, decaying) of MA, AG and random layers: reselecting together
    (SpIEL-MA's growth in groups, here of at most about two deltas) leaves exactly the state that one ``reselect``
    per layer leaves."""
    import peft_sparse.tuners.spiel.layer as layer_module

    def train(selection, together):
        if together:
            budget = 2 * int(0.05 * 32 * 32)  # about two q_proj-sized deltas per group
            monkeypatch.setattr(layer_module, "RESELECT_TOGETHER_ENTRIES", budget)
            grow = layer_module.grow_by_momentum_approximation_many
            spy = lambda *args: calls.append(len(args[0])) or grow(*args)  # noqa: E731
            monkeypatch.setattr(layer_module, "grow_by_momentum_approximation_many", spy)
        else:
            monkeypatch.setattr(
                layer_module, "reselect_together", lambda due, opt: [layer.reselect(a, opt, s) for layer, a, s in due]
            )
        config = SpIELConfig(
            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
            density=0.05,
            selection=selection,
            reselection_steps=3,
            accumulation_steps=2,
        )
        model = get_peft_model(tiny_llama(), config)
        values = [p for n, p in model.named_parameters() if p.requires_grad]
        run_loop(model, torch.optim.Adam(values, lr=1e-2), batches(11))
        monkeypatch.undo()
        return {k: v.clone() for k, v in model.state_dict().items() if "spiel_" in k}

    for selection in ("ma", "ag", "random"):
        calls = []
        together, apart = train(selection, True), train(selection, False)
        if selection == "ma":  # reselections after updates 2, 5, 8 and 11 of all 8 deltas, each in several groups
            assert sum(calls) == 4 * 8 and len(calls) > 4 and max(calls) < 8, calls
        assert together.keys() == apart.keys()
        for key in together:
            assert torch.equal(together[key], apart[key]), (selection, key)


def test_ma_statistics_are_accumulated_once_per_update(monkeypatch):
    import peft_sparse.optim.sm3 as sm3_module
    import peft_sparse.tuners.spiel.layer as layer_module

    calls = []

    def counting(original, where):
        def accumulate(*args):
            calls.append(where)
            return original(*args)

        return accumulate

    monkeypatch.setattr(sm3_module, "sm3_accumulate", counting(sm3_module.sm3_accumulate, "optimizer"))
    monkeypatch.setattr(layer_module, "sm3_accumulate", counting(layer_module.sm3_accumulate, "layer"))
    config = SpIELConfig(target_modules=["q_proj"], density=0.05, selection="ma", reselection_steps=4)
    for make_optimizer, expected in (
        (lambda p: SM3(p, lr=1e-3), "optimizer"),  # SM3 updates the layer's statistics itself
        (lambda p: torch.optim.AdamW(p, lr=1e-3), "layer"),  # any other optimizer: the layer does
    ):
        calls.clear()
        model = get_peft_model(tiny_llama(), config)
        values = layer_of(model).sparse_values["default"]
        optimizer = make_optimizer([values])
        for x in batches(3):
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert calls == [expected] * 3


def test_random_selection_is_seeded_unique_and_in_range():
    def final_indices(seed):
        config = SpIELConfig(
            target_modules=["q_proj", "v_proj"],
            density=0.1,
            selection="random",
            reselection_steps=2,
            seed=seed,
            total_steps=10,
        )
        model = get_peft_model(tiny_llama(), config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        start = layer_of(model).sparse_indices["default"].clone()
        run_loop(model, optimizer, batches(6))
        return start, layer_of(model).sparse_indices["default"].clone(), layer_of(model)

    start, a, layer = final_indices(0)
    _, b, _ = final_indices(0)
    _, c, _ = final_indices(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.unique().numel() == a.numel() == start.numel()
    assert int(a.min()) >= 0 and int(a.max()) < layer.get_base_layer().weight.numel()
    assert len(set(a.tolist()) & set(start.tolist())) < a.numel() // 2


def test_schedule_limits_how_many_entries_change():
    config = SpIELConfig(
        target_modules=["q_proj"],
        density=0.2,
        selection="random",
        reselection_steps=2,
        accumulation_steps=2,
        total_steps=12,
        initial_reselection_rate=0.5,
    )
    model = get_peft_model(tiny_llama(), config)
    layer = layer_of(model)
    budget = layer.sparse_values["default"].numel()
    optimizer = torch.optim.AdamW([layer.sparse_values["default"]], lr=1e-2)
    previous = layer.sparse_indices["default"].clone()
    for step, x in enumerate(batches(11), start=1):
        run_loop(model, optimizer, [x])
        current = layer.sparse_indices["default"].clone()
        changed = int((current != previous).sum())
        allowed = reselection_count(step, budget, 2, 0.5, 12, accumulation_steps=2)
        assert changed <= allowed
        if step > 2 and allowed:
            assert changed >= allowed // 2
        previous = current
    assert int(layer.spiel_step["default"]) == 11


def test_unknown_optimizer_state_is_an_error():
    class Odd(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["odd"] = torch.zeros(3)

    config = SpIELConfig(
        target_modules=["q_proj"], density=0.05, selection="random", reselection_steps=1, accumulation_steps=1
    )
    model = get_peft_model(tiny_llama(), config)
    optimizer = Odd([layer_of(model).sparse_values["default"]])
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    with pytest.raises(ValueError, match="cannot re-seed state 'odd' of Odd"):
        optimizer.step()


def patterned_dataset(n=64, length=16):
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (starts + torch.arange(length)) % VOCAB  # next token = previous + 1: learnable by small deltas
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def trainer_args(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=24,
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        data_seed=0,
        lr_scheduler_type="constant",
    )
    defaults.update(kw)
    return TrainingArguments(**defaults)


@pytest.mark.parametrize("selection", ["ag", "ma", "random"])
def test_trainer_reselects_and_loss_falls(tmp_path, selection):
    config = SpIELConfig(
        target_modules="all-linear", density=0.1, selection=selection, reselection_steps=6, accumulation_steps=2
    )
    model = get_peft_model(tiny_llama(), config)
    start = layer_of(model).sparse_indices["default"].clone()
    data = patterned_dataset()
    kwargs = {}
    if selection == "ma":
        kwargs["optimizer_cls_and_kwargs"] = (SM3, {"lr": 3e-2})
    trainer = Trainer(model=model, args=trainer_args(tmp_path), train_dataset=data, eval_dataset=data, **kwargs)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.05
    assert config.total_steps == 24  # taken from the Trainer
    layer = layer_of(model)
    assert int(layer.spiel_step["default"]) == 24
    final = layer.sparse_indices["default"]
    assert final.unique().numel() == start.numel()
    assert len(set(final.tolist()) & set(start.tolist())) < start.numel() // 2


def test_gradient_accumulation_counts_updates_not_micro_batches(tmp_path):
    config = SpIELConfig(target_modules=["q_proj"], density=0.1, reselection_steps=3, accumulation_steps=2)
    model = get_peft_model(tiny_llama(), config)
    args = trainer_args(tmp_path, max_steps=7, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    Trainer(model=model, args=args, train_dataset=patterned_dataset()).train()
    assert int(layer_of(model).spiel_step["default"]) == 7


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    def make():
        config = SpIELConfig(
            target_modules="all-linear", density=0.1, reselection_steps=4, accumulation_steps=2, selection="ag"
        )
        return get_peft_model(tiny_llama(), config)

    data = patterned_dataset()
    args = dict(max_steps=10, save_strategy="steps", save_steps=7, lr_scheduler_type="linear")
    full = make()
    Trainer(model=full, args=trainer_args(tmp_path / "a", **args), train_dataset=data).train()
    resumed = make()
    # checkpoint-7 lies inside the estimation phase of the reselection at update 8
    Trainer(model=resumed, args=trainer_args(tmp_path / "b", **args), train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-7")
    )
    pairs = list(zip(peft_sparse.sparse_deltas(full), peft_sparse.sparse_deltas(resumed)))
    assert pairs
    for (name, idx_a, val_a, _), (_, idx_b, val_b, _) in pairs:
        assert torch.equal(idx_a, idx_b), name
        torch.testing.assert_close(val_a, val_b, rtol=1e-5, atol=1e-7)


def test_sft_trainer_with_spiel_config(tmp_path):
    trl = pytest.importorskip("trl")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on a mat and dog ran to big red house small blue car".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=2,
        )
    )
    texts = [" ".join(words[i % 5 : i % 5 + 6]) for i in range(40)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        max_length=16,
    )
    config = SpIELConfig(target_modules="all-linear", density=0.05, reselection_steps=4, accumulation_steps=2)
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=config,
    )
    trainer.train()
    assert isinstance(trainer.model, PeftModel)
    layer = trainer.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert int(layer.spiel_step["default"]) == 8
    assert any(v.abs().sum() > 0 for _, _, v, _ in peft_sparse.sparse_deltas(trainer.model))


def value_grads(model, x):
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    return [v.grad.clone() for _, _, v, _ in peft_sparse.sparse_deltas(model)]


def test_gradient_checkpointing_and_autocast_give_the_same_value_gradients():
    config = SpIELConfig(target_modules="all-linear", density=0.1, init_weights=False)
    model = get_peft_model(tiny_llama(), config)
    model.train()
    x = batches(1)[0]
    plain = value_grads(model, x)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.enable_input_require_grads()
    checkpointed = value_grads(model, x)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)
    model.base_model.model.gradient_checkpointing_disable()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = value_grads(model, x)
    for a, b in zip(plain, low):
        assert b.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98
