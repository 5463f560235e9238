"""Reading and writing the formats of earlier implementations : composable-sft's pytorch_diff.bin
and the SpIEL reference fork's adapters."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import torch
from helpers import tiny_llama, token_batch
from ltsft_helpers import batches, rebuild, targeted, tiny_bert_mlm, tiny_bert_tagger
from safetensors.torch import save_file

from peft_sparse import SpIELLayer, sparsify
from peft_sparse.interop import (
    SFT_FILE_NAME,
    load_composable_sft,
    load_spiel_reference,
    read_composable_sft,
    save_composable_sft,
    write_composable_sft,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: a second intra-op thread only adds contention on a busy 2-core machine
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _raw(file) -> dict:
    """The pickle's content, read with an unrestricted loader (test files only, written by the tests)."""
    return torch.load(file, weights_only=False)


# --------------------------------------------------------------------------------------------- composable-sft
def test_writer_uses_column_major_delta_encoding_with_plain_int_steps(tmp_path):
    # weight [3, 4]: row-major 1 = (0, 1), 4 = (1, 0), 11 = (2, 3) -> column-major 3, 1, 11
    file = write_composable_sft(tmp_path, {"w": ((3, 4), torch.tensor([1, 4, 11]), torch.tensor([1.0, 2.0, 3.0]))})
    assert file.name == SFT_FILE_NAME
    entry = _raw(file)["diffs"]["w"]
    assert entry["size"] == torch.Size([3, 4])
    assert entry["index_steps"] == [1, 2, 8] and all(type(s) is int for s in entry["index_steps"])
    # composable-sft reads with torch.load, whose default under torch >= 2.6 is weights_only=True without numpy
    assert torch.load(file, weights_only=True)["diffs"]["w"]["index_steps"] == [1, 2, 8]
    assert torch.equal(entry["values"], torch.tensor([2.0, 1.0, 3.0]))  # sorted by column-major index
    sft = read_composable_sft(file)
    shape, indices, values = sft.diffs["w"]
    assert shape == (3, 4) and indices.tolist() == [1, 4, 11] and values.tolist() == [1.0, 2.0, 3.0]


def test_composable_sft_round_trip_with_heads(tmp_path):
    base = tiny_bert_tagger()
    finetuned = rebuild(base)
    with torch.no_grad():
        for param in finetuned.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model = sparsify(rebuild(base), finetuned, 500, modules_to_save=["classifier"])
    ids = batches(1, seed=3)[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    file = save_composable_sft(model, tmp_path)
    raw = _raw(file)
    assert set(raw["abs"]) == {"classifier.weight", "classifier.bias"}
    assert (
        "bert.embeddings.word_embeddings.weight" in raw["diffs"]
        and "bert.encoder.layer.0.output.dense.bias" in raw["diffs"]
    )
    loaded = load_composable_sft(rebuild(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
    for (name, layer, kind), (_, theirs, their_kind) in zip(targeted(model), targeted(loaded)):
        assert kind == their_kind
        mine_i, mine_v = layer.deltas_of("default")[kind]
        other_i, other_v = theirs.deltas_of("default")[kind]
        assert torch.equal(mine_i.long(), other_i.long()) and torch.equal(mine_v, other_v), f"{name}.{kind}"
    assert torch.equal(
        loaded.base_model.model.classifier.modules_to_save["default"].weight, finetuned.classifier.weight
    )
    # a language SFT's MLM head does not fit a tagger: loadable without the heads
    write_composable_sft(tmp_path / "lang", {}, {"cls.predictions.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match="with_heads=False"):
        load_composable_sft(rebuild(base), tmp_path / "lang" / SFT_FILE_NAME)


def test_published_language_sft_on_a_tied_mlm_model(tmp_path):
    """An embedding diff on BertForMaskedLM (tied decoder) loads with the decoder untied and frozen, as trained."""
    model = tiny_bert_mlm()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    diff = torch.tensor([5, 70, 300])
    write_composable_sft(tmp_path, {"bert.embeddings.word_embeddings.weight": ((64, 32), diff, torch.ones(3))})
    loaded = load_composable_sft(model, tmp_path)
    merged = loaded.merge_and_unload()
    emb = merged.bert.embeddings.word_embeddings.weight.reshape(-1)
    assert torch.equal(emb[diff], theta0["bert.embeddings.word_embeddings.weight"].reshape(-1)[diff] + 1)
    assert torch.equal(merged.cls.predictions.decoder.weight, theta0["cls.predictions.decoder.weight"])


def test_legacy_numpy_module_path_and_sparse_body_format(tmp_path):
    # composable-sft's own files hold a numpy int64 first step; with numpy 1.x it is named numpy.core.multiarray.scalar
    file = tmp_path / SFT_FILE_NAME
    entry = {"size": torch.Size([2, 3]), "index_steps": [np.int64(0), 5], "values": torch.tensor([1.0, 2.0])}
    torch.save({"diffs": {"w": entry}, "abs": {}}, file)
    assert read_composable_sft(file).diffs["w"][1].tolist() == [0, 5]
    with zipfile.ZipFile(file) as zin:
        contents = {name: zin.read(name) for name in zin.namelist()}
    renamed = tmp_path / "old.bin"
    with zipfile.ZipFile(renamed, "w") as zout:
        for name, data in contents.items():
            if name.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(name, data)
    assert read_composable_sft(renamed).diffs["w"][1].tolist() == [0, 5]
    # the older {"body": sparse tensors, "head": ...} layout
    dense = torch.zeros(2, 3)
    dense[0, 0], dense[1, 2] = 1.0, 2.0
    torch.save({"body": {"w": dense.to_sparse()}, "head": {}}, tmp_path / "body.bin")
    shape, indices, values = read_composable_sft(tmp_path / "body.bin").diffs["w"]
    assert shape == (2, 3) and indices.tolist() == [0, 5] and values.tolist() == [1.0, 2.0]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_unsafe_and_malformed_files_raise_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"diffs": {}, "abs": {"x": _Exploit()}}, tmp_path / "evil.bin")
    with pytest.raises(ValueError, match="not a readable composable-sft file"):
        read_composable_sft(tmp_path / "evil.bin")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "garbage.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable composable-sft file"):
        read_composable_sft(tmp_path / "garbage.bin")
    with pytest.raises(ValueError, match="no such file"):
        read_composable_sft(tmp_path / "missing")
    bad = {"size": torch.Size([2, 3]), "index_steps": [np.int64(3), 0], "values": torch.ones(2)}
    torch.save({"diffs": {"w": bad}, "abs": {}}, tmp_path / "steps.bin")
    with pytest.raises(ValueError, match="strictly increasing"):
        read_composable_sft(tmp_path / "steps.bin")
    bad = {"size": torch.Size([2, 3]), "index_steps": [np.int64(6)], "values": torch.ones(1)}
    torch.save({"diffs": {"w": bad}, "abs": {}}, tmp_path / "range.bin")
    with pytest.raises(ValueError, match="out of range"):
        read_composable_sft(tmp_path / "range.bin")
    torch.save({"diffs": {"w": {"size": torch.Size([2]), "values": torch.ones(1)}}}, tmp_path / "keys.bin")
    with pytest.raises(ValueError, match="expected keys"):
        read_composable_sft(tmp_path / "keys.bin")


@pytest.mark.parametrize(
    "data, message",
    [
        # each step is in range but the running sum wraps around int64
        (
            {
                "diffs": {
                    "w": {
                        "size": torch.Size([2**40, 2**22]),
                        "index_steps": [1] + [2**62 - 1] * 3,
                        "values": torch.ones(4),
                    }
                }
            },
            "sum to",
        ),
        ({"diffs": {"w": {"size": torch.Size([2, 3]), "index_steps": [0, 1.5], "values": torch.ones(2)}}}, "1.5"),
        ({"diffs": {"w": {"size": torch.Size([2, 3]), "index_steps": [0, True], "values": torch.ones(2)}}}, "True"),
        (
            {
                "diffs": {
                    "w": {"size": torch.Size([2, 3]), "index_steps": torch.tensor([0.0, 2.0]), "values": torch.ones(2)}
                }
            },
            "integer tensor",
        ),
        (
            {
                "diffs": {"w": {"size": torch.Size([2, 3]), "index_steps": [0], "values": torch.ones(1)}},
                "body": {"w": torch.ones(2, 3).to_sparse()},
            },
            "given twice",
        ),
        ({"body": [torch.ones(2)]}, "'body' must be a dict"),
        ({"diffs": {}, "head": "x"}, "'head' must be a dict"),
        ({"diffs": {"w": {"size": 3, "index_steps": [0], "values": torch.ones(1)}}}, "size must be a sequence"),
    ],
    ids=[
        "cumsum-overflow",
        "float-step",
        "bool-step",
        "float-tensor",
        "named-twice",
        "legacy-body",
        "legacy-head",
        "size-int",
    ],
)
def test_malformed_index_steps_and_structures_are_value_errors(tmp_path, data, message):
    torch.save(data, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match=message):
        read_composable_sft(tmp_path / "bad.bin")


def test_a_parameter_named_with_and_without_prefix_is_refused(tmp_path):
    model = tiny_bert_tagger()
    name = "encoder.layer.0.output.dense.weight"
    diff = ((32, 48), torch.tensor([1]), torch.ones(1))
    write_composable_sft(tmp_path, {name: diff, "bert." + name: diff})
    with pytest.raises(ValueError, match="names too"):
        load_composable_sft(model, tmp_path)
    assert not hasattr(model, "peft_config")


def test_interrupted_write_keeps_the_existing_file(tmp_path, monkeypatch):
    diff = {"w": ((2, 3), torch.tensor([0, 5]), torch.tensor([1.0, 2.0]))}
    file = write_composable_sft(tmp_path, diff)
    before = file.read_bytes()

    def interrupted(obj, f, *args, **kwargs):
        with open(f, "wb") as stream:
            stream.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_composable_sft(tmp_path, {"w": ((2, 3), torch.tensor([1]), torch.tensor([3.0]))})
    monkeypatch.undo()
    assert file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [SFT_FILE_NAME]


def test_names_and_shapes_that_do_not_fit_the_model(tmp_path):
    model = tiny_bert_tagger()
    cases = {
        "unknown": (
            {"bert.encoder.layer.9.output.dense.weight": ((32, 48), torch.tensor([1]), torch.ones(1))},
            "no such parameter",
        ),
        "shape": (
            {"bert.encoder.layer.0.output.dense.weight": ((48, 32), torch.tensor([1]), torch.ones(1))},
            r"size \(48, 32\) in the file, \(32, 48\) in the model",
        ),
        "norm": (
            {"bert.encoder.layer.0.output.LayerNorm.weight": ((32,), torch.tensor([1]), torch.ones(1))},
            "LayerNorm, which a sparse delta cannot hold",
        ),
    }
    for name, (diffs, message) in cases.items():
        write_composable_sft(tmp_path / name, diffs)
        with pytest.raises(ValueError, match=message):
            load_composable_sft(model, tmp_path / name)
    assert not hasattr(model, "peft_config")  # nothing was wrapped
    # names without the base_model_prefix are accepted
    write_composable_sft(
        tmp_path / "short", {"encoder.layer.0.output.dense.weight": ((32, 48), torch.tensor([7]), torch.ones(1))}
    )
    loaded = load_composable_sft(model, tmp_path / "short")
    assert "bert.encoder.layer.0.output.dense" in loaded.peft_config["default"].target_modules


# --------------------------------------------------------------------------------------------- SpIEL reference
def _write_spiel_reference(path, deltas, config_extra=None, safetensors=False, heads=None):
    """Test-only writer of the SpIEL reference fork's format (peft_type "SFT")."""
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for module, (indices, values) in deltas.items():
        state[f"base_model.model.{module}.sft_delta.values"] = values
        state[f"base_model.model.{module}.sft_delta.indices"] = indices.to(torch.int32)
    state.update({f"base_model.model.{k}": v for k, v in (heads or {}).items()})
    config = {
        "peft_type": "SFT",
        "target_modules": sorted(deltas),
        "num_deltas": {m: v.numel() for m, (_, v) in deltas.items()},
        "reselection_steps": 10,
        "selection_accumulation_steps": 4,
        "initial_reselection_rate": 0.1,
        "selection_algorithm": "rigl",
        "dtype": "float32",
        "modules_to_save": None,
    }
    config.update(config_extra or {})
    (path / "adapter_config.json").write_text(json.dumps(config))
    if safetensors:
        save_file(state, str(path / "adapter_model.safetensors"))
    else:
        torch.save(state, path / "adapter_model.bin")


@pytest.mark.parametrize("safetensors", [False, True])
def test_spiel_reference_loads_as_a_spiel_adapter(tmp_path, safetensors):
    base = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    deltas = {}
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        weight = base.get_submodule(module).weight
        indices = torch.sort(torch.randperm(weight.numel(), generator=generator)[:40]).values
        deltas[module] = (indices, torch.randn(40, generator=generator))
    _write_spiel_reference(tmp_path, deltas, safetensors=safetensors)
    reference = rebuild(base)
    with torch.no_grad():
        for module, (indices, values) in deltas.items():
            reference.get_submodule(module).weight.view(-1)[indices] += values
    model = load_spiel_reference(rebuild(base), tmp_path)
    config = model.peft_config["default"]
    assert config.peft_type == "SPIEL" and config.reselection_steps == 10 and config.accumulation_steps == 4
    layers = [m for m in model.modules() if isinstance(m, SpIELLayer)]
    assert len(layers) == 2 and all(not m.sparse_values["default"].requires_grad for m in layers)
    ids = token_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    trainable = load_spiel_reference(rebuild(base), tmp_path, is_trainable=True)
    assert all(m.sparse_values["default"].requires_grad for m in trainable.modules() if isinstance(m, SpIELLayer))


def test_spiel_reference_classification_adapter_with_implicit_head(tmp_path):
    from helpers import tiny_llama_classifier

    base = tiny_llama_classifier()
    generator = torch.Generator().manual_seed(1)
    module = "model.layers.0.self_attn.q_proj"
    indices = torch.sort(torch.randperm(32 * 32, generator=generator)[:30]).values
    values = torch.randn(30, generator=generator)
    score = torch.randn(3, 32, generator=generator)
    # PEFT 0.6 saved the score head for SEQ_CLS without listing it in modules_to_save
    _write_spiel_reference(
        tmp_path, {module: (indices, values)}, {"task_type": "SEQ_CLS"}, heads={"score.weight": score}
    )
    reference = rebuild(base)
    with torch.no_grad():
        reference.get_submodule(module).weight.view(-1)[indices] += values
        reference.score.weight.copy_(score)
    model = load_spiel_reference(rebuild(base), tmp_path)
    ids = token_batch(3)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_spiel_reference_errors(tmp_path):
    base = tiny_llama()
    good = {"model.layers.0.self_attn.q_proj": (torch.tensor([1, 2]), torch.ones(2))}
    _write_spiel_reference(tmp_path / "type", good, {"peft_type": "LORA"})
    with pytest.raises(ValueError, match="the SpIEL reference writes 'SFT'"):
        load_spiel_reference(base, tmp_path / "type")
    _write_spiel_reference(
        tmp_path / "module", {"model.layers.7.self_attn.q_proj": (torch.tensor([1]), torch.ones(1))}
    )
    with pytest.raises(ValueError, match="no such module"):
        load_spiel_reference(base, tmp_path / "module")
    _write_spiel_reference(
        tmp_path / "range", {"model.layers.0.self_attn.q_proj": (torch.tensor([10**6]), torch.ones(1))}
    )
    with pytest.raises(ValueError, match="out of range"):
        load_spiel_reference(base, tmp_path / "range")
    _write_spiel_reference(tmp_path / "count", good, {"num_deltas": {"model.layers.0.self_attn.q_proj": 5}})
    with pytest.raises(ValueError, match="num_deltas says 5"):
        load_spiel_reference(base, tmp_path / "count")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_spiel_reference(base, tmp_path / "empty")
    assert not hasattr(base, "peft_config")


def test_pickle_allow_list_is_explicit():
    """The allow-list holds numpy's scalar and dtypes only, never a callable that runs code."""
    from peft_sparse.interop.composable_sft import _allowed_globals

    names = set()
    for entry in _allowed_globals():
        names.add(entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}")
    assert all(n.startswith("numpy") for n in names), names
