"""Composing sparse fine-tunings (in memory and on disk), the cross-lingual recipe, and sparsify."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama, token_batch
from ltsft_helpers import batches, brute_force_topk, rebuild, targeted, tiny_bert_mlm, tiny_bert_tagger
from peft import PeftModel, get_peft_model

import peft_sparse
from peft_sparse import LTSFTConfig, SpIELConfig, compose_adapters, sparsify


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: a second intra-op thread only adds contention on a busy 2-core machine
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _random_ltsft(base, k, seed, **config):
    """An LT-SFT adapter on ``base`` with ``k`` random positions and random values (sparse phase)."""
    model = get_peft_model(base, LTSFTConfig(num_tunable_weights=k, **config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer, kind in targeted(model):
            layer.base_tensor(kind).add_(torch.randn(layer.base_tensor(kind).shape, generator=generator))
    peft_sparse.ltsft.select_and_rewind(model, verbose=False)
    with torch.no_grad():
        for _, layer, kind in targeted(model):
            values = layer.deltas_of("default")[kind][1]
            values.copy_(torch.randn(values.shape, generator=generator))
    return model


def _dense_deltas(model, adapter="default"):
    out = {}
    for name, layer, kind in targeted(model, adapter):
        indices, values = layer.deltas_of(adapter)[kind]
        dense = torch.zeros(layer.base_tensor(kind).numel())
        dense[indices.long()] = values.detach().float()
        out[f"{name}.{kind}"] = dense.view_as(layer.base_tensor(kind))
    return out


def test_add_weighted_adapter_sums_overlapping_positions(tmp_path):
    base = tiny_llama()
    first = _random_ltsft(rebuild(base), 600, seed=1)
    second = _random_ltsft(rebuild(base), 600, seed=2)
    d1, d2 = _dense_deltas(first), _dense_deltas(second)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    model = PeftModel.from_pretrained(rebuild(base), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [1.0, -0.5], "ab")
    combined = _dense_deltas(model, "ab")
    overlap = sum(int(((d1[k] != 0) & (d2[k] != 0)).sum()) for k in d1)
    assert overlap > 0
    for key in d1:
        assert torch.equal(combined[key], d1[key] + (-0.5) * d2[key]), key
    ids = token_batch(3)
    model.base_model.set_adapter(["a", "b"])  # two active adapters: the same sum in one forward (weights 1, 1)
    with torch.no_grad():
        both = model(input_ids=ids).logits
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "a+b")
    model.set_adapter("a+b")
    with torch.no_grad():
        torch.testing.assert_close(both, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    model.set_adapter("ab")
    reference = rebuild(base)
    with torch.no_grad():
        for key, delta in combined.items():
            reference.get_parameter(key).add_(delta)
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_compose_saved_spiel_and_ltsft_adapters_exactly(tmp_path):
    base = tiny_llama()
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}
    spiel = get_peft_model(
        rebuild(base), SpIELConfig(target_modules=["q_proj", "down_proj"], density=0.2, init_weights=False)
    )
    spiel.save_pretrained(tmp_path / "spiel")
    spiel_dense = {}
    for name, indices, values, shape in peft_sparse.sparse_deltas(spiel):
        dense = torch.zeros(shape).reshape(-1)
        dense[indices.long()] = values.detach()
        spiel_dense[f"{name}.weight"] = dense.view(shape)
    ltsft = _random_ltsft(rebuild(base), 500, seed=3)
    ltsft_dense = _dense_deltas(ltsft)
    ltsft.save_pretrained(tmp_path / "ltsft")
    out = compose_adapters([tmp_path / "spiel", tmp_path / "ltsft"], [0.5, 2.0], tmp_path / "composed")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LTSFT"
    merged = PeftModel.from_pretrained(rebuild(base), out).merge_and_unload()
    for key, value in merged.state_dict().items():
        delta = torch.zeros_like(value)
        if key in spiel_dense:
            delta = delta + 0.5 * spiel_dense[key]
        if key in ltsft_dense:
            delta = delta + 2.0 * ltsft_dense[key]
        assert torch.equal(value, theta0[key] + delta), key


def test_compose_errors(tmp_path):
    llama = _random_ltsft(tiny_llama(), 50, seed=0)
    llama.save_pretrained(tmp_path / "llama")
    other = _random_ltsft(tiny_llama(intermediate_size=40), 50, seed=0)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="has shape"):
        compose_adapters([tmp_path / "llama", tmp_path / "other"], None, tmp_path / "bad")
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        compose_adapters([tmp_path / "llama", tmp_path / "llama"], [1.0], tmp_path / "bad")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="not a sparse adapter"):
        compose_adapters([tmp_path / "lora"], None, tmp_path / "bad")
    heads = _random_ltsft(tiny_bert_tagger(), 50, seed=0, modules_to_save=["classifier"])
    heads.save_pretrained(tmp_path / "heads")
    with pytest.raises(ValueError, match="dense heads cannot be composed"):
        compose_adapters([tmp_path / "heads", tmp_path / "heads"], None, tmp_path / "bad")


def _train_ltsft(model, config, data_seed, steps=2, **inputs):
    """Dense phase, select, sparse phase; ``inputs(ids)`` gives the model's keyword arguments."""
    model = get_peft_model(model, config)
    for phase in peft_sparse.ltsft.phases(model, verbose=False):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        for ids in batches(steps, seed=data_seed + (0 if phase.dense else 100)):
            model(**inputs["make"](ids)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
    return model


def test_cross_lingual_recipe_composes_theta0_plus_task_plus_language_exactly(tmp_path):
    """Thesis §4.3.2, Algorithm 1: language SFTs by MLM; the task SFT is trained on theta0 + phi_src; inference uses
    theta0 + phi_task + phi_tgt."""
    mlm = tiny_bert_mlm()
    mlm_inputs = {"make": lambda ids: {"input_ids": ids, "labels": ids}}
    lang = LTSFTConfig(num_tunable_weights=400, untie_output_embeddings=True, dense_l1_reg=0.1, sparse_l1_reg=0.1)
    for name, seed in (("src", 0), ("tgt", 50)):
        _train_ltsft(rebuild(mlm), lang, seed, **mlm_inputs).save_pretrained(tmp_path / name)

    tagger = tiny_bert_tagger()
    tagger.bert.load_state_dict(mlm.bert.state_dict())  # the task model shares theta0's body
    theta0 = {k: v.clone() for k, v in tagger.state_dict().items()}
    with_src = PeftModel.from_pretrained(rebuild(tagger), tmp_path / "src").merge_and_unload()  # theta0 + phi_src
    tag_inputs = {"make": lambda ids: {"input_ids": ids, "labels": ids % 3}}
    task_config = LTSFTConfig(num_tunable_weights=300, modules_to_save=["classifier"])
    _train_ltsft(with_src, task_config, 7, **tag_inputs).save_pretrained(tmp_path / "task")

    model = PeftModel.from_pretrained(rebuild(tagger), tmp_path / "task", adapter_name="task")
    model.load_adapter(tmp_path / "tgt", adapter_name="tgt")
    phi_task, phi_tgt = _dense_deltas(model, "task"), _dense_deltas(model, "tgt")
    head = {k: v.clone() for k, v in model.base_model.model.classifier.modules_to_save["task"].state_dict().items()}
    model.add_weighted_adapter(["task", "tgt"], [1.0, 1.0], "task+tgt")
    model.set_adapter("task+tgt")
    ids = batches(1, seed=77)[0]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    for key, value in merged.state_dict().items():
        if key.startswith("classifier."):
            assert torch.equal(value, head[key.split(".", 1)[1]]), key
            continue
        expected = theta0[key] + (
            phi_task.get(key, torch.zeros_like(value)) + phi_tgt.get(key, torch.zeros_like(value))
        )
        assert torch.equal(value, expected), key
    assert any(v.any() for v in phi_task.values()) and any(v.any() for v in phi_tgt.values())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)

    # the same composition through files
    out = compose_adapters([tmp_path / "task", tmp_path / "tgt"], [1.0, 1.0], tmp_path / "composed")
    from_files = PeftModel.from_pretrained(rebuild(tagger), out).merge_and_unload()
    for key, value in from_files.state_dict().items():
        assert torch.equal(value, merged.state_dict()[key]), key


def test_sparsify_is_the_topk_of_the_difference():
    base = tiny_bert_tagger()
    finetuned = rebuild(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in finetuned.named_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * (0.1 if "classifier" not in name else 1.0))
    reference = rebuild(base)
    model = sparsify(base, finetuned, 777, modules_to_save=["classifier"])
    entries = targeted(model)
    tuned = dict(finetuned.named_parameters())
    ref_params = dict(reference.named_parameters())
    diffs = [(tuned[f"{n}.{k}"] - ref_params[f"{n}.{k}"]).abs() for n, _, k in entries]
    expected = brute_force_topk(diffs, 777)
    for (name, layer, kind), exp in zip(entries, expected):
        indices, values = layer.deltas_of("default")[kind]
        assert torch.equal(indices.long(), exp), f"{name}.{kind}"
        flat_diff = (tuned[f"{name}.{kind}"].detach() - ref_params[f"{name}.{kind}"].detach()).reshape(-1)
        assert torch.equal(values.detach(), flat_diff[exp])
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(head.weight, finetuned.classifier.weight)


def test_sparsify_rejects_mismatched_models():
    with pytest.raises(ValueError, match="shape"):
        sparsify(tiny_llama(), tiny_llama(intermediate_size=40), 10)
    with pytest.raises(ValueError, match="has no parameter"):
        sparsify(tiny_llama(), tiny_bert_mlm(), 10)
