"""The HF Trainer with FSDP2 reselects and saves a gathered adapter; engines that hide the sparse-delta values from
the optimizer are refused at the first update, never silently.

FSDP1 (``FullyShardedDataParallel``) and DeepSpeed ZeRO-2/3 hand the optimizer flat buffers (or flattened
views), so SpIEL could not reselect: the run would train the initial random mask. Each must raise a RuntimeError
naming the engine at the first optimizer step (2 CPU processes, gloo). The DeepSpeed cases run only where
``deepspeed`` is importable (it is not a test dependency: its CPU install builds ops at first use).
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

from peft_sparse import SpIELConfig

WORLD = 2
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


ENGINES = {"fsdp1": _fsdp1, "zero2": _deepspeed(2), "zero3": _deepspeed(3)}
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


def _worker(rank: int, port: int, out_dir: str, engines: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {"trainer": _trainer_fsdp2(out_dir)}
        for name in engines:
            model = _model()
            layers = list(spiel_layers(model).values())
            step = ENGINES[name](model, None)
            g = torch.Generator().manual_seed(100 + rank)
            outcome = {"error": None, "updates": 0}
            try:
                for _ in range(3):
                    step(torch.randint(1, VOCAB, (2, 10), generator=g))
                    outcome["updates"] += 1
            except RuntimeError as error:
                outcome["error"] = str(error)
            outcome["counted"] = int(layers[0].spiel_step["default"])
            results[name] = outcome
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    engines = ["fsdp1"] + (["zero2", "zero3"] if HAS_DEEPSPEED else [])
    mp.spawn(_worker, args=(_free_port(), str(out), engines), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


NEEDS_DEEPSPEED = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (not a test dependency)")


@pytest.mark.parametrize(
    "engine,named",
    [
        ("fsdp1", "FSDP1"),
        pytest.param("zero2", "DeepSpeed ZeRO-1/2", marks=NEEDS_DEEPSPEED),
        pytest.param("zero3", "DeepSpeed ZeRO-3", marks=NEEDS_DEEPSPEED),
    ],
)
def test_unsupported_engine_fails_at_first_update(outcomes, engine, named):
    for rank in outcomes:
        outcome = rank[engine]
        assert outcome["updates"] == 0, f"{engine} trained {outcome['updates']} updates before failing"
        assert outcome["error"] is not None and f"under {named}" in outcome["error"], outcome["error"]
        assert "FSDP2" in outcome["error"]


def test_trainer_fsdp2_reselects_and_saves_a_gathered_adapter(outcomes, tmp_path):
    runs = [rank["trainer"] for rank in outcomes]
    assert all(run["sharded"] for run in runs), "the Trainer did not shard the model with FSDP2"
    first = runs[0]
    assert set(first["steps"].values()) == {TRAINER_STEPS}
    for name, initial in first["initial"].items():
        assert not torch.equal(first["indices"][name], initial), f"{name}: no reselection happened"
        assert torch.equal(first["indices"][name], runs[1]["indices"][name])
        assert torch.equal(first["values"][name], runs[1]["values"][name])
    model = PeftModel.from_pretrained(tiny_llama(), first["saved"])
    for name, layer in spiel_layers(model).items():
        assert torch.equal(layer.sparse_indices["default"], first["indices"][name]), name
        assert torch.equal(layer.sparse_values["default"], first["values"][name]), name
