"""Under data parallelism every process must choose the same indices."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from peft import get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        from peft_sparse import SpIELConfig, sparse_deltas

        torch.manual_seed(0)
        base = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=48,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        )
        model = get_peft_model(
            base,
            SpIELConfig(
                target_modules=["q_proj", "down_proj"], density=0.1, reselection_steps=2, accumulation_steps=2
            ),
        )
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        g = torch.Generator().manual_seed(100 + rank)  # each process sees other data
        for _ in range(2):
            x = torch.randint(0, 48, (4, 12), generator=g)
            ddp(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        torch.save({name: idx.clone() for name, idx, _, _ in sparse_deltas(model)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_processes_agree_on_indices_after_reselection(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
