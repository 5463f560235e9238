"""Tiny models and dense references shared by the LT-SFT, composition and interop tests."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForTokenClassification

VOCAB = 64


def tiny_bert_config(**overrides) -> BertConfig:
    """A 2-layer BERT config: hidden 32, 2 heads, intermediate 48, vocab 64, no dropout."""
    kwargs = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 48,
        "max_position_embeddings": 32,
        "type_vocab_size": 2,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_bert_mlm(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(tiny_bert_config()).eval()


def tiny_bert_tagger(seed: int = 0, num_labels: int = 3) -> BertForTokenClassification:
    torch.manual_seed(seed)
    return BertForTokenClassification(tiny_bert_config(num_labels=num_labels)).eval()


def rebuild(model: nn.Module) -> nn.Module:
    """A new instance of ``model``'s class and config with the same weights (built, not deep-copied)."""
    torch.manual_seed(12345)
    fresh = type(model)(copy.deepcopy(model.config))
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def batches(count: int, seed: int = 0, batch: int = 2, length: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (batch, length), generator=generator) for _ in range(count)]


def brute_force_topk(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Exactly ``k`` largest entries over all ``scores`` (flattened), ties to the lowest (tensor, flat index): the
    dense reference (one concatenated tensor, a stable sort)."""
    flat = torch.cat([s.detach().float().reshape(-1) for s in scores])
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order] = True
    out, start = [], 0
    for s in scores:
        out.append(torch.nonzero(chosen[start : start + s.numel()]).squeeze(1))
        start += s.numel()
    return out


def targeted(model: nn.Module, adapter: str = "default") -> list[tuple[str, nn.Module, str]]:
    """``(module name, LT-SFT layer, "weight"/"bias")`` of every selectable tensor of ``adapter``, in module order."""
    from peft_sparse.tuners.ltsft import LTSFTLayer

    tuner = model.base_model
    out = []
    for name, module in tuner.model.named_modules():
        if isinstance(module, LTSFTLayer) and adapter in module.sparse_config:
            config = module.sparse_config[adapter]
            out.append((name, module, "weight"))
            if config.include_biases and module.base_bias is not None:
                out.append((name, module, "bias"))
    return out


def effective(layer, kind: str, adapter: str = "default") -> torch.Tensor:
    """The base tensor with ``adapter``'s delta added (float32), by plain indexing."""
    base = layer.base_tensor(kind).detach().float().clone().reshape(-1)
    indices, values = layer.deltas_of(adapter)[kind]
    base[indices.long()] += values.detach().float()
    return base.view_as(layer.base_tensor(kind))
