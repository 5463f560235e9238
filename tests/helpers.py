"""Tiny models built from configs (no downloads) and dense PyTorch references for sparse deltas."""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)
from transformers.pytorch_utils import Conv1D

from peft_sparse import SpIELLayer

VOCAB = 64


# ----------------------------------------------------------------------------------------- tiny models
def tiny_llama_config(**overrides) -> LlamaConfig:
    """A 2-layer Llama config: hidden 32, 4 heads, 2 kv heads, intermediate 48, vocab 64."""
    kwargs = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 48,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def tiny_llama_classifier(seed: int = 0, num_labels: int = 3) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_llama_config(num_labels=num_labels)).eval()


def tiny_gpt2_config(**overrides) -> GPT2Config:
    """A 2-layer GPT-2 config: n_embd 32, 2 heads, vocab 64 (its projections are transformers' Conv1D)."""
    kwargs = {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": VOCAB, "n_positions": 64}
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config(**overrides)).eval()


class TinyMLP(nn.Module):
    """A plain module: two targeted Linear layers (``lin0``, ``lin1``) and an untargeted head (``head``)."""

    def __init__(self, features: int = 12, hidden: int = 20, outputs: int = 5) -> None:
        super().__init__()
        self.lin0 = nn.Linear(features, hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.lin1(self.act(self.lin0(x)))))


def tiny_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().eval()


def token_batch(seed: int = 0, batch: int = 2, length: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


# ----------------------------------------------------------------------------------------- references
def dense_delta(indices: torch.Tensor, values: torch.Tensor, shape, dtype=torch.float32) -> torch.Tensor:
    """``scatter(indices, values)`` as a dense tensor of ``shape``, by plain ``index_put_``."""
    flat = torch.zeros(int(torch.tensor(shape).prod()), dtype=dtype)
    flat.index_put_((indices.detach().long().cpu(),), values.detach().to(dtype).cpu(), accumulate=True)
    return flat.view(*shape)


def reference_linear(x: torch.Tensor, base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """``x @ (W + delta).T + b`` for an ``nn.Linear`` or a ``Conv1D`` (whose ``W`` and ``delta`` are ``[in, out]``)."""
    weight = base.weight.detach().float() + delta.float()
    bias = None if base.bias is None else base.bias.detach().float()
    if isinstance(base, Conv1D):
        weight = weight.t()
    return F.linear(x.float(), weight, bias)


def spiel_layers(model: nn.Module) -> dict[str, SpIELLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, SpIELLayer)}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected), sorted(set(state) ^ set(expected))
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


# ----------------------------------------------------------------------------------------- host reads
# aten ops that read a tensor's values on the host (on an accelerator: wait for the device): item/int/float/bool,
# output sizes that depend on the values, comparisons returning a Python bool
_READING_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "equal",
    "is_nonzero",
    "allclose",
    "bincount",
    "histc",
}


def _caller_in_peft_sparse() -> str | None:
    ours = [f for f in traceback.extract_stack()[:-2] if f"{os.sep}peft_sparse{os.sep}" in f.filename]
    return f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else None


class _ReadingOps(TorchDispatchMode):
    def __init__(self, reads: list) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        reads = name in _READING_OPS
        if name in ("index", "index_put", "index_put_") and len(args) > 1:
            reads = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
        if name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None:
            reads = True
        where = _caller_in_peft_sparse() if reads else None
        if where:
            self.reads.append((name, where))
        return func(*args, **kwargs)


class _ReadingMethods(TorchFunctionMode):
    # whole-tensor conversions that never reach the dispatcher for CPU tensors
    METHODS = {"tolist", "numpy"}

    def __init__(self, reads: list) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        where = _caller_in_peft_sparse() if name in self.METHODS else None
        if where:
            self.reads.append((name, where))
        return func(*args, **(kwargs or {}))


class HostReads:
    """Within the ``with`` block, record every read of tensor values on the host made from peft_sparse's code
    (``reads``: ``(op, "file:line")`` pairs): the ops in ``_READING_OPS``, indexing with a boolean mask,
    ``repeat_interleave`` without ``output_size``, ``tolist`` and ``numpy``. On the CPU these cost nothing; on an
    accelerator each one waits for the device. Reads made by torch on its own behalf (e.g. an optimizer reading its
    CPU step count) are not peft_sparse's and are not recorded."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, str]] = []
        self._modes = (_ReadingMethods(self.reads), _ReadingOps(self.reads))

    def __enter__(self) -> "HostReads":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


# ----------------------------------------------------------------------------------------- benchmark scripts
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as the module ``name`` (registered in ``sys.modules``, where dataclasses
    look their module up; ``benchmarks/`` on the path, for scripts that import their siblings)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
