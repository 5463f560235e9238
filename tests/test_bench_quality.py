"""benchmarks/bench_quality.py: the smoke sweep end to end, resuming, the metrics against hand-computed values."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import load_benchmark
from torch import nn


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_quality")


def test_smoke_sweep_writes_comparable_records_and_resumes(bench, tmp_path, capsys) -> None:
    argv = ["--smoke", "--out", str(tmp_path), "--seeds", "0,1", "--threads", "1"]
    argv += [f"--lrs={m}=1e-3" for m in bench.METHODS]
    assert bench.main(argv) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert sorted({r["method"] for r in records}) == sorted(bench.METHODS)
    counts = {m: sum(r["method"] == m for r in records) for m in bench.METHODS}
    assert set(counts.values()) == {2}, counts  # the sweep lr at seed 0, then seed 1 at the best lr
    lora = next(r for r in records if r["method"] == "lora")
    for r in records:
        assert "error" not in r, r.get("error")
        assert r["task"] == "all" and r["updates"] == 4 and r["seed"] in (0, 1)
        assert math.isfinite(r["eval_loss"]) and 0.0 <= r["exact_match"] <= 1.0
        assert set(r["per_task"]) == set(bench.TASKS)
        if r["method"] != "full":  # every parameter-efficient method trains exactly LoRA's count
            assert r["trainable_params"] == lora["trainable_params"] == r["lora_budget"]
        assert (r["delta_structure"] is not None) == (r["method"] in bench.SPARSE_METHODS)
    text = (tmp_path / "results.md").read_text()
    assert "## Final" in text and "## Sweep" in text
    for method in bench.METHODS:
        assert re.search(rf"^\| {method} \| 0.001 \| 0 \| 0,1 \|", text, re.MULTILINE), method
    assert (tmp_path / "results.png").stat().st_size > 0

    capsys.readouterr()
    assert bench.main(argv) == 0  # everything is recorded: nothing runs again
    assert "skip (done)" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text()) == records
    # a new tag is a new run; the old records stay
    assert bench.main(argv[:3] + ["--methods", "lora", "--seeds", "0", "--lrs", "lora=1e-3", "--tag", "v2"]) == 0
    after = json.loads((tmp_path / "results.json").read_text())
    assert len(after) == len(records) + 1 and after[-1]["tag"] == "v2"


def test_training_batch_masks_everything_but_the_answer(bench) -> None:
    batch = bench.training_batch([([5, 6, 7], [8, 9, 256]), ([5], [4, 256])], pad_id=257)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 256], [5, 4, 256, 257, 257, 257]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9, 256], [-100, 4, 256, -100, -100, -100]]


def test_answer_nll_is_the_answer_tokens_log_likelihood(bench) -> None:
    model = bench.smoke_model(0).eval()
    pairs = [([5, 6, 7], [8, 9, 256]), ([5], [4, 256])]
    total, count = bench.answer_nll(model, bench.training_batch(pairs, pad_id=257))
    expected = 0.0
    for prompt, answer in pairs:  # each sequence alone, unpadded: -log p(answer token | everything before it)
        ids = torch.tensor([prompt + answer])
        logp = F.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        for j, token in enumerate(answer):
            expected -= float(logp[len(prompt) + j - 1, token])
    assert count == 5
    assert total == pytest.approx(expected, rel=1e-5)


class FixedModel(nn.Module):
    """Uniform next-token logits (NLL = ln V per token) and one fixed greedy continuation for every prompt."""

    def __init__(self, vocab: int, continuation: list[int]) -> None:
        super().__init__()
        self.vocab, self.continuation, self.prompts = vocab, continuation, []

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.prompts.append((input_ids.clone(), attention_mask.clone()))
        tail = torch.tensor(self.continuation[:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


def test_evaluate_against_hand_computed_loss_and_exact_match(bench) -> None:
    codec = bench.ByteCodec()
    held = [
        bench.Example("add", "What is 400 + 536?", "936"),
        bench.Example("add", "What is 100 + 100?", "200"),
        bench.Example("date", "Write the date 2024-03-07 as day, month name, year.", "7 March 2024"),
    ]
    model = FixedModel(codec.vocab_size, [ord("9"), ord("3"), ord("6"), codec.eos_id, ord("x")])
    result = bench.evaluate(model, held, codec, batch_size=8)
    # answers "936", "200", "7 March 2024" = 3 + 3 + 12 bytes, each with its end token; all at NLL ln(258)
    assert result["eval_loss"] == pytest.approx(math.log(258))
    assert result["exact_match"] == pytest.approx(1 / 3)  # the output "936" (cut at the end token) matches once
    assert result["per_task"]["add"]["exact_match"] == 0.5 and result["per_task"]["date"]["exact_match"] == 0.0
    ids, mask = model.prompts[0]
    lengths = [len(codec.prompt_ids(e.question)) for e in held]
    for row, n in enumerate(lengths):  # left padding: the prompts end where generation starts
        assert mask[row].tolist() == [0] * (ids.shape[1] - n) + [1] * n
        assert ids[row, ids.shape[1] - n :].tolist() == codec.prompt_ids(held[row].question)
    assert bench.exact_match(" 936\n", "936") and not bench.exact_match("936.", "936")


def test_tasks_are_correct_and_the_split_is_disjoint(bench) -> None:
    train, held = bench.make_splits(60, 30)
    assert len(train) == 60 and len(held) == 30
    assert not {e.question for e in train} & {e.question for e in held}
    assert {e.task for e in held} == set(bench.TASKS)
    for e in train + held:
        if e.task == "add":
            a, b = map(int, re.findall(r"\d+", e.question))
            assert e.answer == str(a + b)
        elif e.task == "reverse":
            assert e.answer.split() == e.question.split(": ")[1].split()[::-1]
    date = next(e for e in held if e.task == "date")
    year, month, day = map(int, re.search(r"(\d{4})-(\d\d)-(\d\d)", date.question).groups())
    assert date.answer == f"{day} {bench.MONTHS[month - 1]} {year}"
    assert bench.make_splits(60, 30) == (train, held)  # the same for every run


def test_best_lr_waits_for_the_whole_sweep(bench) -> None:
    run = dict.fromkeys(bench.KEY_FIELDS, None) | {"method": "lora", "seed": 0}
    records = [{"key": bench.run_key(dict(run, lr=lr)), "eval_loss": loss} for lr, loss in ((1e-3, 0.5), (3e-3, 0.4))]
    assert bench.best_lr(records, run, [1e-3, 3e-3]) == 3e-3
    assert bench.best_lr(records, run, [1e-3, 3e-3, 1e-2]) is None
    records.append({"key": bench.run_key(dict(run, lr=1e-2)), "eval_loss": None})  # diverged
    assert bench.best_lr(records, run, [1e-3, 3e-3, 1e-2]) == 3e-3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--spiel-kwargs", '{"no_such_field": 1}'], "not SpIELConfig fields"),
        (["--spiel-kwargs", '{"num_tunable_weights": 5}'], "set by the benchmark"),
        (["--spiel-kwargs", '{"initial_reselection_rate": 2.0}'], "initial_reselection_rate"),
        (["--lrs", "lora"], "METHOD=VALUE"),
        (["--methods", "lora,dora"], "--methods"),
        (["--weight-decay", "spiel-ag=-1"], "--weight-decay"),
    ],
)
def test_bad_arguments_fail_clearly(bench, argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke", *argv])
    assert message in capsys.readouterr().err


def test_warm_up_share_then_linear_decay(bench) -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = bench.lr_schedule(optimizer, 100, 0.03)  # the thesis' 3 % warm-up: 3 updates
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert lrs[50] == pytest.approx((100 - 50) / 97) and lrs[99] == pytest.approx(1 / 97)
