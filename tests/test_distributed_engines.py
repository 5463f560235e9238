"""Engines that hide the sparse-delta values from the optimizer are refused at the first update, never silently.

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
from peft import get_peft_model

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


def _worker(rank: int, port: int, out_dir: str, engines: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank)
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
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
