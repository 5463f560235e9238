"""Where the time of chosen training updates goes: ``cProfile`` of SpIEL-MA, -AG and -random updates.

Builds the model of a ``bench_train.py`` preset (its cached base), trains each method for ``STEPS`` updates as
``bench_train.py --interleave-steps`` does (one process, the methods one after another), and profiles the updates
listed (1-based; with S=20 and gamma=5, update 21 starts SpIEL-AG's second estimation phase and update 25 is the
second reselection, the first in steady state). Then times ``grow_random`` at ``[11008, 4096]`` with LoRA r=64's
budget excluded, drawing from a CPU generator (what ``SpIELLayer`` does) and from one on the device. Options it does
not know go to ``bench_train.py`` (e.g. ``--base-dir``, ``--pretrain-steps``).

Writes ``OUT/prof.txt`` (per profiled update: the 40 functions with the largest cumulative and own time) and
``OUT/prof.json`` (every update's wall and process CPU seconds per method; the growth timings in ms)::

    python benchmarks/profile_updates.py --preset gpu-7b-2layer --steps 27 --updates 21,25 --out DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402

METHODS = ("spiel-ma", "spiel-ag", "spiel-random")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpu-7b-2layer", choices=sorted(bench_train.PRESETS))
    parser.add_argument("--steps", type=int, default=27, help="updates per method")
    parser.add_argument("--updates", default="21,25", help="comma-separated 1-based updates to profile")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--grow-random-numel", type=int, default=11008 * 4096, help="size of the matrix grow_random is timed on"
    )
    args, args.train_args = parser.parse_known_args(argv)  # the rest goes to bench_train (e.g. --base-dir)
    args.updates = {int(u) for u in args.updates.split(",")}
    if args.steps < 1 or not all(1 <= u <= args.steps for u in args.updates):
        parser.error(f"--updates must lie in [1, --steps={args.steps}], got {sorted(args.updates)}")
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    train_args = bench_train.parse_args(
        ["--preset", args.preset, "--methods", "lora", "--gradient-checkpointing", "off", "--steps", str(args.steps)]
        + ["--out", str(args.out / "unused")]
        + args.train_args
    )
    settings = train_args.settings
    sync = torch.cuda.synchronize if settings["device"] == "cuda" else (lambda: None)
    bench_train.prepare_base(settings, train_args.base_dir, train_args.seed)
    _, finetune, _ = bench_train.corpus_tokens()
    batches = bench_train.batch_schedule(
        finetune, args.steps, settings["batch_size"], settings["seq_len"], train_args.seed + 1
    )
    report: dict[str, list] = {}
    texts: list[str] = []
    for method in METHODS:
        job = bench_train.make_job(settings, method, args.preset, False, train_args.base_dir, train_args.seed)
        torch.manual_seed(train_args.seed)
        model, make_optimizer = bench_train.wrap_model(bench_train.load_model(job), job)
        optimizer = make_optimizer(model, job["lr"])
        params = [p for group in optimizer.param_groups for p in group["params"]]
        scheduler = bench_train.lr_schedule(optimizer, len(batches))
        model.train()
        times = []
        for update, ids in enumerate(batches, start=1):
            ids = ids.to(settings["device"])
            profiler = cProfile.Profile() if update in args.updates else None
            sync()
            began, began_cpu = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            bench_train.optimizer_update(model(input_ids=ids, labels=ids).loss, params, optimizer, scheduler)
            sync()
            if profiler:
                profiler.disable()
            times.append((round(time.perf_counter() - began, 4), round(time.process_time() - began_cpu, 3)))
            if profiler:
                for key in ("cumulative", "tottime"):
                    buffer = io.StringIO()
                    pstats.Stats(profiler, stream=buffer).sort_stats(key).print_stats(40)
                    texts.append(f"===== {method} update {update} by {key}: {times[-1]}\n" + buffer.getvalue())
        report[method] = times
        print(method, times, flush=True)
        del model, optimizer, params, scheduler
        if settings["device"] == "cuda":
            torch.cuda.empty_cache()
    report.update(time_grow_random(torch, settings["device"], sync, args.grow_random_numel))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prof.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "prof.txt").write_text("\n".join(texts))
    print(f"wrote {args.out / 'prof.json'} and prof.txt")
    return 0


def time_grow_random(torch, device_name: str, sync, numel: int) -> dict[str, list[float]]:
    """Milliseconds of four ``grow_random`` calls on ``numel`` positions with 2.14 % of them excluded (LoRA r=64's
    budget at ``[11008, 4096]``), growing a tenth and a fifth of that budget, per generator device."""
    from peft_sparse.selection.policies import grow_random

    budget = max(1, round(numel * 64 * (11008 + 4096) / (11008 * 4096)))
    device = torch.device(device_name)
    excluded = torch.randperm(numel, device=device)[:budget].sort().values
    generators = {
        "cpu_generator": lambda: torch.Generator().manual_seed(3),
        "device_generator": lambda: torch.Generator(device=device).manual_seed(3),
    }
    timings = {}
    for label, make in generators.items():
        for k in (budget // 10, budget // 5):
            runs = []
            for _ in range(4):
                sync()
                began = time.perf_counter()
                grow_random(numel, excluded, k, make())
                sync()
                runs.append(round((time.perf_counter() - began) * 1e3, 2))
            timings[f"grow_random_{label}_{k}"] = runs
            print(label, k, runs, flush=True)
    return timings


if __name__ == "__main__":
    sys.exit(main())
