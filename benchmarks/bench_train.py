"""Training benchmark: SpIEL and LT-SFT against LoRA, (IA)^3, full fine-tuning and QLoRA (issue 5).

Every method fine-tunes the same base model (same initial weights, same data order, same LR schedule shape, its own
learning rate) with a plain PyTorch loop, in its own process, with and without gradient checkpointing. Measured per
method and setting: median / min / max (and mean) step time after warm-up, peak memory, trainable parameters, the
training loss curve and the loss on a held-out split that is the same for every method.

Presets:

- ``cpu-tiny``: a small Llama built from a ``LlamaConfig`` (byte tokens, vocabulary 256), float32 on the CPU. The base
  is first pre-trained densely on one part of the shipped corpus (cached, see ``--base-dir``); each method then
  fine-tunes on a second part and is evaluated on a third (paragraphs between the fine-tuning ones). Peak memory is the
  worker's peak RSS during training (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, its mark reset through
  ``/proc/self/clear_refs`` once the model is built, where Linux allows); ``peak_mem_above_baseline_bytes`` subtracts
  the RSS at that point (the interpreter, torch, the data, the model). Every method and setting runs twice,
  interleaved, and the step times are pooled (``--repeats``): about 6 minutes on 2 cores for all methods and both
  checkpointing settings.
- ``cpu-hotpath``: the step-time shape of issue 7 (hidden 1024, intermediate 2816, 2 layers, 512 tokens, float32,
  one thread, LoRA r=16 against ``match_lora_rank=16``, S=20, gamma=5), 24 updates of which 3 are warm-up, so the
  timed updates hold one SpIEL-AG estimation phase and the first (full) reselection. Not pre-trained. Run with
  ``--methods lora,spiel-ag,spiel-ma,spiel-random --gradient-checkpointing off``.
- ``gpu-7b-2layer``: two decoder layers of Llama-7B's shape (vocabulary 32000), bf16, 2 x 2048 tokens, LoRA r=64
  against SpIEL at its budget, 44 updates (reselections after updates 5, all of K, and 25, the steady state); the
  model of ``benchmarks/gpu_check.sh``.
- ``gpu-1b``: a ~1.1B-parameter Llama (TinyLlama's shape, random weights from a seeded config), bf16, sequence 2048,
  on one CUDA GPU. Peak memory is ``torch.cuda.max_memory_allocated``; in addition, the thesis' measure (appendix E.5):
  the smallest ``torch.cuda.set_per_process_memory_fraction`` limit, at 1 GiB steps, under which 30 training steps
  complete, found by binary search with each try in its own process (``min_memory_fraction_gib``). The base is not
  pre-trained there, so its held-out losses only show that training works.

Methods: full, lora, lora-dropout (LoRA with dropout 0.1), ia3, spiel-ag, spiel-ma (with ``peft_sparse.SM3``),
spiel-random, ltsft (dense phase, ``select_and_rewind``, sparse phase; step time and loss curve of the sparse phase,
peak memory of the whole run), and on the GPU qlora, qspiel-ag, qspiel-ma (bitsandbytes NF4, double quantisation, bf16
compute, ``prepare_model_for_kbit_training``). SpIEL budgets use ``match_lora_rank=r`` over LoRA's target modules and
LT-SFT's ``num_tunable_weights`` is LoRA's parameter count, so all sparse methods train as many values as LoRA.

``--interleave-steps`` (all methods in one process, one update of each in turn) also takes SpIEL methods as
``METHOD@MODE``, whose updates run with ``PEFT_SPARSE_INPLACE_MERGE=MODE`` (``hold``, ``product`` or ``0``), to compare
how ``W + delta`` is formed round by round (``benchmarks/results/cpu-hotpath-merge``).

Writes ``DIR/results.json`` (one record per method and setting), ``DIR/meta.json`` (settings, machine, date),
``DIR/results.md`` (the table with ratios to LoRA at the same checkpointing setting, the learning rates, the targets,
the top ops of one profiled update, and ``DIR/notes.md`` when present) and ``DIR/results.png`` (time and memory bars,
loss curves). ``--report-only`` rewrites the last two from the JSON files.

    python benchmarks/bench_train.py --preset cpu-tiny --out benchmarks/results/cpu-tiny
    python benchmarks/bench_train.py --preset cpu-tiny --out /tmp/micro --methods lora,spiel-ag --steps 3 --repeats 1
    python benchmarks/bench_train.py --preset cpu-hotpath --out benchmarks/results/cpu-hotpath \
        --methods lora,spiel-ag,spiel-ma,spiel-random --gradient-checkpointing off
    python benchmarks/bench_train.py --preset gpu-1b --out benchmarks/results/gpu-1b   # needs CUDA and bitsandbytes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GIB = 1 << 30
ALL_METHODS = (
    "full",
    "lora",
    "lora-dropout",
    "ia3",
    "spiel-ag",
    "spiel-ma",
    "spiel-random",
    "ltsft",
    "qlora",
    "qspiel-ag",
    "qspiel-ma",
)
GPU_ONLY_METHODS = ("qlora", "qspiel-ag", "qspiel-ma")
# --interleave-steps also takes METHOD@MODE: a SpIEL method whose updates run with PEFT_SPARSE_INPLACE_MERGE=MODE
MERGE_ENV_VAR = "PEFT_SPARSE_INPLACE_MERGE"
MERGE_MODES = ("hold", "product", "0")


def base_method(method: str) -> str:
    """``spiel-ma`` for ``spiel-ma@product``: the method without its merge mode."""
    return method.partition("@")[0]


def make_job(settings: dict, method: str, preset: str, gradient_checkpointing: bool, base_dir, seed: int, **extra):
    """One method's run: the preset's settings with the method (its merge mode dropped) and its learning rate."""
    method = base_method(method)
    return dict(
        settings,
        method=method,
        preset=preset,
        gradient_checkpointing=gradient_checkpointing,
        lr=settings["lrs"][method],
        base_dir=str(base_dir),
        seed=seed,
        **extra,
    )


LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The corpus is cut at a paragraph boundary: the first PRETRAIN_FRACTION pre-trains the base densely; of the
# paragraphs after it, every HELD_OUT_EVERY-th is held out and the rest is the fine-tuning data (same topics).
PRETRAIN_FRACTION = 0.5
HELD_OUT_EVERY = 4
LR_WARMUP_FRACTION = 0.1  # then linear decay to 0 (the thesis: linear decay after a short warm-up)
GRAD_CLIP = 1.0
LORA_ALPHA = 16  # the thesis' LoRA alpha (r = 64 there)
LORA_DROPOUT = 0.1
EXIT_OOM = 3
LR_NOTE = {
    "cpu": "each the best of a quick sweep of 3-4 rates on this preset by held-out loss; every method's loss falls",
    "cuda": "the thesis' choices (table 7.1) where it has them, LoRA-like otherwise; not tuned for this model",
}
NOTES_FILE = "notes.md"  # hand-written analysis in the output folder, appended to results.md


@dataclasses.dataclass
class Preset:
    """Model shape and training settings of one benchmark preset."""

    name: str
    device: str
    dtype: str
    model: dict[str, Any]
    seq_len: int
    batch_size: int
    steps: int
    warmup_steps: int
    rank: int
    lrs: dict[str, float]
    pretrain_steps: int = 0
    pretrain_lr: float = 3e-3
    reselection_steps: int = 20
    accumulation_steps: int = 5
    threads: int | None = None
    memory_search: bool = False
    memory_search_steps: int = 30
    profile: tuple[str, ...] = ()
    repeats: int = 1


PRESETS = {
    "cpu-tiny": Preset(
        name="cpu-tiny",
        device="cpu",
        dtype="float32",
        model=dict(
            vocab_size=256,
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        ),
        seq_len=128,
        batch_size=8,
        steps=40,
        warmup_steps=3,
        rank=4,
        # picked on this preset by a sweep of 3-4 rates per method (about /3, x1, x3), the lowest held-out loss
        lrs={
            "full": 1e-3,
            "lora": 5e-3,
            "lora-dropout": 5e-3,
            "ia3": 1e-1,
            "spiel-ag": 1e-3,
            "spiel-ma": 1e-2,  # 3e-2 reached the same held-out loss but with a loss spike
            "spiel-random": 1e-2,
            "ltsft-dense": 1e-3,
            "ltsft": 1e-2,
        },
        pretrain_steps=200,
        pretrain_lr=3e-3,
        reselection_steps=10,
        accumulation_steps=3,
        threads=1,
        profile=("lora", "spiel-ag", "spiel-ma"),
        repeats=2,
    ),
    # The shape of issue 7's step-time targets: SpIEL at LoRA's step time on one CPU thread, 512 tokens per step.
    "cpu-hotpath": Preset(
        name="cpu-hotpath",
        device="cpu",
        dtype="float32",
        model=dict(
            vocab_size=256,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
        seq_len=512,
        batch_size=1,
        steps=24,
        warmup_steps=3,
        rank=16,
        # not swept: this preset measures time and memory; the cpu-tiny rates scaled down for the wider model
        lrs={
            "full": 3e-4,
            "lora": 2e-3,
            "lora-dropout": 2e-3,
            "ia3": 3e-2,
            "spiel-ag": 3e-4,
            "spiel-ma": 3e-3,
            "spiel-random": 3e-3,
            "ltsft-dense": 3e-4,
            "ltsft": 3e-3,
        },
        pretrain_steps=0,
        reselection_steps=20,
        accumulation_steps=5,
        threads=1,
        profile=("lora", "spiel-ag", "spiel-ma", "spiel-random"),
        repeats=2,
    ),
    # Two decoder layers of Llama-7B's shape (issue 7's GPU check): LoRA r=64 against SpIEL at its budget, bf16.
    "gpu-7b-2layer": Preset(
        name="gpu-7b-2layer",
        device="cuda",
        dtype="bfloat16",
        model=dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
        seq_len=2048,
        batch_size=2,
        steps=44,
        warmup_steps=3,
        rank=64,
        lrs={
            "full": 2e-5,
            "lora": 1e-4,
            "lora-dropout": 1e-4,
            "ia3": 1e-3,
            "spiel-ag": 1e-4,
            "spiel-ma": 1e-3,
            "spiel-random": 1e-4,
            "ltsft-dense": 2e-5,
            "ltsft": 1e-4,
            "qlora": 1e-4,
            "qspiel-ag": 1e-4,
            "qspiel-ma": 1e-3,
        },
        reselection_steps=20,
        accumulation_steps=5,
    ),
    "gpu-1b": Preset(
        name="gpu-1b",
        device="cuda",
        dtype="bfloat16",
        model=dict(  # TinyLlama-1.1B's shape
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
        seq_len=2048,
        batch_size=4,
        steps=40,
        warmup_steps=5,
        rank=64,
        # the thesis' Llama-2-7b choices where it has them (table 7.1), LoRA-like otherwise
        lrs={
            "full": 2e-5,
            "lora": 1e-4,
            "lora-dropout": 1e-4,
            "ia3": 1e-3,
            "spiel-ag": 1e-4,
            "spiel-ma": 1e-3,
            "spiel-random": 1e-4,
            "ltsft-dense": 2e-5,
            "ltsft": 1e-4,
            "qlora": 1e-4,
            "qspiel-ag": 1e-4,
            "qspiel-ma": 1e-3,
        },
        memory_search=True,
    ),
}


# ============================================================================================ arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, validated against the preset (GPU-only methods on a CPU preset are an error)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    parser.add_argument("--out", type=Path, default=None, help="output folder (required)")
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {','.join(ALL_METHODS)}; with --interleave-steps also SpIEL methods as "
        f"METHOD@MODE, whose updates run with {MERGE_ENV_VAR}=MODE ({', '.join(MERGE_MODES)})",
    )
    parser.add_argument("--gradient-checkpointing", choices=("both", "on", "off"), default="both")
    parser.add_argument("--steps", type=int, default=None, help="optimizer updates per run (LT-SFT: per phase)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="first updates left out of the timing")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank; the sparse methods get its budget")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="dense pre-training of the base (0: none)")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="override a learning rate")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads of each CPU worker")
    parser.add_argument(
        "--base-dir", type=Path, default=None, help="base model cache (default: TMPDIR/peft_sparse_bench_train/PRESET)"
    )
    parser.add_argument("--memory-search", choices=("on", "off"), default=None, help="GPU: thesis memory search")
    parser.add_argument("--memory-search-steps", type=int, default=None)
    parser.add_argument(
        "--profile", default=None, help="methods whose first step after warm-up is profiled ('none' for none)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per method and setting, interleaved; step times pooled"
    )
    parser.add_argument(
        "--interleave-steps",
        action="store_true",
        help="time all methods in one process, one update of each in turn (rotating order), and report per-round "
        "step-time ratios to LoRA (robust to load that drifts on a shared machine); writes DIR/interleaved.*",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--worker-timeout", type=int, default=1800, help="seconds per worker process (0: no limit, as the tests use)"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite results.md and results.png from DIR/results.json and DIR/meta.json (e.g. after notes.md)",
    )
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # a job file: run one job
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    if args.out is None:
        parser.error("--out DIR is required (the committed results live in benchmarks/results/PRESET)")
    preset = PRESETS[args.preset]
    methods = ALL_METHODS if args.methods is None else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.methods is None and preset.device == "cpu":
        methods = tuple(m for m in ALL_METHODS if m not in GPU_ONLY_METHODS)
    unknown = [m for m in methods if base_method(m) not in ALL_METHODS]
    if unknown or not methods:
        parser.error(f"--methods must be a comma-separated subset of {','.join(ALL_METHODS)}, got {args.methods!r}")
    for method in methods:
        mode = method.partition("@")[2]
        if "@" in method and (not args.interleave_steps or not method.startswith("spiel") or mode not in MERGE_MODES):
            parser.error(
                f"--methods {method!r}: METHOD@MODE (a SpIEL method with {MERGE_ENV_VAR}=MODE for its updates, "
                f"MODE in {'|'.join(MERGE_MODES)}) needs --interleave-steps"
            )
    if preset.device == "cpu" and any(m in GPU_ONLY_METHODS for m in methods):
        parser.error(f"--methods {','.join(m for m in methods if m in GPU_ONLY_METHODS)} need CUDA (preset gpu-1b)")
    args.methods = methods
    lrs = dict(preset.lrs)
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in lrs:
            parser.error(f"--lr takes METHOD=LR with METHOD in {sorted(lrs)}, got {item!r}")
        try:
            lrs[name] = float(value)
        except ValueError:
            parser.error(f"--lr {item!r}: {value!r} is not a number")
    overrides = dict(
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        rank=args.rank,
        pretrain_steps=args.pretrain_steps,
        threads=args.threads,
        memory_search_steps=args.memory_search_steps,
        repeats=args.repeats,
    )
    settings = dataclasses.asdict(preset)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings["lrs"] = lrs
    if args.memory_search is not None:
        settings["memory_search"] = args.memory_search == "on"
    if args.profile is not None:
        settings["profile"] = tuple(m for m in args.profile.split(",") if m and m != "none")
    if args.steps is not None and args.warmup_steps is None:
        settings["warmup_steps"] = min(settings["warmup_steps"], max(0, args.steps - 1))
    for name in ("steps", "batch_size", "seq_len", "rank", "memory_search_steps", "repeats"):
        if settings[name] < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    if not 0 <= settings["warmup_steps"] < settings["steps"]:
        parser.error(f"--warmup-steps must be in [0, steps={settings['steps']}), got {settings['warmup_steps']}")
    if settings["pretrain_steps"] < 0:
        parser.error(f"--pretrain-steps must be >= 0, got {settings['pretrain_steps']}")
    if settings["seq_len"] > settings["model"]["max_position_embeddings"]:
        settings["model"]["max_position_embeddings"] = settings["seq_len"]
    args.settings = settings
    args.base_dir = args.base_dir or Path(tempfile.gettempdir()) / "peft_sparse_bench_train" / preset.name
    args.gc_settings = {"both": [False, True], "on": [True], "off": [False]}[args.gradient_checkpointing]
    return args


# ============================================================================================ data
def corpus_tokens():
    """The shipped corpus as byte tokens: (pre-training, fine-tuning, held-out) parts, cut at paragraph boundaries.

    The held-out paragraphs sit between the fine-tuning ones (the same topics), so the held-out loss measures how well
    a method learned the fine-tuning data, not only how much the base model knows.
    """
    import torch

    from peft_sparse.data import load_corpus

    text = load_corpus()
    cut = text.rfind("\n\n", 0, int(len(text) * PRETRAIN_FRACTION))
    paragraphs = text[cut:].strip("\n").split("\n\n")
    held = [p for i, p in enumerate(paragraphs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    finetune = [p for i, p in enumerate(paragraphs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    parts = (text[:cut], "\n\n".join(finetune), "\n\n".join(held))
    return tuple(torch.tensor(list(p.encode("utf-8")), dtype=torch.long) for p in parts)


def batch_schedule(tokens, steps: int, batch_size: int, seq_len: int, seed: int):
    """``[steps, batch, seq_len]`` windows at seeded random offsets: the same data order for every method."""
    import torch

    if tokens.numel() <= seq_len:
        raise ValueError(f"seq_len={seq_len} does not fit in a corpus part of {tokens.numel()} tokens")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (steps, batch_size), generator=gen)
    return tokens[starts[..., None] + torch.arange(seq_len)]


def held_out_windows(tokens, seq_len: int):
    """Disjoint windows of the held-out part."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise ValueError(f"seq_len={seq_len} does not fit in the held-out part of {tokens.numel()} tokens")
    return tokens[: n * seq_len].view(n, seq_len)


def held_out_loss(model, windows, device: str, batch_size: int) -> float:
    """Mean next-token cross-entropy over ``windows`` (every window weighted by its number of targets)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            targets = ids.numel() - ids.shape[0]
            total += float(model(input_ids=ids, labels=ids).loss) * targets
            count += targets
    model.train()
    return total / count


# ============================================================================================ base model
def prepare_base(settings: dict, base_dir: Path, seed: int) -> dict:
    """Build (and for CPU presets densely pre-train) the base model once; cached in ``base_dir`` with its settings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    key = {
        "model": settings["model"],
        "dtype": settings["dtype"],
        "pretrain_steps": settings["pretrain_steps"],
        "pretrain_lr": settings["pretrain_lr"],
        "seq_len": settings["seq_len"],
        "batch_size": settings["batch_size"],
        "seed": seed,
        "splits": [PRETRAIN_FRACTION, HELD_OUT_EVERY],
    }
    info_path = base_dir / "bench_base.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("key") == key:
            print(f"base model: cached in {base_dir}")
            return info
    device = settings["device"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings["model"]))
    pretrain, _, held = corpus_tokens()
    windows = held_out_windows(held, settings["seq_len"])
    info: dict[str, Any] = {"key": key, "parameters": sum(p.numel() for p in model.parameters())}
    info["random_init_eval_loss"] = held_out_loss(model, windows, "cpu", 16) if device == "cpu" else None
    started = time.perf_counter()
    if settings["pretrain_steps"]:
        model.to(device)
        steps, batch_size, seq_len = settings["pretrain_steps"], settings["batch_size"], settings["seq_len"]
        batches = batch_schedule(pretrain, steps, batch_size, seq_len, seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings["pretrain_lr"], weight_decay=0.0)
        scheduler = lr_schedule(optimizer, settings["pretrain_steps"])
        model.train()
        for step, ids in enumerate(batches):
            ids = ids.to(device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % max(1, settings["pretrain_steps"] // 5) == 0:
                print(f"  pre-training step {step + 1}/{settings['pretrain_steps']}: loss {loss.item():.3f}")
        info["pretrain_seconds"] = round(time.perf_counter() - started, 1)
        model.cpu()
    info["base_eval_loss"] = held_out_loss(model, windows, "cpu", 16) if device == "cpu" else None
    model.to(getattr(torch, settings["dtype"]))
    base_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(base_dir)
    info_path.write_text(json.dumps(info, indent=1))
    print(f"base model: {info['parameters']:,} parameters saved to {base_dir}")
    return info


def optimizer_update(loss, params, optimizer, scheduler) -> None:
    """The rest of one training update after the forward: backward, gradient clipping, step, schedule, zero."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def lr_schedule(optimizer, steps: int, warmup_fraction: float = LR_WARMUP_FRACTION):
    """Linear warm-up over ``warmup_fraction`` of the steps (at least one), then linear decay to 0."""
    import torch

    warmup = max(1, round(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ============================================================================================ worker
def lora_parameter_count(model_config: dict, rank: int) -> int:
    """LoRA's parameter count at ``rank`` on every linear layer of the Llama blocks: ``r * (in + out)`` each."""
    h, i = model_config["hidden_size"], model_config["intermediate_size"]
    heads, kv = model_config["num_attention_heads"], model_config["num_key_value_heads"]
    kv_dim = h // heads * kv
    per_layer = 2 * (h + h) + 2 * (h + kv_dim) + 3 * (h + i)  # q, o; k, v; gate, up, down
    return rank * per_layer * model_config["num_hidden_layers"]


def load_model(job: dict):
    """The base model for ``job``'s method: bf16/fp32 weights, or NF4 for the q-methods; checkpointing as asked."""
    import torch
    from transformers import LlamaForCausalLM

    method, gc, device = job["method"], job["gradient_checkpointing"], job["device"]
    dtype = getattr(torch, job["dtype"])
    gc_kwargs = {"use_reentrant": False}
    if method.startswith("q"):
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = LlamaForCausalLM.from_pretrained(
            job["base_dir"], quantization_config=quantization, dtype=torch.bfloat16, device_map={"": 0}
        )
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs
        )
    else:
        model = LlamaForCausalLM.from_pretrained(job["base_dir"], dtype=dtype).to(device)
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    model.config.use_cache = False
    return model


def wrap_model(model, job: dict):
    """Apply ``job``'s method; returns ``(model, make_optimizer)``, ``make_optimizer(model, lr)`` a fresh one."""
    import torch
    from peft import IA3Config, LoraConfig, get_peft_model

    import peft_sparse

    method, rank, seed = job["method"], job["rank"], job["seed"]

    def adamw(m, lr):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    if method == "full":
        return model, adamw
    if method in ("lora", "lora-dropout", "qlora"):
        dropout = LORA_DROPOUT if method == "lora-dropout" else 0.0
        config = LoraConfig(
            task_type="CAUSAL_LM", target_modules=LLAMA_LINEAR, r=rank, lora_alpha=LORA_ALPHA, lora_dropout=dropout
        )
        return get_peft_model(model, config), adamw
    if method == "ia3":
        return get_peft_model(model, IA3Config(task_type="CAUSAL_LM")), adamw
    if method == "ltsft":
        config = peft_sparse.LTSFTConfig(
            task_type="CAUSAL_LM",
            target_modules=LLAMA_LINEAR,
            num_tunable_weights=lora_parameter_count(job["model"], rank),
        )
        return get_peft_model(model, config), adamw
    selection = method.split("-")[1]  # spiel-ag, qspiel-ma, ...
    config = peft_sparse.SpIELConfig(
        task_type="CAUSAL_LM",
        target_modules=LLAMA_LINEAR,
        match_lora_rank=rank,
        selection=selection,
        reselection_steps=job["reselection_steps"],
        accumulation_steps=job["accumulation_steps"],
        total_steps=job["steps"],
        seed=seed,
    )
    model = get_peft_model(model, config)
    if selection == "ma":
        return model, lambda m, lr: peft_sparse.SM3([p for p in m.parameters() if p.requires_grad], lr=lr)
    return model, adamw


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; falls back to the peak so far elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: ``/proc/self/clear_refs`` = 5, which ``ru_maxrss`` follows)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def train_phase(model, optimizer, batches, job: dict, profile: bool) -> dict:
    """Train on ``batches`` (one optimizer update each); returns the losses, the step times and the profile."""
    import torch

    device = job["device"]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    scheduler = lr_schedule(optimizer, len(batches))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses, times, top_ops, rss_floor, saved = [], [], None, 0, None
    model.train()
    for step, ids in enumerate(batches):
        ids = ids.to(device)
        # the first update (untimed when there is a warm-up) also counts the tensors kept for the backward
        counter = SavedTensorCounter(model) if step == 0 else contextlib.nullcontext()
        # the first update after warm-up, unless that would leave nothing to time
        profiling = profile and step == job["warmup_steps"] and len(batches) - step >= 2
        profiler = torch.profiler.profile(activities=profiler_activities(device)) if profiling else None
        if profiler is not None:
            if device == "cpu":  # the profiler's own memory must not count: keep the peak so far, reset after
                rss_floor = peak_rss_bytes()
            profiler.__enter__()
        sync()
        started = time.perf_counter()
        with counter:
            loss = model(input_ids=ids, labels=ids).loss
        if step == 0:
            saved = counter.nbytes
        optimizer_update(loss, params, optimizer, scheduler)
        sync()
        elapsed = time.perf_counter() - started
        if profiler is not None:
            profiler.__exit__(None, None, None)
            top_ops = summarize_profile(profiler, device)
            del profiler
            if device == "cpu" and not reset_peak_rss():
                rss_floor = 0  # cannot reset: the peak includes the profiled update

        elif step >= job["warmup_steps"]:
            times.append(elapsed)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{job['method']}: loss is {losses[-1]} at step {step + 1}, lr {job['lr']}")
    return {"losses": losses, "times": times, "top_ops": top_ops, "rss_floor": rss_floor, "saved_bytes": saved}


class SavedTensorCounter:
    """Context manager: bytes of the distinct tensor storages autograd keeps for the backward (``nbytes``), leaving
    out the model's parameters and buffers. Under gradient checkpointing only what the checkpoints keep is seen."""

    def __init__(self, model) -> None:
        self.own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        self.storages: dict[int, int] = {}
        self.nbytes = 0

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.own:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.nbytes = sum(self.storages.values())


def profiler_activities(device: str):
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def summarize_profile(profiler, device: str, top: int = 10) -> list[dict]:
    """The ``top`` ops by self time (device time on CUDA) of one profiled step."""
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda e: getattr(e, attr, 0.0), reverse=True)
    total = sum(getattr(e, attr, 0.0) for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_ms": round(getattr(e, attr, 0.0) / 1000.0, 3),
            "share": round(getattr(e, attr, 0.0) / total, 4),
            "calls": e.count,
        }
        for e in events[:top]
    ]


def delta_structure(model) -> dict | None:
    """Where a sparse method's entries sit, averaged over its deltas: the fraction of rows and of columns with at
    least one entry, and the share of the entries in the 10 % of rows that hold the most. None for other methods.

    Growth by gradient or momentum (AG, MA) can gather the budget into a block of rows and columns; random growth
    spreads it. This is what tells them apart when their held-out losses differ.
    """
    import torch

    import peft_sparse

    rows_covered, cols_covered, top_rows = [], [], []
    for _, indices, _, (n_rows, n_cols) in peft_sparse.sparse_deltas(model):
        if indices.numel() == 0:
            continue
        positions = indices.long()
        rows, cols = positions // n_cols, positions % n_cols
        rows_covered.append(rows.unique().numel() / n_rows)
        cols_covered.append(cols.unique().numel() / n_cols)
        per_row = torch.bincount(rows, minlength=n_rows).sort(descending=True).values
        top_rows.append(float(per_row[: max(1, n_rows // 10)].sum()) / positions.numel())
    if not rows_covered:
        return None
    return {
        "deltas": len(rows_covered),
        "rows_covered": statistics.fmean(rows_covered),
        "cols_covered": statistics.fmean(cols_covered),
        "top_decile_rows_share": statistics.fmean(top_rows),
    }


def run_job(job: dict) -> dict:
    """Fine-tune one method in this process and measure it; returns the result record."""
    import torch

    import peft_sparse

    device = job["device"]
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if job.get("memory_fraction_gib") is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, job["memory_fraction_gib"] * GIB / total))
    _, finetune, held = corpus_tokens()
    batches = batch_schedule(finetune, job["steps"], job["batch_size"], job["seq_len"], job["seed"] + 1)
    windows = held_out_windows(held, job["seq_len"])
    torch.manual_seed(job["seed"])  # LoRA's A, LT-SFT and SpIEL random choices: the same in every run
    started = time.perf_counter()
    model, make_optimizer = wrap_model(load_model(job), job)
    # CPU: the peak is measured from here, so the transients of imports and loading do not mask training's
    rss_baseline, rss_reset = current_rss_bytes(), device == "cpu" and reset_peak_rss()
    record: dict[str, Any] = {}
    profile = job["method"] in job.get("profile", ())
    if job["method"] == "ltsft":
        dense_job = dict(job, lr=job["lrs"]["ltsft-dense"])
        dense = train_phase(model, make_optimizer(model, dense_job["lr"]), batches, dense_job, False)
        record["dense_trainable_params"] = trainable_parameters(model)
        record["dense_step_time_s_median"] = statistics.median(dense["times"]) if dense["times"] else None
        record["dense_loss_curve"] = dense["losses"]
        if job.get("memory_fraction_gib") is None:
            record["dense_eval_loss"] = held_out_loss(model, windows, device, 16)
        if device == "cuda":
            record["dense_phase_peak_mem_bytes"] = torch.cuda.max_memory_allocated()
            dense_reserved = torch.cuda.max_memory_reserved()
            torch.cuda.reset_peak_memory_stats()
        report = peft_sparse.ltsft.select_and_rewind(model, verbose=False)
        record["ltsft_selected"] = report.total
        phase = train_phase(model, make_optimizer(model, job["lr"]), batches, job, profile)
        if device == "cuda":
            record["sparse_phase_peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    else:
        phase = train_phase(model, make_optimizer(model, job["lr"]), batches, job, profile)
    train_seconds = time.perf_counter() - started
    times = phase["times"]
    record["saved_activation_bytes"] = phase["saved_bytes"]
    if device == "cuda":
        peak = max(torch.cuda.max_memory_allocated(), record.get("dense_phase_peak_mem_bytes", 0))
        reserved = max(torch.cuda.max_memory_reserved(), dense_reserved if job["method"] == "ltsft" else 0)
        record["max_memory_reserved_bytes"] = reserved
    else:
        peak = max(peak_rss_bytes(), phase["rss_floor"])
        record["peak_mem_above_baseline_bytes"] = peak - rss_baseline
        record["rss_baseline_bytes"] = rss_baseline
        record["rss_peak_reset_after_setup"] = rss_reset
    eval_loss = None if job.get("memory_fraction_gib") is not None else held_out_loss(model, windows, device, 16)
    return {
        "method": job["method"],
        "preset": job["preset"],
        "device": device_name(device),
        "trainable_params": trainable_parameters(model),
        "step_time_s_median": statistics.median(times) if times else None,
        "step_time_s_min": min(times) if times else None,
        "step_time_s_max": max(times) if times else None,
        "peak_mem_bytes": peak,
        "eval_loss": eval_loss,
        "gradient_checkpointing": job["gradient_checkpointing"],
        "step_time_s_mean": statistics.fmean(times) if times else None,
        "timed_steps": len(times),
        "step_times_s": [round(t, 5) for t in times],
        "steps": job["steps"],
        "lr": job["lr"],
        "train_seconds": round(train_seconds, 2),
        "loss_curve": phase["losses"],
        "profile_top_ops": phase["top_ops"],
        "profiled": profile,
        "delta_structure": delta_structure(model),
        **record,
    }


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def worker_main(job_path: Path) -> int:
    """Run the job in ``job_path`` and write its record (or the error) to ``job['result_path']``."""
    job = json.loads(job_path.read_text())
    result_path = Path(job["result_path"])
    try:
        record = run_job(job)
    except Exception as error:  # reported to the parent, which carries on with the other methods
        oom = type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()
        result_path.write_text(json.dumps({"error": f"{type(error).__name__}: {error}"[:2000], "oom": oom}))
        if not oom:
            raise
        return EXIT_OOM
    result_path.write_text(json.dumps(record))
    return 0


# ============================================================================================ parent
def run_worker(job: dict, workdir: Path, timeout: int) -> dict:
    """Run ``job`` in a fresh process of this script; returns its record or ``{"error": ..., "oom": ...}``."""
    tag = f"{job['method']}-gc{int(job['gradient_checkpointing'])}-{job.get('memory_fraction_gib', 'free')}"
    job_path, result_path = workdir / f"{tag}.job.json", workdir / f"{tag}.result.json"
    result_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps(dict(job, result_path=str(result_path))))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout or None)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "oom": False}
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if "error" not in result and proc.returncode == 0:
            return result
    else:
        result = {"error": f"worker exited with status {proc.returncode} and no result", "oom": False}
    if not result.get("oom"):
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        print(f"  worker {tag} failed: {result['error']}\n{tail}", file=sys.stderr)
    return result


def min_memory_fraction(job: dict, record: dict, workdir: Path, timeout: int) -> tuple[int | None, list]:
    """Smallest whole number of GiB under which ``memory_search_steps`` updates complete (thesis appendix E.5).

    Binary search between ``floor(peak allocated)`` (fails: below what the run allocated) and ``ceil(peak
    reserved)`` (passes: the unconstrained run used no more), each try in its own process.
    """
    lo = record["peak_mem_bytes"] // GIB
    hi = -(-record["max_memory_reserved_bytes"] // GIB)
    tries = []
    search_job = dict(job, steps=job["memory_search_steps"], warmup_steps=min(job["warmup_steps"], 1), profile=())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        result = run_worker(dict(search_job, memory_fraction_gib=mid), workdir, timeout)
        passed = "error" not in result
        tries.append({"gib": mid, "passed": passed, "step_time_s_mean": result.get("step_time_s_mean")})
        if not passed and not result.get("oom"):
            return None, tries
        lo, hi = (lo, mid) if passed else (mid, hi)
    return hi, tries


def main(argv: list[str] | None = None) -> int:
    """Run every method and setting, then write results.json, results.md and results.png; returns the exit status."""
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    if args.report_only:
        return write_report(args.out)
    settings = args.settings
    if settings["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(
                f"bench_train: preset {args.preset} needs a CUDA GPU and torch.cuda.is_available() is False "
                f"(torch {torch.__version__}); nothing was run. On a CPU use --preset cpu-tiny.",
                file=sys.stderr,
            )
            return 2
        if any(m in GPU_ONLY_METHODS for m in args.methods):
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                print("bench_train: qlora / qspiel-* need bitsandbytes, which is not installed", file=sys.stderr)
                return 2
    started = time.perf_counter()
    load_before = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    if settings["device"] == "cpu":
        import torch

        if settings["threads"]:
            torch.set_num_threads(settings["threads"])
        base_info = prepare_base(settings, args.base_dir, args.seed)
    else:  # the parent never touches the GPU: its memory would count against the workers
        base_info = run_prepare_worker(args)
    if args.interleave_steps:
        return run_interleaved(args, settings)
    runs: dict[tuple[bool, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        workdir = Path(tmp)
        # repeats are interleaved (all methods, then all again) so that load from other processes hits them alike
        for repeat in range(settings["repeats"]):
            for gc in args.gc_settings:
                for method in args.methods:
                    profile = settings["profile"] if repeat == 0 else ()
                    job = make_job(settings, method, args.preset, gc, args.base_dir, args.seed, profile=profile)
                    elapsed = time.perf_counter() - started
                    print(
                        f"[{elapsed:6.1f} s] {method}, gradient checkpointing {'on' if gc else 'off'}"
                        + (f", repeat {repeat + 1}/{settings['repeats']}" if settings["repeats"] > 1 else "")
                    )
                    record = run_worker(job, workdir, args.worker_timeout)
                    if "error" in record:
                        record = failed_record(job, record, settings)
                    elif repeat == 0 and settings["memory_search"] and settings["device"] == "cuda":
                        gib, tries = min_memory_fraction(job, record, workdir, args.worker_timeout)
                        record["min_memory_fraction_gib"], record["memory_search_tries"] = gib, tries
                        at_limit = [t for t in tries if t["gib"] == gib]
                        if at_limit:
                            record["step_time_s_mean_at_min_fraction"] = at_limit[0]["step_time_s_mean"]
                    runs.setdefault((gc, method), []).append(record)
                    print("    " + summary_line(record))
    records = [merge_repeats(rs, profiled_first=bool(settings["profile"])) for rs in runs.values()]
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description(records),
        "command": "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in settings.items() if k != "name"},
        "base": base_info,
        "lora_parameter_count": lora_parameter_count(settings["model"], settings["rank"]),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_average": {"start": load_before, "end": load_average()},
    }
    (args.out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    write_report(args.out)
    print(f"wrote {args.out / 'results.json'}, results.md, results.png, meta.json in {meta['wall_seconds']} s")
    return 1 if any(r.get("error") for r in records) else 0


def run_interleaved(args: argparse.Namespace, settings: dict) -> int:
    """``--interleave-steps``: every method in this process, one update each in turn, the order rotating each round.

    A round's ratio is a method's update time over LoRA's in the same round, so load that changes over minutes
    cancels; reported are the median of the per-round ratios (normal updates) and the ratio of summed times over
    all timed rounds (a whole run with its estimation and reselection updates). Writes ``DIR/interleaved.json``,
    ``.md`` and ``.png``. Peak memory is not measured here (the processes of the normal mode do that).
    """
    import torch

    methods = list(args.methods)
    if "lora" not in methods:
        raise SystemExit("--interleave-steps needs lora among --methods (the reference of the ratios)")
    gc = args.gc_settings[0]
    _, finetune, _ = corpus_tokens()
    batches = batch_schedule(finetune, settings["steps"], settings["batch_size"], settings["seq_len"], args.seed + 1)
    state = {}
    for method in methods:
        job = make_job(settings, method, args.preset, gc, args.base_dir, args.seed)
        torch.manual_seed(args.seed)
        model, make_optimizer = wrap_model(load_model(job), job)
        optimizer = make_optimizer(model, job["lr"])
        params = [p for group in optimizer.param_groups for p in group["params"]]
        model.train()
        state[method] = (model, optimizer, lr_schedule(optimizer, len(batches)), params)
    times: dict[str, list[float]] = {m: [] for m in methods}
    # CPU: also the process's CPU time per update, which other processes on a shared machine hardly change
    cpu_times: dict[str, list[float]] = {m: [] for m in methods}
    sync = torch.cuda.synchronize if settings["device"] == "cuda" else (lambda: None)
    default_merge_mode = os.environ.get(MERGE_ENV_VAR)

    def set_merge_mode(mode):
        if mode is None:
            os.environ.pop(MERGE_ENV_VAR, None)
        else:
            os.environ[MERGE_ENV_VAR] = mode

    loads = []
    started = time.perf_counter()
    for step, ids in enumerate(batches):
        order = methods[step % len(methods) :] + methods[: step % len(methods)]
        for method in order:
            model, optimizer, scheduler, params = state[method]
            set_merge_mode(method.partition("@")[2] or default_merge_mode)
            ids = ids.to(settings["device"])
            sync()
            began, began_cpu = time.perf_counter(), time.process_time()
            optimizer_update(model(input_ids=ids, labels=ids).loss, params, optimizer, scheduler)
            sync()
            times[method].append(time.perf_counter() - began)
            cpu_times[method].append(time.process_time() - began_cpu)
        set_merge_mode(default_merge_mode)
        loads.append(load_average())
        print(
            f"[{time.perf_counter() - started:6.1f} s] round {step + 1}/{len(batches)}: "
            + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in methods),
            flush=True,
        )
    warm = settings["warmup_steps"]
    summary = {}
    for method in methods:
        ratios = [t / ref for t, ref in zip(times[method][warm:], times["lora"][warm:], strict=True)]
        cpu_ratios = [t / ref for t, ref in zip(cpu_times[method][warm:], cpu_times["lora"][warm:], strict=True)]
        summary[method] = {
            "step_time_s_median": statistics.median(times[method][warm:]),
            "ratio_median": statistics.median(ratios),
            "ratio_of_sums": sum(times[method][warm:]) / sum(times["lora"][warm:]),
            "ratios": [round(r, 4) for r in ratios],
            "step_times_s": [round(t, 4) for t in times[method]],
            "cpu_time_s_median": statistics.median(cpu_times[method][warm:]),
            "cpu_ratio_median": statistics.median(cpu_ratios),
            "cpu_ratio_of_sums": sum(cpu_times[method][warm:]) / sum(cpu_times["lora"][warm:]),
            "cpu_times_s": [round(t, 4) for t in cpu_times[method]],
        }
    result = {
        "preset": args.preset,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in settings.items() if k != "name"},
        "warmup_rounds": warm,
        "gradient_checkpointing": gc,
        "load_average_per_round": loads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "methods": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "interleaved.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "interleaved.md").write_text(interleaved_markdown(result))
    plot_interleaved(result, args.out / "interleaved.png")
    print((args.out / "interleaved.md").read_text())
    return 0


def interleaved_markdown(result: dict) -> str:
    """The interleaved run as a table with the targets of the preset."""
    targets = PRESET_TARGETS.get(result["preset"], TARGETS)
    s = result["settings"]
    loads = [x[0] for x in result["load_average_per_round"] if x]
    lines = [
        "# Step time, methods interleaved update by update",
        "",
        f"{result['date']}, {result['machine']}, {s.get('threads')} thread(s); `{result['command']}`.",
        f"{s['steps']} rounds (one update of every method each, order rotating), the first {result['warmup_rounds']} "
        "not timed. 1-minute load average during the rounds: "
        + (f"{min(loads):.1f} to {max(loads):.1f}." if loads else "unknown."),
        "",
        "Wall: elapsed time; CPU: the process's CPU time (one thread), which load from other processes on a shared "
        "machine changes much less. Ratios are to LoRA's update in the same round; whole-run: sum over all timed "
        "rounds (SpIEL-AG's estimation and reselection updates included).",
        "",
        "| method | median update wall (s) | median update CPU (s) | per-round ratio, median (wall / CPU) | "
        f"whole-run ratio (wall / CPU) | target (on {'wall' if s.get('device') == 'cuda' else 'CPU'} time) |",
        "|---|---|---|---|---|---|",
    ]
    warm = result["warmup_rounds"]
    variants = [m for m in result["methods"] if "@" in m and base_method(m) in result["methods"]]
    # on a GPU the host waits for the device by spinning, so its CPU time is the wall time: judge by wall time there
    prefix = "" if s.get("device") == "cuda" else "cpu_"
    for method, r in result["methods"].items():
        target = targets.get(method)
        verdict_text = "-"
        if target:
            key = prefix + ("ratio_of_sums" if method == "spiel-ag" else "ratio_median")
            verdict_text = f"<= {target[1]:.2f}x ({'met' if r[key] <= target[1] else 'missed'}, {key})"
        lines.append(
            f"| {method} | {r['step_time_s_median']:.3f} | {r['cpu_time_s_median']:.3f} | "
            f"{r['ratio_median']:.3f} / {r['cpu_ratio_median']:.3f} | {r['ratio_of_sums']:.3f} / "
            f"{r['cpu_ratio_of_sums']:.3f} | {verdict_text} |"
        )
    if variants:
        lines += [
            "",
            f"`METHOD@MODE`: METHOD with `{MERGE_ENV_VAR}=MODE` for its updates; without `@`, the library's default. "
            "Paired per round (same batch, seconds apart), CPU time:",
            "",
            "| variant | against | median of (variant - default) per round (ms) | rounds the default was faster |",
            "|---|---|---|---|",
        ]
        for variant in variants:
            pairs = zip(
                result["methods"][variant]["cpu_times_s"][warm:],
                result["methods"][base_method(variant)]["cpu_times_s"][warm:],
                strict=True,
            )
            differences = [a - b for a, b in pairs]
            faster = sum(d > 0 for d in differences)
            lines.append(
                f"| {variant} | {base_method(variant)} | {statistics.median(differences) * 1e3:+.1f} | "
                f"{faster} of {len(differences)} |"
            )
    return "\n".join(lines) + "\n"


def plot_interleaved(result: dict, path: Path) -> None:
    """Per-round step-time ratio to LoRA for each method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    warm = result["warmup_rounds"]
    for i, (method, r) in enumerate(result["methods"].items()):
        if method != "lora":
            rounds = range(warm + 1, warm + 1 + len(r["ratios"]))
            ax.plot(rounds, r["ratios"], ":", color=f"C{i}", alpha=0.5, label=f"{method} (wall)")
            cpu = [t / ref for t, ref in zip(r["cpu_times_s"][warm:], result["methods"]["lora"]["cpu_times_s"][warm:])]
            ax.plot(rounds, cpu, "-", marker="o", color=f"C{i}", label=f"{method} (CPU time)")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("round (update)")
    ax.set_ylabel("update time / LoRA's")
    ax.legend()
    ax.set_title(f"{result['preset']}: interleaved update times ({result['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path) -> int:
    """Write ``out``/results.md (with ``out``/notes.md appended when present) and results.png from the JSON files,
    and ``out``/interleaved.md and .png from interleaved.json when there is one."""
    if (out / "interleaved.json").exists():
        result = json.loads((out / "interleaved.json").read_text())
        (out / "interleaved.md").write_text(interleaved_markdown(result))
        plot_interleaved(result, out / "interleaved.png")
        if not (out / "results.json").exists():
            return 0
    records = json.loads((out / "results.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    notes_path = out / NOTES_FILE
    meta["notes"] = notes_path.read_text() if notes_path.exists() else None
    (out / "results.md").write_text(render_markdown(records, meta))
    plot_results(records, meta, out / "results.png")
    return 0


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other processes on the machine slow the timed steps down)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_prepare_worker(args: argparse.Namespace) -> dict:
    """GPU presets: build the base model in a child process (so that the parent holds no CUDA context)."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_train as b; "
        "print(json.dumps(b.prepare_base(json.loads(sys.argv[2]), b.Path(sys.argv[3]), int(sys.argv[4]))))"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(Path(__file__).resolve().parent),
            json.dumps(args.settings),
            str(args.base_dir),
            str(args.seed),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building the base model failed:\n{proc.stderr[-3000:]}")
    print("\n".join(proc.stdout.strip().splitlines()[:-1]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_repeats(runs: list[dict], profiled_first: bool = False) -> dict:
    """One record from the repeats of a method and setting: step times pooled, the largest peak memory.

    Training is deterministic, so the losses are those of the first run; ``repeat_step_time_s_medians`` keeps each
    run's median. ``profiled_first``: the first repeat profiled an update of some methods. On the CPU the memory the
    profiler took stays in the process after it stops (the allocator keeps it), so a profiled run's peak is higher
    by the profiler's share: the peak memory then comes from the later repeats, for every method alike (the same
    number of runs each); ``repeat_peak_mem_bytes`` and ``repeat_profiled`` keep every run's.
    """
    failed = [r for r in runs if r.get("error")]
    if failed or len(runs) == 1:
        return failed[0] if failed else runs[0]
    record = dict(runs[0])
    times = [t for r in runs for t in r["step_times_s"]]
    measured = runs[1:] if profiled_first else runs
    record.update(
        step_time_s_median=statistics.median(times),
        step_time_s_min=min(times),
        step_time_s_max=max(times),
        step_time_s_mean=statistics.fmean(times),
        timed_steps=len(times),
        step_times_s=times,
        peak_mem_bytes=max(r["peak_mem_bytes"] for r in measured),
        repeats=len(runs),
        repeat_step_time_s_medians=[r["step_time_s_median"] for r in runs],
        repeat_peak_mem_bytes=[r["peak_mem_bytes"] for r in runs],
        repeat_profiled=[bool(r.get("profiled")) for r in runs],
    )
    if "peak_mem_above_baseline_bytes" in record:
        record["peak_mem_above_baseline_bytes"] = max(r["peak_mem_above_baseline_bytes"] for r in measured)
    return record


def failed_record(job: dict, result: dict, settings: dict) -> dict:
    return {
        "method": job["method"],
        "preset": job["preset"],
        "device": settings["device"],
        "trainable_params": None,
        "step_time_s_median": None,
        "step_time_s_min": None,
        "step_time_s_max": None,
        "peak_mem_bytes": None,
        "eval_loss": None,
        "gradient_checkpointing": job["gradient_checkpointing"],
        "error": result["error"],
    }


def summary_line(r: dict) -> str:
    if r.get("error"):
        return f"FAILED: {r['error'][:200]}"
    return (
        f"{r['trainable_params']:,} trainable, step {r['step_time_s_median']:.3f} s median "
        f"({r['step_time_s_min']:.3f}-{r['step_time_s_max']:.3f}), peak {r['peak_mem_bytes'] / 2**20:.0f} MiB, "
        f"held-out loss {r['eval_loss']:.4f}"
    )


def machine_description(records: list[dict]) -> str:
    import torch

    devices = sorted({r["device"] for r in records if r.get("device")})
    return (
        f"{', '.join(devices) or 'no device'}; {platform.system()} {platform.release()}; Python "
        f"{platform.python_version()}; torch {torch.__version__}"
    )


# ============================================================================================ report
def ratio(value, reference):
    if value is None or not reference:
        return None
    return value / reference


def fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def memory_of(r: dict) -> int | None:
    """The memory the ratios use: the thesis' minimum fraction on GPU when searched, else the measured peak."""
    if r.get("min_memory_fraction_gib") is not None:
        return r["min_memory_fraction_gib"] * GIB
    return r.get("peak_mem_bytes")


def render_markdown(records: list[dict], meta: dict) -> str:
    """The results table (ratios to LoRA at the same checkpointing setting), settings, learning rates and targets."""
    s = meta["settings"]
    cpu = s["device"] == "cpu"
    lines = [
        f"# Training benchmark: preset `{records[0]['preset'] if records else '?'}`",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}"
        + (
            f"; load average (1/5/15 min) {meta['load_average']['start']} at the start, "
            f"{meta['load_average']['end']} at the end"
            if meta.get("load_average", {}).get("start")
            else ""
        ),
        f"- command: `{meta['command']}` ({meta['wall_seconds']} s in all)",
        f"- model: Llama from `LlamaConfig` ({meta['base']['parameters']:,} parameters: hidden "
        f"{s['model']['hidden_size']}, intermediate {s['model']['intermediate_size']}, "
        f"{s['model']['num_hidden_layers']} layers, vocabulary {s['model']['vocab_size']}), {s['dtype']}, "
        f"batch {s['batch_size']} x {s['seq_len']} tokens, {s['steps']} optimizer updates per run "
        f"(LT-SFT: {s['steps']} dense + {s['steps']} sparse), step times after {s['warmup_steps']} warm-up updates"
        + (
            f", pooled over {s['repeats']} interleaved runs per method and setting (peak memory: the largest; of the "
            "runs after the first when the first profiles an update, since the profiler's memory stays)"
            if s.get("repeats", 1) > 1
            else ""
        )
        + (f", {s['threads']} torch thread(s) per worker" if cpu and s.get("threads") else ""),
        f"- budget: LoRA r={s['rank']} (alpha {LORA_ALPHA}) on {', '.join(LLAMA_LINEAR)} = "
        f"{meta['lora_parameter_count']:,} parameters; SpIEL `match_lora_rank={s['rank']}` on the same modules; "
        f"LT-SFT `num_tunable_weights={meta['lora_parameter_count']}` on the same modules; (IA)^3 PEFT's Llama "
        f"defaults; full: every parameter",
        f"- SpIEL: `reselection_steps={s['reselection_steps']}`, `accumulation_steps={s['accumulation_steps']}`, "
        f"`total_steps={s['steps']}`; SpIEL-MA trains with `peft_sparse.SM3`, everything else with AdamW "
        f"(weight decay 0); gradient clipping {GRAD_CLIP}; LR: linear warm-up over {LR_WARMUP_FRACTION:.0%} of the "
        f"updates, then linear decay to 0",
        "- data: the shipped corpus (`peft_sparse.data`) as bytes, cut at paragraph boundaries: "
        f"the first {PRETRAIN_FRACTION:.0%} pre-trains the base; of the paragraphs after it every "
        f"{HELD_OUT_EVERY}th is held out (disjoint windows, the same for every method) and the others are the "
        "fine-tuning data (the same seeded random windows, in the same order, for every method)",
    ]
    base = meta["base"]
    if s["pretrain_steps"]:
        lines.append(
            f"- base: pre-trained densely for {s['pretrain_steps']} updates (lr {s['pretrain_lr']}) on the "
            f"pre-training part; held-out loss {fmt(base.get('random_init_eval_loss'), '.4f')} at random init, "
            f"{fmt(base.get('base_eval_loss'), '.4f')} after pre-training (before fine-tuning)"
        )
    else:
        lines.append("- base: random weights (not pre-trained): held-out losses only show that training runs")
    if cpu:
        lines.append(
            "- memory: peak RSS of the worker process during training (`ru_maxrss`, reset through "
            "`/proc/self/clear_refs` once the model is built and wrapped), which includes the interpreter, torch, the "
            "data and the model; 'above baseline' subtracts the RSS at that point: gradients, optimizer state, "
            "activations and temporaries"
        )
    else:
        lines.append(
            "- memory: `torch.cuda.max_memory_allocated`; 'min fraction' is the smallest "
            "`set_per_process_memory_fraction` limit (1 GiB steps, binary search, each try its own process) under "
            f"which {s['memory_search_steps']} updates complete (thesis appendix E.5); the ratios use it when present"
        )
    lines.append(
        "- 'saved for backward': the distinct tensors autograd keeps between forward and backward in the first update "
        "(not parameters or buffers; under checkpointing only what the checkpoints keep); independent of the allocator"
    )
    lines += ["", "Learning rates (" + LR_NOTE.get(s["device"], "") + "):", ""]
    lines.append("| " + " | ".join(s["lrs"]) + " |")
    lines.append("|" + "---|" * len(s["lrs"]))
    lines.append("| " + " | ".join(f"{v:g}" for v in s["lrs"].values()) + " |")
    for gc in (False, True):
        rows = [r for r in records if r["gradient_checkpointing"] == gc]
        if not rows:
            continue
        lora = next((r for r in rows if r["method"] == "lora" and not r.get("error")), None)
        lines += ["", f"## Gradient checkpointing {'on' if gc else 'off'}", ""]
        header = [
            "method",
            "trainable",
            "step s median (min-max)",
            "x LoRA",
            "step s mean",
            "x LoRA",
            "peak mem MiB",
            "x LoRA",
        ]
        header += ["above baseline MiB", "x LoRA"] if cpu else ["min fraction GiB", "x LoRA"]
        header += ["saved for backward MiB", "x LoRA", "held-out loss", "- LoRA"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['method']} | failed: {r['error'][:100]} |" + " |" * (len(header) - 2))
                continue
            ref = lora or {}
            extra_mem = r.get("peak_mem_above_baseline_bytes") if cpu else r.get("min_memory_fraction_gib")
            ref_extra = ref.get("peak_mem_above_baseline_bytes") if cpu else ref.get("min_memory_fraction_gib")
            cells = [
                r["method"],
                f"{r['trainable_params']:,}",
                f"{r['step_time_s_median']:.4f} ({r['step_time_s_min']:.4f}-{r['step_time_s_max']:.4f})",
                fmt(ratio(r["step_time_s_median"], ref.get("step_time_s_median")), ".2f"),
                fmt(r.get("step_time_s_mean"), ".4f"),
                fmt(ratio(r.get("step_time_s_mean"), ref.get("step_time_s_mean")), ".2f"),
                f"{r['peak_mem_bytes'] / 2**20:,.0f}",
                fmt(ratio(r["peak_mem_bytes"], ref.get("peak_mem_bytes")), ".2f"),
                fmt(extra_mem / 2**20 if cpu and extra_mem is not None else extra_mem, ",.0f"),
                fmt(ratio(extra_mem, ref_extra), ".2f"),
                fmt(r["saved_activation_bytes"] / 2**20 if r.get("saved_activation_bytes") else None, ",.1f"),
                fmt(ratio(r.get("saved_activation_bytes"), ref.get("saved_activation_bytes")), ".2f"),
                f"{r['eval_loss']:.4f}",
                fmt(r["eval_loss"] - ref["eval_loss"] if ref.get("eval_loss") is not None else None, "+.4f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        ltsft = next((r for r in rows if r["method"] == "ltsft" and not r.get("error")), None)
        if ltsft:
            lines.append("")
            lines.append(
                f"LT-SFT: the step times are the sparse phase's; the dense phase (training "
                f"{ltsft.get('dense_trainable_params', 0):,} weights) took "
                f"{fmt(ltsft.get('dense_step_time_s_median'), '.4f')} s per update (median) and reached held-out "
                f"loss {fmt(ltsft.get('dense_eval_loss'), '.4f')} before "
                f"selection; {ltsft.get('ltsft_selected', 0):,} entries selected. Peak memory covers both phases."
            )
    structured = [r for r in records if r.get("delta_structure") and not r["gradient_checkpointing"]]
    if structured:
        lines += [
            "",
            "## Where the sparse entries are (after training, mean over the deltas)",
            "",
            "| method | rows with an entry | columns with an entry | entries in the fullest 10 % of rows |",
            "|---|---|---|---|",
        ]
        for r in structured:
            d = r["delta_structure"]
            shares = (d["rows_covered"], d["cols_covered"], d["top_decile_rows_share"])
            lines.append(f"| {r['method']} | " + " | ".join(f"{x:.1%}" for x in shares) + " |")
    lines += ["", "## Targets", ""] + target_lines(records, cpu)
    profiled = [r for r in records if r.get("profile_top_ops") and not r["gradient_checkpointing"]]
    if profiled:
        lines += ["", "## Profile of one update (gradient checkpointing off; top ops by self time)", ""]
        for r in profiled:
            ops = ", ".join(f"`{o['op']}` {o['self_ms']:.1f} ms ({o['share']:.0%})" for o in r["profile_top_ops"][:6])
            lines.append(f"- {r['method']}: {ops}")
    notes = meta.get("notes")
    if notes:
        lines += ["", f"## Notes (from `{NOTES_FILE}`)", "", notes.strip()]
    return "\n".join(lines) + "\n"


TARGETS = {  # method: (reference, step-time ratio, memory ratio), README's promises (issue 5)
    "spiel-ma": ("lora", 1.0, 0.85),
    "spiel-ag": ("lora", 1.05, 0.9),
    "qspiel-ma": ("qlora", 1.0, 1.0),
}
# issue 7's targets at the cpu-hotpath shape (AG's over the whole run: compare the mean step time)
PRESET_TARGETS = {
    "cpu-hotpath": {
        "spiel-ma": ("lora", 1.05, 1.0),
        "spiel-random": ("lora", 1.05, 1.0),
        "spiel-ag": ("lora", 1.10, 1.0),
    },
}
PRESET_TARGETS["gpu-7b-2layer"] = PRESET_TARGETS["cpu-hotpath"]


def target_lines(records: list[dict], cpu: bool) -> list[str]:
    """One line per target: the measured ratio and whether it is met (by how much it is missed)."""
    out = []
    preset = records[0].get("preset") if records else None
    targets = PRESET_TARGETS.get(preset, TARGETS)
    for gc in (False, True):
        by_method = {r["method"]: r for r in records if r["gradient_checkpointing"] == gc and not r.get("error")}
        for method, (ref_name, time_target, mem_target) in targets.items():
            r, ref = by_method.get(method), by_method.get(ref_name)
            if not r or not ref:
                continue
            parts = []
            if preset in PRESET_TARGETS:
                # one process per method on a shared machine: step times are not comparable across processes
                parts.append(f"step time: see interleaved.md (target <= {time_target:.2f}x)")
            else:
                for label, key, target in (
                    ("median step time", "step_time_s_median", time_target),
                    ("mean step time", "step_time_s_mean", time_target),
                ):
                    q = ratio(r.get(key), ref.get(key))
                    parts.append(f"{label} {fmt(q, '.2f')}x (target <= {target:.2f}x: {verdict(q, target)})")
            mem_key = "peak_mem_above_baseline_bytes" if cpu else None
            q = ratio(memory_of(r), memory_of(ref))
            strict = " (strictly lower)" if method == "qspiel-ma" else ""
            parts.append(
                f"peak memory {fmt(q, '.2f')}x (target <= {mem_target:.2f}x{strict}: {verdict(q, mem_target)})"
            )
            if mem_key:
                q2 = ratio(r.get(mem_key), ref.get(mem_key))
                parts.append(f"memory above baseline {fmt(q2, '.2f')}x ({verdict(q2, mem_target)})")
            dl = r["eval_loss"] - ref["eval_loss"]
            parts.append(f"held-out loss {dl:+.4f} vs {ref_name} ({'at least as good' if dl <= 0 else 'worse'})")
            out.append(f"- {method} vs {ref_name}, checkpointing {'on' if gc else 'off'}: " + "; ".join(parts))
    return out or ["- (no SpIEL/LoRA pair was run)"]


def verdict(q: float | None, target: float) -> str:
    if q is None:
        return "n/a"
    return "met" if q <= target else f"missed by {100 * (q / target - 1):.1f}%"


def plot_results(records: list[dict], meta: dict, path: Path) -> None:
    """Bars: step time, memory, held-out loss, step time / LoRA (both checkpointing settings); training loss curves,
    absolute and minus LoRA's on the same batch (every method sees the same batches, so that removes their noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if not r.get("error")]
    methods = list(dict.fromkeys(r["method"] for r in ok))
    settings = sorted({r["gradient_checkpointing"] for r in ok})
    lora_of = {r["gradient_checkpointing"]: r for r in ok if r["method"] == "lora"}
    fig, axes = plt.subplots(2, 3, figsize=(19, 9.5))
    width = 0.8 / max(1, len(settings))
    cpu = meta["settings"]["device"] == "cpu"

    def time_ratio(r):
        ref = lora_of.get(r["gradient_checkpointing"])
        return ratio(r["step_time_s_median"], ref["step_time_s_median"] if ref else None) or 0.0

    panels = [
        (axes[0][0], "step time, median (s); whiskers: min-max", lambda r: r["step_time_s_median"]),
        (
            axes[0][1],
            "peak memory above the RSS after setup (MiB)" if cpu else "memory (GiB): min fraction, else peak",
            (lambda r: r.get("peak_mem_above_baseline_bytes", 0) / 2**20) if cpu else (lambda r: memory_of(r) / GIB),
        ),
        (axes[0][2], "median step time / LoRA's at the same setting", time_ratio),
        (axes[1][0], "held-out loss after fine-tuning", lambda r: r["eval_loss"]),
    ]
    for ax, title, value in panels:
        for j, gc in enumerate(settings):
            rows = {r["method"]: r for r in ok if r["gradient_checkpointing"] == gc}
            xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(methods))]
            ys = [value(rows[m]) if m in rows else 0 for m in methods]
            kwargs = {}
            if ax is axes[0][0]:
                lo = [rows[m]["step_time_s_median"] - rows[m]["step_time_s_min"] if m in rows else 0 for m in methods]
                hi = [rows[m]["step_time_s_max"] - rows[m]["step_time_s_median"] if m in rows else 0 for m in methods]
                kwargs["yerr"] = [lo, hi]
            ax.bar(xs, ys, width, label=f"checkpointing {'on' if gc else 'off'}", capsize=2, **kwargs)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_title(title)
    axes[0][2].axhline(1.0, color="grey", linestyle=":")
    base_loss = meta["base"].get("base_eval_loss")
    if base_loss is not None:
        axes[1][0].axhline(base_loss, color="grey", linestyle=":", label="base model")
        losses = [r["eval_loss"] for r in ok] + [base_loss]
        axes[1][0].set_ylim(min(losses) - 0.02, max(losses) + 0.01)
    for ax, _, _ in panels:
        ax.legend(fontsize=8)
    gc_curves = settings[0] if settings else False
    lora_curve = lora_of[gc_curves]["loss_curve"] if gc_curves in lora_of else None
    for r in ok:
        if r["gradient_checkpointing"] != gc_curves:
            continue
        label = r["method"] + (" (sparse phase)" if r["method"] == "ltsft" else "")
        curve = r["loss_curve"]
        axes[1][1].plot(range(1, len(curve) + 1), smoothed(curve), label=label)
        if lora_curve is not None and len(lora_curve) == len(curve):
            diff = [a - b for a, b in zip(curve, lora_curve)]
            axes[1][2].plot(range(1, len(curve) + 1), smoothed(diff), label=label)
    setting = "on" if gc_curves else "off"
    axes[1][1].set_title(f"training loss (mean of the last {SMOOTHING}), checkpointing {setting}")
    axes[1][2].set_title(f"training loss minus LoRA's on the same batch (mean of the last {SMOOTHING})")
    axes[1][2].axhline(0.0, color="grey", linestyle=":")
    for ax in axes[1][1:]:
        ax.set_xlabel("optimizer update")
        ax.legend(fontsize=8)
    fig.suptitle(f"bench_train {ok[0]['preset'] if ok else ''}: {meta['machine']} ({meta['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


SMOOTHING = 5


def smoothed(values: list[float], k: int = SMOOTHING) -> list[float]:
    return [statistics.fmean(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


if __name__ == "__main__":
    sys.exit(main())
