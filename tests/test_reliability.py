"""Bad files, faults and numerics: loading fails clearly and changes nothing; training state is checked."""

from __future__ import annotations

import functools
import hashlib
import json

import pytest
import torch
from helpers import spiel_layers, tiny_llama, token_batch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import peft_sparse
from peft_sparse import AdapterLoadError, LTSFTConfig, SpIELConfig

ADAPTER_FILE = "adapter_model.safetensors"
TARGETS = ["q_proj", "v_proj", "down_proj"]


def fingerprint(model: torch.nn.Module) -> dict:
    """Hash of every tensor, its requires_grad flag and the class of every module: what a failed load must keep."""
    tensors = {
        name: (
            hashlib.sha256(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest(),
            t.requires_grad,
            t.dtype,
            tuple(t.shape),
        )
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    }
    modules = {name: type(m).__name__ for name, m in model.named_modules()}
    return {
        "tensors": tensors,
        "modules": modules,
        "config": model.config.to_dict(),
        "training": model.training,
        "peft": hasattr(model, "peft_config"),
    }


def spiel_config(**overrides) -> SpIELConfig:
    kwargs = {"target_modules": TARGETS, "density": 0.2, "init_weights": False}
    kwargs.update(overrides)
    return SpIELConfig(**kwargs)


def saved_adapter(tmp_path, config=None):
    peft_model = get_peft_model(tiny_llama(), config or spiel_config())
    peft_model.save_pretrained(tmp_path)
    return tmp_path


def edit_file(path, change):
    tensors = load_file(path / ADAPTER_FILE)
    change(tensors)
    save_file(tensors, path / ADAPTER_FILE)


def key_of(tensors, module, attr):
    (key,) = [k for k in tensors if k.startswith(f"base_model.model.{module}.") and k.endswith("." + attr)]
    return key


# ----------------------------------------------------------------------------------------- bad files
def _truncate(path):
    data = (path / ADAPTER_FILE).read_bytes()
    (path / ADAPTER_FILE).write_bytes(data[: len(data) // 2])


def _empty(path):
    (path / ADAPTER_FILE).write_bytes(b"")


def _missing(path):
    (path / ADAPTER_FILE).unlink()


def _extra_base_weight(path):
    # an adapter file that would overwrite the base model's final norm
    edit_file(path, lambda t: t.__setitem__("base_model.model.model.norm.weight", torch.full((32,), 7.0)))


def _extra_key_wrong_shape(path):
    edit_file(path, lambda t: t.__setitem__("base_model.model.model.norm.weight", torch.ones(5)))


def _nan_values(path):
    def change(tensors):
        key = key_of(tensors, "model.layers.0.self_attn.q_proj", "spiel_values")
        tensors[key] = tensors[key].clone()
        tensors[key][0] = float("nan")

    edit_file(path, change)


BAD_FILES = {
    "truncated": (_truncate, None),
    "empty": (_empty, None),
    "missing-weights": (_missing, None),
    "extra-base-weight": (_extra_base_weight, "model.norm.weight"),
    "extra-key-wrong-shape": (_extra_key_wrong_shape, "model.norm.weight"),
    "nan-values": (_nan_values, "non-finite"),
}


def _load_from_pretrained(model, path):
    return PeftModel.from_pretrained(model, path)


def _load_second_adapter(model, path):
    # model is a PeftModel with a working adapter "default"; the bad one is added as "b"
    return model.load_adapter(path, adapter_name="b")


def _load_transformers(model, path):
    return model.load_adapter(str(path))


@pytest.mark.parametrize("bad", list(BAD_FILES), ids=list(BAD_FILES))
@pytest.mark.parametrize("how", ["from_pretrained", "peft_load_adapter", "transformers_load_adapter"])
def test_failed_load_raises_value_error_and_changes_nothing(tmp_path, bad, how):
    corrupt, message = BAD_FILES[bad]
    path = saved_adapter(tmp_path / "adapter")
    corrupt(path)
    if how == "peft_load_adapter":
        model = get_peft_model(tiny_llama(seed=2), spiel_config(target_modules=["q_proj", "k_proj"], seed=5)).eval()
        load = _load_second_adapter
        tokens = token_batch()
        with torch.no_grad():
            before_out = model(tokens).logits
    else:
        model = tiny_llama(seed=2)
        load = _load_from_pretrained if how == "from_pretrained" else _load_transformers
    if how == "transformers_load_adapter" and bad == "missing-weights":
        pytest.skip("transformers checks the file itself before any change (OSError)")
    before = fingerprint(model)
    with pytest.raises(ValueError, match=message) as info:
        load(model, path)
    if message is None:
        assert isinstance(info.value, AdapterLoadError)
    assert fingerprint(model) == before
    if how == "peft_load_adapter":
        assert list(model.peft_config) == ["default"]
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, before_out)
    else:
        assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_extra_key_does_not_survive_anywhere(tmp_path):
    # the reported case: the key was loaded silently and survived unload()
    path = saved_adapter(tmp_path)
    _extra_base_weight(path)
    model = tiny_llama(seed=2)
    norm = model.model.norm.weight.detach().clone()
    with pytest.raises(ValueError, match="not part of this adapter"):
        PeftModel.from_pretrained(model, path)
    assert torch.equal(model.model.norm.weight, norm)


def test_good_file_still_loads_after_failures(tmp_path):
    path = saved_adapter(tmp_path)
    good = load_file(path / ADAPTER_FILE)
    _extra_base_weight(path)
    model = tiny_llama(seed=2)
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(model, path)
    save_file(good, path / ADAPTER_FILE)
    loaded = PeftModel.from_pretrained(model, path)
    assert len(spiel_layers(loaded)) == 6


# ----------------------------------------------------------------------------------------- half-wrapped models
def test_spiel_budget_error_leaves_model_unwrapped():
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="num_tunable_weights"):
        get_peft_model(model, SpIELConfig(target_modules=TARGETS, num_tunable_weights=10**9))
    assert fingerprint(model) == before


def test_ltsft_budget_error_leaves_model_unwrapped():
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="num_tunable_weights"):
        get_peft_model(model, LTSFTConfig(target_modules=TARGETS, num_tunable_weights=10**9))
    assert fingerprint(model) == before


@pytest.mark.parametrize("config_cls", [SpIELConfig, LTSFTConfig])
def test_target_list_with_a_layer_norm_leaves_model_unwrapped(config_cls):
    model = tiny_llama()
    before = fingerprint(model)
    # q_proj of layer 0 is wrapped before the first input_layernorm is reached
    with pytest.raises(ValueError, match="input_layernorm"):
        get_peft_model(model, config_cls(target_modules=["q_proj", "input_layernorm"], density=0.1))
    assert fingerprint(model) == before


# ----------------------------------------------------------------------------------------- training state
def _train_until_candidates(peft_model, max_updates=40):
    """Train (AdamW) until the AG estimation phase has picked growth candidates; returns after that backward, so the
    saved state is inside the phase. Does not assume at which update the phase starts."""
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    tokens = token_batch(length=9)
    for _ in range(max_updates):
        peft_model(tokens, labels=tokens).loss.backward()
        if any(layer.spiel_candidates["default"].numel() for layer in spiel_layers(peft_model).values()):
            return optimizer
        optimizer.step()
        optimizer.zero_grad()
    raise AssertionError("no estimation phase within max_updates")


def test_ag_adapter_saved_inside_estimation_phase_loads_everywhere(tmp_path):
    base = tiny_llama()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, spiel_config(reselection_steps=4, accumulation_steps=2))
    _train_until_candidates(peft_model)
    peft_model.eval()
    tokens = token_batch()
    with torch.no_grad():
        expected = peft_model(tokens).logits
    peft_model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / ADAPTER_FILE)
    assert any(k.endswith("spiel_candidates") and v.numel() for k, v in on_disk.items())

    def fresh():
        model = LlamaForCausalLM(base.config)
        model.load_state_dict(state)
        return model.eval()

    via_transformers = fresh()
    via_transformers.load_adapter(str(tmp_path))
    via_peft = PeftModel.from_pretrained(fresh(), tmp_path, is_trainable=True)
    with torch.no_grad():
        assert torch.equal(via_transformers(tokens).logits, expected)
        assert torch.equal(via_peft.eval()(tokens).logits, expected)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    key = key_of(on_disk, "model.layers.0.self_attn.q_proj", "spiel_candidates")
    assert torch.equal(via_peft.get_submodule(name).spiel_candidates["default"], on_disk[key])


def _set(module, attr, value):
    def change(tensors):
        tensors[key_of(tensors, module, attr)] = value

    return change


Q = "model.layers.0.self_attn.q_proj"
BAD_STATE = {
    "float-step": (_set(Q, "spiel_step", torch.tensor(3.0)), "spiel_step"),
    "vector-step": (_set(Q, "spiel_step", torch.tensor([3, 4])), "spiel_step"),
    "negative-step": (_set(Q, "spiel_step", torch.tensor(-2)), "spiel_step must be non-negative"),
    "int-stats": (_set(Q, "spiel_row_stats", torch.ones(32, dtype=torch.int64)), "spiel_row_stats"),
    "nan-stats": (_set(Q, "spiel_row_stats", torch.full((32,), float("nan"))), "spiel_row_stats"),
    "negative-stats": (_set(Q, "spiel_col_stats", -torch.ones(32)), "spiel_col_stats"),
}


@pytest.mark.parametrize("bad", list(BAD_STATE), ids=list(BAD_STATE))
def test_bad_training_state_is_refused_at_load(tmp_path, bad):
    change, message = BAD_STATE[bad]
    path = saved_adapter(tmp_path, spiel_config(selection="ma"))
    edit_file(path, change)
    model = tiny_llama(seed=2)
    before = fingerprint(model)
    with pytest.raises(ValueError, match=message) as info:
        PeftModel.from_pretrained(model, path, is_trainable=True)
    assert Q in str(info.value)
    assert fingerprint(model) == before


@pytest.mark.parametrize("saved, loaded", [("ma", "ag"), ("ag", "ma")])
def test_config_whose_selection_changed_is_refused(tmp_path, saved, loaded):
    config = spiel_config(selection=saved, reselection_steps=4, accumulation_steps=2)
    peft_model = get_peft_model(tiny_llama(), config)
    if saved == "ag":
        _train_until_candidates(peft_model)
    peft_model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["selection"] = loaded
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    model = tiny_llama(seed=2)
    before = fingerprint(model)
    with pytest.raises(ValueError, match="another selection"):
        PeftModel.from_pretrained(model, tmp_path, is_trainable=True)
    assert fingerprint(model) == before


def test_public_error_class():
    assert issubclass(peft_sparse.AdapterLoadError, ValueError)


# ----------------------------------------------------------------------------------------- loss scaling
@functools.lru_cache(maxsize=None)  # the reference runs are shared between tests
def _scaled_run(scale, overflow=None, updates=9):
    """Train SpIEL-AG (S=4, gamma=2) for ``updates`` AdamW updates of 2 micro-batches each, with a GradScaler of
    ``scale`` (None: no scaler). ``overflow``: "start" / "mid" inserts one update whose loss is inf (skipped by the
    scaler) at the first / second update of the first estimation phase, found from the layer's own schedule."""
    peft_model = get_peft_model(tiny_llama(), spiel_config(reselection_steps=4, accumulation_steps=2)).train()
    layer = spiel_layers(peft_model)["base_model.model.model.layers.0.self_attn.q_proj"]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    data = [token_batch(seed=i, length=9) for i in range(2 * updates)]
    done = False

    def update(batches, poison=False):
        for x in batches:
            loss = peft_model(x, labels=x).loss / len(batches)
            if poison:
                loss = loss * float("inf")
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()

    for i in range(updates):
        batches = data[2 * i : 2 * i + 2]
        estimating = bool(layer._estimating_adapters())
        has_candidates = layer.spiel_candidates["default"].numel() > 0
        if overflow and not done and estimating and (has_candidates == (overflow == "mid")):
            update(batches, poison=True)
            done = True
        update(batches)
    assert done or overflow is None
    state = {}
    for name, lyr in spiel_layers(peft_model).items():
        values = lyr.sparse_values["default"]
        moments = optimizer.state[values]
        state[name] = (
            lyr.sparse_indices["default"].clone(),
            values.detach().clone(),
            moments["exp_avg"].clone(),
            moments["exp_avg_sq"].clone(),
        )
    return state


def _assert_runs_equal(got, expected):
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name][0], expected[name][0]), name
        for a, b in zip(got[name][1:], expected[name][1:]):
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_loss_scaling_does_not_change_ag_statistics_or_seeded_moments():
    plain = _scaled_run(None)
    _assert_runs_equal(_scaled_run(2.0**16), plain)


@pytest.mark.parametrize("where", ["start", "mid"])
def test_overflowing_step_in_estimation_phase_changes_nothing(where):
    _assert_runs_equal(_scaled_run(2.0**16, overflow=where), _scaled_run(2.0**16))


# ----------------------------------------------------------------------------------------- float16 values
@pytest.mark.parametrize("config_cls", [SpIELConfig, LTSFTConfig])
def test_float16_values_with_adamw_are_refused_before_the_step(config_cls):
    peft_model = get_peft_model(tiny_llama(), config_cls(target_modules=TARGETS, density=0.2, delta_dtype="float16"))
    if config_cls is LTSFTConfig:
        peft_sparse.ltsft.select_and_rewind(peft_model, verbose=False)
    peft_model.train()
    values = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    tokens = token_batch()
    peft_model(tokens, labels=tokens).loss.backward()
    with pytest.raises(ValueError, match="delta_dtype='float16'"):
        optimizer.step()
    for name, param in peft_model.named_parameters():
        if name in values:
            assert torch.equal(param, values[name]), name
    # an optimizer without second moments works with float16 values
    sgd = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    sgd.step()
    assert all(torch.isfinite(p).all() for p in peft_model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------- interrupted writes
def test_interrupted_compose_keeps_the_old_adapter_whole(tmp_path, monkeypatch):
    import peft_sparse.compose as compose

    adapter = saved_adapter(tmp_path / "a")
    out = peft_sparse.compose_adapters([adapter], [1.0], tmp_path / "out")
    (out / "README.md").write_text("notes")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as stream:
            stream.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(compose, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        peft_sparse.compose_adapters([adapter], [2.0], out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "out"]

    peft_sparse.compose_adapters([adapter], [2.0], out)
    assert (out / "README.md").read_text() == "notes"
    old, new = load_file_bytes(before[ADAPTER_FILE]), load_file(out / ADAPTER_FILE)
    for key, tensor in old.items():
        if key.endswith("ltsft_values"):
            torch.testing.assert_close(new[key], 2 * tensor)


def load_file_bytes(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


# ----------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    "config_cls, kwargs, text",
    [
        (SpIELConfig, {"density": "0.1"}, "density must be a finite number in (0.0, 1.0], got '0.1'"),
        (SpIELConfig, {"initial_reselection_rate": None}, "initial_reselection_rate must be a finite number"),
        (SpIELConfig, {"initial_reselection_rate": float("nan")}, "initial_reselection_rate must be a finite"),
        (
            SpIELConfig,
            {"num_tunable_weights": True},
            "num_tunable_weights must be a positive integer or None, got True",
        ),
        (SpIELConfig, {"match_lora_rank": True}, "match_lora_rank must be a positive integer or None, got True"),
        (SpIELConfig, {"reselection_steps": True}, "reselection_steps must be a positive integer, got True"),
        (SpIELConfig, {"total_steps": True}, "total_steps must be a positive integer or None, got True"),
        (SpIELConfig, {"seed": False}, "seed must be an integer, got False"),
        (
            LTSFTConfig,
            {"num_tunable_weights": True},
            "num_tunable_weights must be a positive integer or None, got True",
        ),
        (LTSFTConfig, {"n_iterations": True}, "n_iterations must be a positive integer, got True"),
        (LTSFTConfig, {"dense_l1_reg": float("nan")}, "dense_l1_reg must be a finite number in [0.0, inf], got nan"),
        (LTSFTConfig, {"dense_l1_reg": float("inf")}, "dense_l1_reg must be a finite number in [0.0, inf], got inf"),
        (LTSFTConfig, {"sparse_l1_reg": -1.0}, "sparse_l1_reg must be in [0.0, inf], got -1.0"),
        (LTSFTConfig, {"density": "0.1"}, "density must be a finite number in (0.0, 1.0], got '0.1'"),
    ],
)
def test_wrong_config_types_name_field_and_value(config_cls, kwargs, text):
    with pytest.raises(ValueError) as info:
        config_cls(target_modules=TARGETS, **kwargs)
    assert text in str(info.value)


@pytest.mark.parametrize("config_cls", [SpIELConfig, LTSFTConfig])
@pytest.mark.parametrize("target_modules", ["all-linear", r".*\.(q_proj|v_proj)"])
def test_layers_to_transform_with_a_string_target_is_refused(config_cls, target_modules):
    with pytest.raises(ValueError, match="layers_to_transform=\\[0\\] cannot be used when target_modules is a string"):
        config_cls(target_modules=target_modules, layers_to_transform=[0])


def test_layers_to_transform_with_a_list_target_is_honoured():
    peft_model = get_peft_model(tiny_llama(), SpIELConfig(target_modules=["q_proj"], layers_to_transform=[1]))
    assert list(spiel_layers(peft_model)) == ["base_model.model.model.layers.1.self_attn.q_proj"]


def test_density_that_rounds_to_no_entries_is_refused():
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(ValueError, match="density=1e-12 gives 0 tunable entries"):
        get_peft_model(model, SpIELConfig(target_modules=TARGETS, density=1e-12))
    assert fingerprint(model) == before


# ----------------------------------------------------------------------------------------- adapters in PEFT's tests
def test_spiel_delete_adapter_leaves_no_per_adapter_state():
    peft_model = get_peft_model(tiny_llama(), spiel_config(), adapter_name="a")
    peft_model.add_adapter("b", spiel_config(seed=3))
    peft_model.base_model.set_adapter(["a", "b"])
    peft_model.train()
    tokens = token_batch()
    peft_model(tokens, labels=tokens).loss.backward()
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1).step()
    peft_model.delete_adapter("b")
    for layer in spiel_layers(peft_model).values():
        for state in (layer.layer_seed, layer._step_cache, layer.sparse_config):
            assert "b" not in state and "a" in state
        assert "b" not in layer._pending and "b" not in layer._fresh_candidates
        assert not any("b" in getattr(layer, n) for n in layer.adapter_layer_names + layer.other_param_names)


def _trained_ltsft(tmp_path, targets=("q_proj", "v_proj")):
    """A saved LT-SFT adapter with non-zero weight and bias values (dense step, selection, sparse step)."""
    peft_model = get_peft_model(tiny_llama(), LTSFTConfig(target_modules=list(targets), num_tunable_weights=120))
    peft_model.train()
    tokens = token_batch()
    for phase in range(2):
        optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
        peft_model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        if phase == 0:
            peft_sparse.ltsft.select_and_rewind(peft_model, verbose=False)
    peft_model.save_pretrained(tmp_path)
    return tmp_path


def test_ltsft_low_cpu_mem_usage_load_equals_plain_load(tmp_path):
    path = _trained_ltsft(tmp_path)
    tokens = token_batch(seed=4)
    with torch.no_grad():
        plain = PeftModel.from_pretrained(tiny_llama(), path)(tokens).logits
        low = PeftModel.from_pretrained(tiny_llama(), path, low_cpu_mem_usage=True)(tokens).logits
        base = tiny_llama()(tokens).logits
    assert not torch.allclose(plain, base)
    assert torch.equal(low, plain)


def test_ltsft_active_adapter_that_does_not_target_a_layer(tmp_path):
    path = _trained_ltsft(tmp_path, targets=("q_proj",))
    model = PeftModel.from_pretrained(tiny_llama(), path, adapter_name="a")
    tokens = token_batch(seed=4)
    with torch.no_grad():
        only_a = model(tokens).logits
    # "b" targets k_proj only (and is zero), so with ["b", "a"] active the output is a's
    model.add_adapter("b", LTSFTConfig(target_modules=["k_proj"], num_tunable_weights=10, inference_mode=True))
    model.base_model.set_adapter(["b", "a"])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, only_a)


def test_ltsft_load_adapter_is_trainable_trains_a_second_inactive_adapter(tmp_path):
    path = _trained_ltsft(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(), path, adapter_name="a", is_trainable=True)
    model.load_adapter(path, adapter_name="b", is_trainable=True)
    assert model.active_adapters == ["a"]
    values_b = [p for n, p in model.named_parameters() if n.endswith(".b") and "ltsft_" in n and p.numel()]
    assert values_b and all(p.requires_grad for p in values_b)
    model.load_adapter(path, adapter_name="c")
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".c"))


def test_empty_value_tensors_are_not_trainable(tmp_path):
    path = _trained_ltsft(tmp_path)
    model = PeftModel.from_pretrained(tiny_llama(), path, is_trainable=True)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.numel() > 0 for _, p in trainable)
    # every trainable tensor gets a gradient (PEFT's generic tuner tests check this)
    model.train()
    tokens = token_batch()
    model(tokens, labels=tokens).loss.backward()
    assert all(p.grad is not None for _, p in trainable)
    model.base_model.set_adapter("default")
    assert all(p.numel() > 0 for p in model.parameters() if p.requires_grad)


def test_saving_in_the_ltsft_dense_phase_warns(tmp_path):
    peft_model = get_peft_model(tiny_llama(), LTSFTConfig(target_modules=TARGETS, num_tunable_weights=50))
    with pytest.warns(UserWarning, match="dense phase"):
        peft_model.save_pretrained(tmp_path / "dense")
    peft_sparse.ltsft.select_and_rewind(peft_model, verbose=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        peft_model.save_pretrained(tmp_path / "sparse")


# ----------------------------------------------------------------------------------------- earlier implementations
@pytest.mark.parametrize("config_cls", [SpIELConfig, LTSFTConfig])
def test_merge_and_unload_with_a_head_without_weight(config_cls):
    from ltsft_helpers import tiny_bert_mlm

    model = tiny_bert_mlm()
    config = config_cls(target_modules=["query", "value"], modules_to_save=["cls.predictions"], density=0.1)
    if config_cls is SpIELConfig:
        config.init_weights = False
    peft_model = get_peft_model(model, config)
    if config_cls is LTSFTConfig:
        peft_sparse.ltsft.select_and_rewind(peft_model, verbose=False)
    head = peft_model.base_model.model.cls.predictions
    assert type(head.modules_to_save["default"]).__name__ == "BertLMPredictionHead"
    assert not hasattr(head.modules_to_save["default"], "weight")
    with torch.no_grad():
        head.modules_to_save["default"].bias.add_(0.5)  # a trained head
        for _, layer in peft_model.named_modules():
            if hasattr(layer, "sparse_values") and "default" in layer.sparse_values:
                layer.sparse_values["default"].normal_(0, 0.1)
    tokens = token_batch()
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(tokens).logits
        merged = peft_model.merge_and_unload()
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        assert type(merged.cls.predictions).__name__ == "BertLMPredictionHead"
        torch.testing.assert_close(merged(tokens).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["truncated", "extra-base-weight", "nan-values"])
@pytest.mark.parametrize("is_trainable", [False, True], ids=["inference", "trainable"])
def test_failed_ltsft_load_changes_nothing(tmp_path, bad, is_trainable):
    path = _trained_ltsft(tmp_path)
    if bad == "truncated":
        _truncate(path)
    elif bad == "extra-base-weight":
        _extra_base_weight(path)
    else:

        def change(tensors):
            key = next(k for k, v in tensors.items() if k.endswith(".ltsft_values") and v.numel())
            tensors[key] = torch.full_like(tensors[key], float("inf"))

        edit_file(path, change)
    model = tiny_llama(seed=2)
    before = fingerprint(model)
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(model, path, is_trainable=is_trainable)
    assert fingerprint(model) == before


def test_transformers_from_pretrained_on_an_adapter_folder(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), spiel_config())
    tokens = token_batch()
    with torch.no_grad():
        expected = peft_model.eval()(tokens).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    model, info = LlamaForCausalLM.from_pretrained(tmp_path / "adapter", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens).logits, expected)
