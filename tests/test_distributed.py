"""SpIEL on 2 CPU processes (gloo): DDP, FSDP2, accelerate and the HF Trainer, and the engines it refuses.

Every rank gets half of each global micro-batch. One process on the whole micro-batches is the reference: with mean
losses, the rank-averaged gradients of DDP/FSDP2 are its gradients, so the same entries must be dropped and grown
(same index sets after every update) and the values must agree to rounding. Reselections must happen exactly after
the updates the layer's own schedule names, and a gathered save must reload into an unsharded model.

FSDP1 (``FullyShardedDataParallel``) and DeepSpeed ZeRO hand the optimizer flat buffers (or flattened views), so
SpIEL could not reselect and the run would train the initial random mask: each must raise a RuntimeError naming the
engine at the first optimizer step. The DeepSpeed cases run only where ``deepspeed`` is importable (it is not a test
dependency: its CPU install builds ops at first use).

All runs share one pair of spawned processes (importing transformers dominates the cost).
"""

from __future__ import annotations

import importlib.util
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import VOCAB, spiel_layers, tiny_llama
from peft import PeftModel, get_peft_model
from torch.distributed.tensor import DTensor

from peft_sparse import SM3, SpIELConfig
from peft_sparse.selection import is_reselection_step

WORLD = 2
UPDATES = 6
MICRO_BATCHES = 2  # per update (gradient accumulation)
ROWS = 4  # rows of a global micro-batch; each rank takes ROWS // WORLD
SELECTIONS = ("ag", "ma", "random")
PARALLEL = ("ddp", "fsdp2")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(selection: str) -> SpIELConfig:
    return SpIELConfig(
        target_modules=["q_proj", "v_proj", "down_proj"],
        density=0.1,
        selection=selection,
        reselection_steps=2,
        accumulation_steps=2,
        total_steps=UPDATES,
        seed=3,
    )


def _micro_batch(update: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * update + micro)
    return torch.randint(1, VOCAB, (ROWS, 10), generator=g)


def _probe() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))


def _snapshot(model) -> dict:
    out = {}
    for name, layer in spiel_layers(model).items():
        out[name + ".indices"] = layer.sparse_indices["default"].clone()
        values = layer.sparse_values["default"]
        out[name + ".values"] = (values.full_tensor() if isinstance(values, DTensor) else values).detach().clone()
    return out


def _accelerate_fsdp2():
    # accelerate turns FSDP on only for GPU-like devices; on CPU (MULTI_CPU) we switch its shared state to FSDP
    # with an FSDP2 plugin, after which prepare() really calls fully_shard (the values become DTensors).
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=True)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        state_dict_type="FULL_STATE_DICT",
    )
    assert accelerator.is_fsdp2
    return accelerator


def train(selection: str, engine: str, rank: int = 0, world: int = 1, save_dir: str | None = None) -> dict:
    """Train a tiny SpIEL model for UPDATES updates; ``engine`` is "single", "ddp", "fsdp2" or "accelerate"."""
    model = get_peft_model(tiny_llama(), _config(selection))
    model.train()
    forward = model
    if engine == "ddp":
        forward = torch.nn.parallel.DistributedDataParallel(model)
        broadcast = [name for name in forward.named_module_buffers if "spiel_" in name]
        assert not broadcast, f"DDP broadcasts sparse buffers each forward: {broadcast}"
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = SM3(params, lr=0.05) if selection == "ma" else torch.optim.AdamW(params, lr=0.05)
    if engine == "accelerate":
        accelerator = _accelerate_fsdp2()
        forward, optimizer = accelerator.prepare(model, optimizer)
        assert isinstance(
            spiel_layers(model)["base_model.model.model.layers.0.self_attn.q_proj"].sparse_values["default"], DTensor
        ), "accelerate did not shard the model"
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    history, losses = [], []
    for update in range(UPDATES):
        for micro in range(MICRO_BATCHES):
            x = _micro_batch(update, micro)[rows]
            loss = forward(input_ids=x, labels=x).loss / MICRO_BATCHES
            loss.backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        history.append({k: v for k, v in _snapshot(model).items() if k.endswith(".indices")})
    result = {"history": history, "final": _snapshot(model), "losses": losses}
    model.eval()
    with torch.no_grad():
        result["logits"] = forward(input_ids=_probe()).logits.clone()
    if save_dir is not None:
        if engine == "accelerate":
            state = accelerator.get_state_dict(forward)  # gathered; full tensors on rank 0
        elif engine == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # a collective: every rank takes part; the full (unsharded) tensors land on CPU
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = None
        if rank == 0:
            model.save_pretrained(save_dir, state_dict=state)
    return result


def _model():
    config = SpIELConfig(
        target_modules=["q_proj", "down_proj"], density=0.1, reselection_steps=2, accumulation_steps=2
    )
    model = get_peft_model(tiny_llama(), config)
    model.train()
    return model


def _fsdp1(model, optimizer_params):
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)

    def step(x):
        wrapped(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def _deepspeed(stage):
    def make(model, _):
        import deepspeed

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

        def step(x):
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()

        return step

    return make


UNSUPPORTED = {"fsdp1": _fsdp1, "zero2": _deepspeed(2), "zero3": _deepspeed(3)}
TRAINER_STEPS = 4


def _full(values: torch.Tensor) -> torch.Tensor:
    return (values.full_tensor() if isinstance(values, DTensor) else values).detach().clone()


def _trainer_fsdp2(out_dir: str) -> dict:
    # The Trainer's FSDP2 path is accelerate's, which accelerate enables only on GPU-like devices; on CPU the shared
    # accelerate state is switched to FSDP with an FSDP2 plugin after the Trainer made its Accelerator.
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    from transformers import Trainer, TrainingArguments

    model = _model()
    initial = {name: layer.sparse_indices["default"].clone() for name, layer in spiel_layers(model).items()}
    rows = torch.randint(1, VOCAB, (4 * TRAINER_STEPS, 10), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        os.path.join(out_dir, "trainer"),
        use_cpu=True,
        per_device_train_batch_size=2,
        max_steps=TRAINER_STEPS,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        fsdp=True,
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
    )
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in rows])
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        state_dict_type="FULL_STATE_DICT",
    )
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    trainer.train()
    layers = spiel_layers(model)
    result = {
        "initial": initial,
        "sharded": all(isinstance(layer.sparse_values["default"], DTensor) for layer in layers.values()),
        "steps": {name: int(layer.spiel_step["default"]) for name, layer in layers.items()},
        "indices": {name: layer.sparse_indices["default"].clone() for name, layer in layers.items()},
        "values": {name: _full(layer.sparse_values["default"]) for name, layer in layers.items()},
        "saved": os.path.join(out_dir, "trainer-adapter"),
    }
    trainer.save_model(result["saved"])  # gathers the state dict (FULL_STATE_DICT); rank 0 writes
    return result


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for engine in PARALLEL:
            for selection in SELECTIONS:
                save_dir = os.path.join(out_dir, f"{engine}-{selection}")
                results[engine, selection] = train(selection, engine, rank, WORLD, save_dir)
        # these switch the process's accelerate state to FSDP
        results["accelerate", "ag"] = train("ag", "accelerate", rank, WORLD, os.path.join(out_dir, "accelerate-ag"))
        results["trainer"] = _trainer_fsdp2(out_dir)
        for name in ["fsdp1"] + (["zero2", "zero3"] if HAS_DEEPSPEED else []):
            results[name] = _refused(name, rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _refused(name: str, rank: int) -> dict:
    model = _model()
    layers = list(spiel_layers(model).values())
    step = UNSUPPORTED[name](model, None)
    g = torch.Generator().manual_seed(100 + rank)
    outcome = {"error": None, "updates": 0}
    try:
        for _ in range(3):
            step(torch.randint(1, VOCAB, (2, 10), generator=g))
            outcome["updates"] += 1
    except RuntimeError as error:
        outcome["error"] = str(error)
    outcome["counted"] = int(layers[0].spiel_step["default"])
    return outcome


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    single = {selection: train(selection, "single") for selection in SELECTIONS}
    return out, ranks, single


def _changed_after(history: list[dict], initial: dict) -> list[int]:
    steps, previous = [], initial
    for step, snapshot in enumerate(history, start=1):
        if any(not torch.equal(snapshot[k], previous[k]) for k in snapshot):
            steps.append(step)
        previous = snapshot
    return steps


@pytest.mark.parametrize("selection", SELECTIONS)
def test_single_process_reference_reselects_on_schedule(runs, selection):
    _, _, single = runs
    config = _config(selection)
    initial = {
        name + ".indices": layer.sparse_indices["default"]
        for name, layer in spiel_layers(get_peft_model(tiny_llama(), config)).items()
    }
    scheduled = [
        s
        for s in range(1, UPDATES + 1)
        if is_reselection_step(s, config.reselection_steps, UPDATES, config.accumulation_steps)
    ]
    assert scheduled, "the run is too short to reselect"
    assert _changed_after(single[selection]["history"], initial) == scheduled


RUNS = [(engine, selection) for engine in PARALLEL for selection in SELECTIONS] + [("accelerate", "ag")]


@pytest.mark.parametrize("engine,selection", RUNS)
def test_ranks_agree_and_equal_one_process_on_all_data(runs, engine, selection):
    _, ranks, single = runs
    reference = single[selection]
    for rank in ranks:
        run = rank[engine, selection]
        for step, (got, want) in enumerate(zip(run["history"], reference["history"]), start=1):
            for name in want:
                assert torch.equal(got[name], want[name]), f"{engine} {selection}: {name} after update {step}"
        for name, want in reference["final"].items():
            torch.testing.assert_close(run["final"][name], want, rtol=1e-4, atol=1e-5, msg=f"{engine} {name}")
        torch.testing.assert_close(run["logits"], reference["logits"], rtol=1e-4, atol=1e-4)
    for name, value in ranks[0][engine, selection]["final"].items():
        assert torch.equal(value, ranks[1][engine, selection]["final"][name]), name


@pytest.mark.parametrize("engine,selection", RUNS)
def test_saved_adapter_reloads_unsharded(runs, engine, selection):
    out, ranks, _ = runs
    model = PeftModel.from_pretrained(tiny_llama(), str(out / f"{engine}-{selection}")).eval()
    for name, want in ranks[0][engine, selection]["final"].items():
        layer_name, role = name.rsplit(".", 1)
        layer = spiel_layers(model)[layer_name]
        got = layer.sparse_indices["default"] if role == "indices" else layer.sparse_values["default"]
        assert torch.equal(got, want), name
    with torch.no_grad():
        logits = model(input_ids=_probe()).logits
    torch.testing.assert_close(logits, ranks[0][engine, selection]["logits"], rtol=1e-5, atol=1e-5)


NEEDS_DEEPSPEED = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (not a test dependency)")


@pytest.mark.parametrize(
    "engine,named",
    [
        ("fsdp1", "FSDP1"),
        pytest.param("zero2", "DeepSpeed ZeRO-1/2", marks=NEEDS_DEEPSPEED),
        pytest.param("zero3", "DeepSpeed ZeRO-3", marks=NEEDS_DEEPSPEED),
    ],
)
def test_unsupported_engine_fails_at_first_update(runs, engine, named):
    for rank in runs[1]:
        outcome = rank[engine]
        assert outcome["updates"] == 0, f"{engine} trained {outcome['updates']} updates before failing"
        assert outcome["counted"] == 0
        assert outcome["error"] is not None and f"under {named}" in outcome["error"], outcome["error"]
        assert "FSDP2" in outcome["error"]


def test_trainer_fsdp2_reselects_and_saves_a_gathered_adapter(runs):
    trainer_runs = [rank["trainer"] for rank in runs[1]]
    assert all(run["sharded"] for run in trainer_runs), "the Trainer did not shard the model with FSDP2"
    first = trainer_runs[0]
    assert set(first["steps"].values()) == {TRAINER_STEPS}
    for name, initial in first["initial"].items():
        assert not torch.equal(first["indices"][name], initial), f"{name}: no reselection happened"
        assert torch.equal(first["indices"][name], trainer_runs[1]["indices"][name])
        assert torch.equal(first["values"][name], trainer_runs[1]["values"][name])
    model = PeftModel.from_pretrained(tiny_llama(), first["saved"])
    for name, layer in spiel_layers(model).items():
        assert torch.equal(layer.sparse_indices["default"], first["indices"][name]), name
        assert torch.equal(layer.sparse_values["default"], first["values"][name]), name
