"""SpIEL under DDP and FSDP2 (2 CPU processes, gloo) equals one process trained on the concatenated batches.

Every rank gets half of each global micro-batch. One process on the whole micro-batches is the reference: with mean
losses, the rank-averaged gradients of DDP/FSDP2 are its gradients, so the same entries must be dropped and grown
(same index sets after every update) and the values must agree to rounding. Reselections must happen exactly after
the updates the layer's own schedule names, and a gathered save must reload into an unsharded model.
"""

from __future__ import annotations

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
ENGINES = ("ddp", "fsdp2")


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


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for engine in ENGINES:
            for selection in SELECTIONS:
                save_dir = os.path.join(out_dir, f"{engine}-{selection}")
                results[engine, selection] = train(selection, engine, rank, WORLD, save_dir)
        # last: it switches the process's accelerate state to FSDP
        results["accelerate", "ag"] = train("ag", "accelerate", rank, WORLD, os.path.join(out_dir, "accelerate-ag"))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
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
    scheduled = [s for s in range(1, UPDATES + 1) if is_reselection_step(s, config.reselection_steps, UPDATES)]
    assert scheduled, "the run is too short to reselect"
    assert _changed_after(single[selection]["history"], initial) == scheduled


RUNS = [(engine, selection) for engine in ENGINES for selection in SELECTIONS] + [("accelerate", "ag")]


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
