"""LT-SFT with a plain Hugging Face Trainer: dense phase, selection and rewind, sparse phase, save.

Runs offline on a CPU in a few minutes. By default it builds a small Llama-style model from a ``LlamaConfig``
(random weights, byte-level tokens: vocabulary of 256) and trains it on the text corpus shipped with peft-sparse;
``--model PATH_OR_ID`` uses a local or Hub causal LM and its tokenizer instead.

The changes to an ordinary Trainer script are the lines marked ``# LT-SFT``: wrap the model with ``LTSFTConfig``,
train, call ``peft_sparse.ltsft.select_and_rewind(model)``, train again with a new Trainer (a fresh optimizer and LR
schedule), save. The script writes

    DIR/base       the base model (``save_pretrained``; the pre-trained weights theta0)
    DIR/adapter    the LT-SFT adapter (``"peft_type": "LTSFT"``)

and checks that ``PeftModel.from_pretrained(DIR/base, DIR/adapter)`` and its ``merge_and_unload()`` reproduce the
trained model's logits (exit status 1 if not).

    python examples/train_ltsft.py --output_dir out/ltsft
    python examples/train_ltsft.py --output_dir out/ltsft --density 0.05 --dense_steps 200 --sparse_steps 200
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

import peft_sparse  # LT-SFT: importing registers the LTSFT tuner with PEFT
from peft_sparse.data import TokenWindows, encode, load_corpus

HELD_OUT_FRACTION = 0.1


def build_base(args: argparse.Namespace):
    """The base model (float32, eval mode) and its tokenizer (None for the byte-level default)."""
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval(), tokenizer
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
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        ids = dataset.chunks[start : start + batch_size]
        targets = ids.numel() - ids.shape[0]
        total += float(model(input_ids=ids, labels=ids).loss) * targets
        count += targets
    return total / count


def trainer_for(model, dataset, args, workdir: str, steps: int, lr: float) -> Trainer:
    """An ordinary Trainer (its default AdamW and a linear schedule), one per phase. It saves no checkpoints;
    ``workdir`` (a temporary folder) only receives what the Trainer writes regardless."""
    training_args = TrainingArguments(
        output_dir=workdir,
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, steps // 20),
        weight_decay=args.weight_decay,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=default_data_collator)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--output_dir", required=True, help="writes DIR/base and DIR/adapter (nothing else)")
    p.add_argument("--model", default=None, help="local path or Hub id of a causal LM; None: a tiny random Llama")
    p.add_argument("--density", type=float, default=0.02, help="K as a fraction of the targeted entries")
    p.add_argument("--dense_steps", type=int, default=80, help="optimizer updates of the dense phase")
    p.add_argument("--sparse_steps", type=int, default=80, help="optimizer updates of the sparse phase")
    p.add_argument("--dense_lr", type=float, default=2e-3, help="peak learning rate of the dense phase (AdamW)")
    p.add_argument(
        "--sparse_lr", type=float, default=1e-2, help="peak learning rate of the sparse phase, stable at a higher rate"
    )
    p.add_argument("--l1_reg", type=float, default=0.1, help="lambda of the L1 term in both phases (0.1: paper's LM)")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW's decoupled weight decay, both phases")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per optimizer update")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--seed", type=int, default=0, help="seed of the base weights, the data order and the Trainer")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op CPU threads; None: 1 for the tiny default model (a second thread only slows it down on a "
        "busy 2-core machine), torch's default with --model",
    )
    args = p.parse_args(argv)
    if not 0 < args.density <= 1:
        p.error(f"--density must be in (0, 1], got {args.density}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if args.threads or not args.model:
        torch.set_num_threads(args.threads or 1)

    base, tokenizer = build_base(args)
    text = load_corpus()
    cut = text.rfind("\n\n", 0, int(len(text) * (1 - HELD_OUT_FRACTION)))
    train_set = TokenWindows(encode(text[:cut], tokenizer), args.seq_len, args.seq_len // 2)
    held_set = TokenWindows(encode(text[cut:], tokenizer), args.seq_len, args.seq_len)
    n_params = sum(p.numel() for p in base.parameters())
    print(
        f"model: {args.model or 'random LlamaConfig (byte tokens)'}, {n_params:,} parameters; "
        f"{len(train_set)} training windows, {len(held_set)} held-out windows of {args.seq_len} tokens"
    )
    losses = {"base": held_out_loss(base, held_set)}
    base.save_pretrained(out / "base")  # theta0, before get_peft_model wraps the model in place
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "base")

    config = peft_sparse.LTSFTConfig(  # LT-SFT
        task_type="CAUSAL_LM", density=args.density, dense_l1_reg=args.l1_reg, sparse_l1_reg=args.l1_reg
    )
    model = get_peft_model(base, config)  # LT-SFT: starts in the dense phase
    print(f"\ndense phase: {args.dense_steps} updates of every targeted weight, lr {args.dense_lr}")
    with tempfile.TemporaryDirectory() as workdir:
        trainer_for(model, train_set, args, workdir, args.dense_steps, args.dense_lr).train()
    losses["after dense phase (theta1)"] = held_out_loss(model, held_set)

    report = peft_sparse.ltsft.select_and_rewind(model)  # LT-SFT: select K, rewind to theta0
    losses["after rewind (theta0)"] = held_out_loss(model, held_set)

    print(f"\nsparse phase: {args.sparse_steps} updates of the {report.total:,} selected values, lr {args.sparse_lr}")
    with tempfile.TemporaryDirectory() as workdir:  # LT-SFT: a new Trainer
        trainer_for(model, train_set, args, workdir, args.sparse_steps, args.sparse_lr).train()
    losses["LT-SFT (theta0 + phi)"] = held_out_loss(model, held_set)
    model.save_pretrained(out / "adapter")

    # round trip: base + adapter from disk, then merged
    probe = held_set.chunks[:4]
    with torch.no_grad():
        trained = model.eval()(input_ids=probe).logits
        fresh = type(base).from_pretrained(out / "base").eval()
        reloaded = PeftModel.from_pretrained(fresh, out / "adapter").eval()
        reloaded_logits = reloaded(input_ids=probe).logits
        merged_logits = reloaded.merge_and_unload()(input_ids=probe).logits
    reload_ok = torch.allclose(reloaded_logits, trained, rtol=1e-5, atol=1e-5)
    merge_ok = torch.allclose(merged_logits, trained, rtol=1e-5, atol=1e-5)

    print(f"\nheld-out loss (uniform over the vocabulary: {math.log(base.config.vocab_size):.4f})")
    for name, value in losses.items():
        print(f"  {name:<28} {value:.4f}")
    print(
        f"selected {report.total:,} of {report.maskable:,} targeted entries "
        f"({100 * report.total / report.maskable:.2f}%, {100 * report.total / n_params:.2f}% of all parameters)"
    )
    print(f"wrote {out / 'base'} and {out / 'adapter'}")
    print(
        f"reloaded adapter vs trained model: max |logit diff| {(reloaded_logits - trained).abs().max():.2e} -> "
        f"{'OK' if reload_ok else 'MISMATCH'}"
    )
    print(
        f"merge_and_unload() vs trained model: max |logit diff| {(merged_logits - trained).abs().max():.2e} -> "
        f"{'OK' if merge_ok else 'MISMATCH'}"
    )
    print(f"total time {time.perf_counter() - started:.1f} s")
    return 0 if reload_ok and merge_ok else 1


if __name__ == "__main__":
    sys.exit(main())
