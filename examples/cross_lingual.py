"""Zero-shot cross-lingual transfer by composing LT-SFTs (thesis §4.3.2, Algorithm 1).

1. A language SFT for the source language and one for the target language (causal LM on each language's text).
2. A task SFT trained on top of ``theta0 + phi_source`` (the source-language SFT is merged in, then removed again:
   the task SFT is a difference from that model).
3. At inference: ``theta0 + phi_task + phi_target``: the task SFT and the *target*-language SFT composed with
   ``add_weighted_adapter`` (and, on disk, with ``peft_sparse.compose_adapters``).

Offline and small by default: a random Llama with byte tokens; the "source language" is the English corpus shipped
with peft-sparse and the "target language" the same kind of text under a letter substitution (ROT13), so the two
share no letters. The task is to continue "Q: <section title>" with "A: <its first sentence>"; the task SFT sees
only source-language examples and is evaluated on held-out target-language ones. The script checks that the composed
weights equal ``theta0 + phi_task + phi_target`` exactly (exit status 1 if not).

    python examples/cross_lingual.py --output_dir out/cross_lingual
"""

from __future__ import annotations

import argparse
import codecs
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

import peft_sparse
from peft_sparse.data import load_corpus


# --------------------------------------------------------------------------------------------- data
def sections(text: str) -> list[tuple[str, str]]:
    """(title, body) pairs of the shipped corpus: a title is a short block without a full stop."""
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    out = []
    for block in blocks:
        if len(block) < 60 and "." not in block:
            out.append((block, ""))
        elif out:
            out[-1] = (out[-1][0], (out[-1][1] + "\n\n" + block).strip())
    return out


def to_target_language(text: str) -> str:
    return codecs.encode(text, "rot13")


class Windows(Dataset):
    """Byte-level training examples; ``labels`` ignore the padding."""

    def __init__(self, texts: list[str], seq_len: int, stride: int = 0) -> None:
        rows = []
        for text in texts:
            data = list(text.encode("utf-8"))
            step = stride or seq_len
            for start in range(0, max(1, len(data) - seq_len + 1), step):
                rows.append(data[start : start + seq_len])
        self.ids = torch.zeros(len(rows), seq_len, dtype=torch.long)
        self.labels = torch.full((len(rows), seq_len), -100, dtype=torch.long)
        for i, row in enumerate(rows):
            self.ids[i, : len(row)] = torch.tensor(row)
            self.labels[i, : len(row)] = torch.tensor(row)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def qa(title: str, body: str) -> str:
    return f"Q: {title}\nA: {body.split('. ')[0].strip()}.\n"


@torch.no_grad()
def loss_on(model: torch.nn.Module, data: Windows) -> float:
    model.eval()
    return float(model(input_ids=data.ids, labels=data.labels).loss)


# --------------------------------------------------------------------------------------------- training
def train_ltsft(model, data: Windows, config: peft_sparse.LTSFTConfig, args, name: str):
    """Both LT-SFT phases with plain Trainers; returns the PeftModel in its sparse phase."""
    model = get_peft_model(model, config)
    for phase in peft_sparse.ltsft.phases(model, verbose=False):
        steps = args.dense_steps if phase.dense else args.sparse_steps
        workdir = tempfile.TemporaryDirectory()  # no checkpoints are saved; keeps the output folder clean
        training_args = TrainingArguments(
            output_dir=workdir.name,
            max_steps=steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.dense_lr if phase.dense else args.sparse_lr,
            lr_scheduler_type="linear",
            warmup_steps=max(1, steps // 20),
            logging_steps=steps,
            save_strategy="no",
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            seed=args.seed,
            disable_tqdm=True,
        )
        Trainer(model=model, args=training_args, train_dataset=data, data_collator=default_data_collator).train()
        workdir.cleanup()
    return model


def dense_delta(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """``{parameter name: dense delta}`` of an LT-SFT adapter (weights and biases)."""
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, peft_sparse.LTSFTLayer) and adapter in module.sparse_config:
            for kind, (indices, values) in module.deltas_of(adapter).items():
                tensor = module.base_tensor(kind)
                dense = torch.zeros(tensor.numel())
                dense[indices.long()] = values.detach().float()
                out[f"{name}.{kind}"] = dense.view_as(tensor)
    return out


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--output_dir", default="./outputs/cross_lingual", help="where the adapters go")
    p.add_argument("--language_k", type=int, default=20000, help="K (tunable entries) of each language SFT")
    p.add_argument("--task_k", type=int, default=20000, help="K (tunable entries) of the task SFT")
    p.add_argument("--dense_steps", type=int, default=40, help="optimizer updates of each SFT's dense phase")
    p.add_argument("--sparse_steps", type=int, default=40, help="optimizer updates of each SFT's sparse phase")
    p.add_argument("--dense_lr", type=float, default=2e-3, help="peak learning rate of the dense phases (AdamW)")
    p.add_argument("--sparse_lr", type=float, default=1e-2, help="peak learning rate of the sparse phases (AdamW)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per optimizer update")
    p.add_argument("--seq_len", type=int, default=96, help="bytes per sequence")
    p.add_argument("--seed", type=int, default=0, help="seed of the base weights and of the Trainers")
    p.add_argument("--threads", type=int, default=1, help="intra-op CPU threads (1: fastest for the tiny model)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
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
    base = LlamaForCausalLM(config).eval()
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh() -> LlamaForCausalLM:
        model = LlamaForCausalLM(config)
        model.load_state_dict(theta0)
        return model.eval()

    parts = sections(load_corpus())
    half = len(parts) // 2
    source_text = ["\n\n".join(f"{t}\n\n{b}" for t, b in parts[:half])]  # each language has its own text
    target_text = [to_target_language("\n\n".join(f"{t}\n\n{b}" for t, b in parts[half:]))]
    task_train = [qa(t, b) for t, b in parts[:40]]
    task_test_target = Windows([to_target_language(qa(t, b)) for t, b in parts[40:]], args.seq_len)
    print(
        f"{len(parts)} sections; task: {len(task_train)} source-language examples, "
        f"{len(task_test_target)} held-out target-language examples"
    )

    language = peft_sparse.LTSFTConfig(num_tunable_weights=args.language_k, dense_l1_reg=0.1, sparse_l1_reg=0.1)
    for name, text in (("language_source", source_text), ("language_target", target_text)):
        print(f"\n== {name} SFT")
        train_ltsft(fresh(), Windows(text, args.seq_len, args.seq_len // 2), language, args, name).save_pretrained(
            out / name
        )

    print("\n== task SFT on theta0 + phi_source")
    with_source = PeftModel.from_pretrained(fresh(), out / "language_source").merge_and_unload()
    task = peft_sparse.LTSFTConfig(num_tunable_weights=args.task_k)
    train_ltsft(with_source, Windows(task_train, args.seq_len), task, args, "task").save_pretrained(out / "task")

    print("\n== inference on the target language")
    model = PeftModel.from_pretrained(fresh(), out / "task", adapter_name="task")
    model.load_adapter(out / "language_target", adapter_name="target")
    model.load_adapter(out / "language_source", adapter_name="source")
    model.add_weighted_adapter(["task", "target"], [1.0, 1.0], "task+target")
    model.add_weighted_adapter(["task", "source"], [1.0, 1.0], "task+source")
    losses = {"theta0": loss_on(fresh(), task_test_target)}
    for adapter in ("target", "task", "task+source", "task+target"):
        model.set_adapter(adapter)
        losses[f"theta0 + {adapter}"] = loss_on(model, task_test_target)

    # exactness: the composed weights are theta0 + phi_task + phi_target
    phi_task, phi_target = dense_delta(model, "task"), dense_delta(model, "target")
    model.set_adapter("task+target")
    merged = model.merge_and_unload(adapter_names=["task+target"])
    exact = all(
        torch.equal(value, theta0[key] + (phi_task.get(key, 0 * value) + phi_target.get(key, 0 * value)))
        for key, value in merged.state_dict().items()
    )
    composed_dir = peft_sparse.compose_adapters(
        [out / "task", out / "language_target"], [1.0, 1.0], out / "task+target"
    )
    from_files = PeftModel.from_pretrained(fresh(), composed_dir).merge_and_unload()
    same_on_disk = all(torch.equal(v, merged.state_dict()[k]) for k, v in from_files.state_dict().items())

    print("\ntask loss on held-out target-language examples:")
    for name, value in losses.items():
        print(f"  {name:<24} {value:.4f}")
    if losses["theta0 + task+target"] > losses["theta0 + target"]:
        print(
            "  (theta0 + task+target is worse than theta0 + target alone here. Expected at this scale: the base is a\n"
            "   random byte-level model, and the two 'languages' share only spaces and punctuation (ROT13 changes\n"
            "   every letter, also in 'Q:' and 'A:'), so what the task SFT learned on source-language text does not\n"
            "   carry over. The transfer in the LT-SFT paper relies on a pre-trained multilingual model. This script\n"
            "   shows the recipe and checks that composition is exact; it does not measure transfer.)"
        )
    print(f"composed weights == theta0 + phi_task + phi_target exactly: {'OK' if exact else 'MISMATCH'}")
    print(
        f"compose_adapters({out / 'task'}, {out / 'language_target'}) gives the same weights: "
        f"{'OK' if same_on_disk else 'MISMATCH'}"
    )
    print(f"total time {time.perf_counter() - started:.1f} s")
    return 0 if exact and same_on_disk else 1


if __name__ == "__main__":
    sys.exit(main())
