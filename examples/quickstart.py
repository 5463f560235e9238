"""Quickstart: SpIEL and LoRA side by side, with the same parameter budget, on the same data.

Runs offline on a CPU in a minute or two. By default it builds a small Llama-style model from a ``LlamaConfig``
(random weights, byte-level tokens: vocabulary of 256) and trains it on the text corpus shipped with peft-sparse;
``--model PATH_OR_ID`` uses a local or Hub causal LM and its tokenizer instead. For each method the script:

1. starts from a copy of the same base weights,
2. trains only the adapter with the Hugging Face ``Trainer`` (SpIEL reselection is driven by peft-sparse's optimizer
   hook: no extra code), for ``--steps`` optimizer updates,
3. records the step times, the training loss and the loss on held-out text.

Then it saves the SpIEL adapter to ``--output_dir``, reloads it with ``PeftModel.from_pretrained`` into a fresh copy
of the base, merges it with ``merge_and_unload()`` and checks that the merged model's logits equal the adapter
model's (exit status 1 if not). It writes ``results.json`` (settings, machine, versions, the table below, the loss
curves) and ``loss_curves.png`` into ``--results_dir`` (default: ``--output_dir``); the README's quickstart table is
generated from the committed ``benchmarks/results/quickstart/results.json`` (``scripts/render_docs.py``).

    python examples/quickstart.py                      # tiny random Llama, byte tokens
    python examples/quickstart.py --steps 300 --rank 16
    python examples/quickstart.py --model path/to/small-causal-lm

Only the sparse deltas (SpIEL) or the low-rank matrices (LoRA) are trained, so on a freshly initialised model the
loss falls slowly; the point is the comparison and the round trip, not a good language model.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import peft_sparse  # importing registers the SpIEL tuner with PEFT (PeftModel.from_pretrained needs it too)
from peft_sparse.data import TokenWindows, encode, load_corpus

HELD_OUT_FRACTION = 0.1


# --------------------------------------------------------------------------------------------- data
def split_corpus(text: str, tokenizer, seq_len: int) -> tuple[TokenWindows, TokenWindows]:
    """Train on the first 90 % of the corpus (overlapping windows) and hold out the rest (disjoint windows)."""
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - HELD_OUT_FRACTION)))
    train_tokens, held_tokens = encode(text[:cut], tokenizer), encode(text[cut:], tokenizer)
    return TokenWindows(train_tokens, seq_len, seq_len // 2), TokenWindows(held_tokens, seq_len, seq_len)


# --------------------------------------------------------------------------------------------- model
def build_base(args: argparse.Namespace):
    """The base model (eval mode, float32) and its tokenizer (None for the byte-level default)."""
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        return model.eval(), tokenizer
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval(), None


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, dataset: TokenWindows, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over ``dataset`` (every window weighted by its number of targets)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        ids = dataset.chunks[start : start + batch_size]
        loss = model(input_ids=ids, labels=ids).loss
        targets = ids.numel() - ids.shape[0]
        total += float(loss) * targets
        count += targets
    return total / count


# --------------------------------------------------------------------------------------------- training
class Recorder(TrainerCallback):
    """Records the loss and wall time of every optimizer step, the held-out loss every ``eval_every`` steps, and
    reports SpIEL reselections."""

    def __init__(self, name: str, print_every: int, held_set: TokenWindows, eval_every: int) -> None:
        self.name, self.print_every = name, print_every
        self.held_set, self.eval_every = held_set, eval_every
        self.step_times: list[float] = []
        self.losses: list[tuple[int, float]] = []
        self.held_out: list[tuple[int, float]] = []
        self.reselections: list[tuple[int, int, int]] = []  # (step, entries changed, budget)
        self._t0 = 0.0
        self._indices: dict[str, torch.Tensor] = {}
        self._model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = model
        self._indices = self._snapshot()

    def _snapshot(self) -> dict[str, torch.Tensor]:
        if self._model is None:
            return {}
        return {name: idx.clone() for name, idx, _, _ in peft_sparse.sparse_deltas(self._model)}

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self._t0)
        now = self._snapshot()
        changed = sum(int((~torch.isin(now[n], self._indices[n])).sum()) for n in now if n in self._indices)
        if changed:
            budget = sum(idx.numel() for idx in now.values())
            self.reselections.append((state.global_step, changed, budget))
            print(f"  [{self.name}] step {state.global_step}: reselection moved {changed:,} of {budget:,} entries")
        self._indices = now
        if state.global_step % self.eval_every == 0 or state.global_step == state.max_steps:
            # after the step time is taken; no dropout and no randomness, so training continues unchanged
            self.held_out.append((state.global_step, held_out_loss(self._model, self.held_set)))
            self._model.train()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))
            if state.global_step % self.print_every == 0 or state.global_step == state.max_steps:
                print(f"  [{self.name}] step {state.global_step:>4}/{state.max_steps}  loss {logs['loss']:.4f}")


def train(
    name: str,
    model: torch.nn.Module,
    dataset: TokenWindows,
    args: argparse.Namespace,
    lr: float,
    workdir: str,
    held_set: TokenWindows,
    optimizer: torch.optim.Optimizer | None = None,
) -> Recorder:
    """Train ``model``'s adapter with the HF Trainer (its default AdamW unless ``optimizer`` is given); returns
    the Recorder."""
    training_args = TrainingArguments(
        output_dir=os.path.join(workdir, name),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(10, args.steps // 10),
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    recorder = Recorder(name, max(1, args.steps // 5), held_set, args.eval_every)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=default_data_collator,
        callbacks=[recorder],
        optimizers=(optimizer, None),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    return recorder


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of parameters that receive gradients (the adapter's)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def final_loss(recorder: Recorder, window: int = 10) -> float:
    """Mean training loss of the last ``window`` steps (single steps are noisy)."""
    tail = [loss for _, loss in recorder.losses[-window:]]
    return sum(tail) / len(tail)


# --------------------------------------------------------------------------------------------- output
def print_table(rows: list[dict]) -> None:
    header = ["method", "trainable params", "median step (s)", "final train loss", "held-out loss"]
    cells = [
        [
            r["method"],
            f"{r['params']:,}" if r["params"] is not None else "-",
            f"{r['step']:.3f}" if r["step"] is not None else "-",
            f"{r['train']:.4f}" if r["train"] is not None else "-",
            f"{r['held']:.4f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |")


def plot(recorders: dict[str, Recorder], path: Path, base_loss: float, unit: str) -> bool:
    """Write the loss curves of both methods to ``path``; False if matplotlib is not installed.

    Per method: the training loss of every step (faint), its running mean over 10 steps, and the held-out loss
    (markers); for SpIEL also its reselections (vertical lines)."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, rec in recorders.items():
        steps = [s for s, _ in rec.losses]
        losses = [v for _, v in rec.losses]
        line = ax.plot(steps, losses, alpha=0.25, linewidth=0.7)[0]
        color = line.get_color()
        k = 10
        smooth = [statistics.fmean(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, color=color, linewidth=1.6, label=f"{name}: training loss (mean of last {k} steps)")
        held_steps = [0] + [s for s, _ in rec.held_out]
        held = [base_loss] + [v for _, v in rec.held_out]
        ax.plot(
            held_steps,
            held,
            color=color,
            marker="o",
            markersize=3.5,
            linestyle="--",
            linewidth=1.0,
            label=f"{name}: held-out loss",
        )
        for i, (step, _, _) in enumerate(rec.reselections):
            ax.axvline(
                step,
                color=color,
                alpha=0.55,
                linestyle=":",
                linewidth=1.2,
                label=f"{name}: reselection" if i == 0 else None,
            )
    ax.axhline(base_loss, color="black", alpha=0.6, linestyle="-.", linewidth=1.0, label="base model: held-out loss")
    ax.set_xlabel("optimizer update")
    ax.set_ylabel(f"loss (nats per {unit})")
    ax.set_title("SpIEL vs LoRA at the same number of trainable parameters")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def machine() -> str:
    """The CPU model, core count and GPU (if any), for the results file."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"


def write_results(path: Path, args: argparse.Namespace, argv: list[str], rows: list[dict], recorders, extra) -> None:
    """The run as JSON: what was run, where, with which versions, and what it measured."""
    import peft
    import transformers

    record = {
        "command": " ".join(["python examples/quickstart.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "machine": machine(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "peft_sparse": peft_sparse.__version__,
        },
        "settings": vars(args),
        "rows": rows,
        "curves": {
            name: {"train": rec.losses, "held_out": rec.held_out, "reselections": rec.reselections}
            for name, rec in recorders.items()
        },
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=300, help="optimizer updates per method")
    p.add_argument("--output_dir", default="./outputs/quickstart", help="where the SpIEL adapter is saved")
    p.add_argument("--results_dir", default=None, help="where results.json and loss_curves.png go; None: --output_dir")
    p.add_argument("--model", default=None, help="local path or Hub id of a causal LM; None: a tiny random Llama")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r; SpIEL gets as many entries (match_lora_rank)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base weights, the data order and SpIEL")
    p.add_argument("--selection", default="ag", choices=["ag", "ma", "random"], help="SpIEL growth criterion")
    p.add_argument("--reselection_steps", type=int, default=20, help="SpIEL S: updates between reselections")
    p.add_argument("--spiel_lr", type=float, default=None, help="SpIEL learning rate; None: 5e-3, or 2e-2 for 'ma'")
    p.add_argument("--lora_lr", type=float, default=2e-3, help="LoRA learning rate")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per optimizer update")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--eval_every", type=int, default=20, help="updates between held-out evaluations (for the plot)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; None: 1 for the tiny model, torch's default with --model; 0: torch's default",
    )
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.eval_every < 1:
        p.error(f"--eval_every must be >= 1, got {args.eval_every}")
    if args.spiel_lr is None:
        args.spiel_lr = 2e-2 if args.selection == "ma" else 5e-3
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and the save/reload/merge check; returns the exit status (1 if a check failed)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # step times depend on other jobs
    # The tiny model's matrices are too small to gain from several threads, and on a machine where other jobs run,
    # threads that wait for each other make every step many times slower.
    threads = args.threads if args.threads is not None else (0 if args.model else 1)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_dir = Path(args.results_dir) if args.results_dir else output_dir
    results_dir.mkdir(parents=True, exist_ok=True)

    base, tokenizer = build_base(args)
    base_state = copy.deepcopy(base.state_dict())  # every model below starts from these exact weights
    train_set, held_set = split_corpus(load_corpus(), tokenizer, args.seq_len)
    print(
        f"model: {args.model or 'random LlamaConfig (byte tokens)'}, "
        f"{sum(p.numel() for p in base.parameters()):,} parameters; "
        f"{len(train_set)} training windows, {len(held_set)} held-out windows of {args.seq_len} tokens; "
        f"{torch.get_num_threads()} CPU thread(s)"
    )
    base_held = held_out_loss(base, held_set)
    print(
        f"base model held-out loss: {base_held:.4f} (uniform over the vocabulary: "
        f"{math.log(base.config.vocab_size):.4f})"
    )

    def fresh_base() -> torch.nn.Module:
        model = copy.deepcopy(base)
        model.load_state_dict(base_state)
        return model

    target_modules = "all-linear"
    spiel_config = peft_sparse.SpIELConfig(
        task_type="CAUSAL_LM",
        target_modules=target_modules,
        match_lora_rank=args.rank,
        selection=args.selection,
        reselection_steps=args.reselection_steps,
        accumulation_steps=min(5, args.reselection_steps),
        seed=args.seed,
    )
    lora_config = LoraConfig(
        task_type="CAUSAL_LM", target_modules=target_modules, r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0
    )

    rows, recorders = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        spiel_model = get_peft_model(fresh_base(), spiel_config)
        print(
            f"\nSpIEL-{args.selection.upper()} (match_lora_rank={args.rank}, reselection every "
            f"{args.reselection_steps} updates), lr {args.spiel_lr}"
        )
        if args.selection == "ma":  # the thesis pairs SpIEL-MA with SM3 (row/column statistics, no per-entry moments)
            params = [p for p in spiel_model.parameters() if p.requires_grad]
            sm3 = peft_sparse.SM3(params, lr=args.spiel_lr)
            recorders["SpIEL"] = train("SpIEL", spiel_model, train_set, args, args.spiel_lr, workdir, held_set, sm3)
        else:
            recorders["SpIEL"] = train("SpIEL", spiel_model, train_set, args, args.spiel_lr, workdir, held_set)
        spiel_held = held_out_loss(spiel_model, held_set)

        lora_model = get_peft_model(fresh_base(), lora_config)
        print(f"\nLoRA (r={args.rank}, alpha={lora_config.lora_alpha}), lr {args.lora_lr}")
        recorders["LoRA"] = train("LoRA", lora_model, train_set, args, args.lora_lr, workdir, held_set)
        lora_held = held_out_loss(lora_model, held_set)

    rows.append({"method": "base (no adapter)", "params": None, "step": None, "train": None, "held": base_held})
    for name, model, held in (
        ("SpIEL-" + args.selection.upper(), spiel_model, spiel_held),
        (f"LoRA r={args.rank}", lora_model, lora_held),
    ):
        rec = recorders["SpIEL" if name.startswith("SpIEL") else "LoRA"]
        rows.append(
            {
                "method": name,
                "params": trainable_parameters(model),
                "step": statistics.median(rec.step_times),
                "train": final_loss(rec),
                "held": held,
            }
        )

    # Save, reload into a fresh base, merge, compare.
    spiel_model.save_pretrained(output_dir)
    probe = held_set.chunks[:4]
    with torch.no_grad():
        trained_logits = spiel_model.eval()(input_ids=probe).logits
        reloaded = PeftModel.from_pretrained(fresh_base(), output_dir).eval()
        adapter_logits = reloaded(input_ids=probe).logits
        merged = reloaded.merge_and_unload()
        merged_logits = merged(input_ids=probe).logits
    reload_diff = (trained_logits - adapter_logits).abs().max().item()
    merge_diff = (adapter_logits - merged_logits).abs().max().item()
    merged_ok = torch.allclose(merged_logits, adapter_logits, rtol=1e-5, atol=1e-5)
    reload_ok = torch.allclose(trained_logits, adapter_logits, rtol=1e-5, atol=1e-5)

    plot_path = results_dir / "loss_curves.png"
    plotted = plot(recorders, plot_path, base_held, "token" if args.model else "byte")

    print(
        f"\nResults ({args.steps} steps, batch {args.batch_size} x {args.seq_len} tokens, "
        f"final train loss = mean of the last 10 steps):\n"
    )
    print_table(rows)
    spiel_rec = recorders["SpIEL"]
    print(f"\nSpIEL reselections at steps {[s for s, _, _ in spiel_rec.reselections]}")
    print(f"SpIEL adapter saved to {output_dir}")
    if plotted:
        print(f"loss curves: {plot_path}")
    else:
        print('no loss-curve plot: matplotlib is not installed (python -m pip install -e ".[examples]")')
    print(
        f"reloaded adapter vs trained model: max |logit diff| = {reload_diff:.2e} -> "
        f"{'OK' if reload_ok else 'MISMATCH'}"
    )
    print(
        f"merge_and_unload() vs adapter model: max |logit diff| = {merge_diff:.2e} "
        f"(allclose rtol=1e-5, atol=1e-5) -> {'OK' if merged_ok else 'MISMATCH'}"
    )
    total = time.perf_counter() - started
    print(f"total time {total:.1f} s")
    checks = {
        "reload_max_abs_logit_diff": reload_diff,
        "reload_ok": reload_ok,
        "merge_max_abs_logit_diff": merge_diff,
        "merge_ok": merged_ok,
    }
    extra = {
        "base_held_out_loss": base_held,
        "loss_unit": "nats per " + ("token" if args.model else "byte"),
        "threads": torch.get_num_threads(),
        "load_average_1min": [load_at_start, os.getloadavg()[0] if load_at_start is not None else None],
        "checks": checks,
        "total_time_s": round(total, 1),
    }
    write_results(results_dir / "results.json", args, argv, rows, recorders, extra)
    print(f"results: {results_dir / 'results.json'}")
    return 0 if merged_ok and reload_ok else 1


if __name__ == "__main__":
    sys.exit(main())
