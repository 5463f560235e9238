"""Merged or split: the two ways to compute a linear layer with a sparse delta, timed against each other.

- merged (what SpIEL layers do, ``peft_sparse.sparse_linear``): the dense product with ``W + delta``, the delta
  added into ``W`` in place and restored bit for bit (held from the forward to the backward's ``dX`` product when
  training on the CPU; a working copy with ``PEFT_SPARSE_INPLACE_MERGE=0``), and the values' gradient by SDDMM;
- split: ``x @ W.T + x @ delta.T`` with the frozen ``W`` and ``peft_sparse.kernels.sparse_delta_product`` for the
  delta alone; ``W`` is never written, but every product with the delta gathers ``tokens * K`` inputs.

For each density and token count it times the training step of the layer (forward + backward, gradients for the
input and the values) and the inference forward (no gradient, as in decoding), median of ``--repeats`` after two
warm-up runs, and checks that both formulations give the same outputs and gradients. Runs on whatever device is
given with the default kernel backend (the PyTorch strategies on CPU); ``benchmarks/bench_kernels.py`` has the GPU
version at Llama-7B shapes.

    python benchmarks/bench_formulations.py --out benchmarks/results        # CPU, [2752, 1024], ~2 minutes

Writes ``bench_formulations_<device>.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from peft_sparse.kernels import sparse_delta_product
from peft_sparse.sparse_linear import sparse_delta_linear
from peft_sparse.tuners.base_weight import base_weight_for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--shape", default="2752x1024", help="OUTxIN of the weight (default: a quarter of Llama-7B's)")
    parser.add_argument("--densities", default="0.005,0.01", help="comma-separated fractions of the weight tuned")
    parser.add_argument("--tokens", default="1,16,64,128,1024,4096", help="comma-separated token counts")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    try:
        out_f, in_f = (int(v) for v in args.shape.lower().split("x"))
        args.densities = [float(v) for v in args.densities.split(",")]
        args.tokens = [int(v) for v in args.tokens.split(",")]
    except ValueError as error:
        parser.error(f"--shape, --densities and --tokens must be numbers ({error})")
    if min(out_f, in_f) <= 0 or not all(0 < d <= 1 for d in args.densities) or min(args.tokens) <= 0:
        parser.error(
            f"need a positive shape, densities in (0, 1] and positive tokens, got {args.shape}, "
            f"{args.densities}, {args.tokens}"
        )
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    args.out_features, args.in_features = out_f, in_f
    return args


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    times = []
    for run in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if run >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    out_f, in_f = args.out_features, args.in_features
    layer = torch.nn.Linear(in_f, out_f, bias=False, device=device).requires_grad_(False)
    base = base_weight_for(layer)
    rows = []
    for density in args.densities:
        k = max(1, int(density * out_f * in_f))
        indices = torch.randperm(out_f * in_f, device=device)[:k].sort().values.int()
        values = torch.randn(k, device=device) * 1e-2
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, device=device)

            def merged_forward(x_, v_, indices=indices):
                return sparse_delta_linear(x_, base, None, indices, v_)

            def split_forward(x_, v_, indices=indices):
                return F.linear(x_, layer.weight) + sparse_delta_product(x_, indices, v_, out_f, in_f)

            grads = {}
            for name, forward in (("merged", merged_forward), ("split", split_forward)):
                x_, v_ = x.clone().requires_grad_(True), values.clone().requires_grad_(True)
                y = forward(x_, v_)
                y.square().sum().backward()
                grads[name] = (y.detach(), x_.grad, v_.grad)
            agree = all(
                torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
                for a, b in zip(grads["merged"], grads["split"])
            )
            record = {"density": density, "k": k, "tokens": tokens, "results_agree": agree}
            for name, forward in (("merged", merged_forward), ("split", split_forward)):
                x_, v_ = x.clone().requires_grad_(True), values.clone().requires_grad_(True)

                def train_step(forward=forward, x_=x_, v_=v_):
                    forward(x_, v_).sum().backward()
                    x_.grad = v_.grad = None

                def inference(forward=forward, x=x, values=values):
                    with torch.no_grad():
                        forward(x, values)

                record[f"{name}_train_s"] = _median_seconds(train_step, args.repeats, device)
                record[f"{name}_inference_s"] = _median_seconds(inference, args.repeats, device)
            rows.append(record)
            print(
                f"density {density:.2%}, {tokens:5d} tokens: train split/merged "
                f"{record['split_train_s'] / record['merged_train_s']:.2f}, inference split/merged "
                f"{record['split_inference_s'] / record['merged_inference_s']:.2f}, results agree: {agree}",
                flush=True,
            )
    return rows


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} torch threads); torch {torch.__version__}"


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# Merged vs split sparse-delta linear, weight [{meta['shape']}]",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- command: `{meta['command']}`",
        "- times: median of the timed runs, milliseconds; train = forward + backward (input and values gradients),",
        "  inference = forward without gradients; ratio > 1 means the merged formulation is faster",
        "",
        "| density | K | tokens | merged train | split train | split / merged | merged inference | split inference"
        " | split / merged | results agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['density']:.2%} | {r['k']:,} | {r['tokens']:,} | {r['merged_train_s'] * 1e3:.2f} | "
            f"{r['split_train_s'] * 1e3:.2f} | {r['split_train_s'] / r['merged_train_s']:.2f} | "
            f"{r['merged_inference_s'] * 1e3:.2f} | {r['split_inference_s'] * 1e3:.2f} | "
            f"{r['split_inference_s'] / r['merged_inference_s']:.2f} | {'yes' if r['results_agree'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = measure(args)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device),
        "command": "python benchmarks/bench_formulations.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "shape": f"{args.out_features}, {args.in_features}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_formulations_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(to_markdown(meta, rows))
    print(f"wrote {stem}.json and {stem}.md")
    return 0 if all(r["results_agree"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
