"""PEFT tuners of peft-sparse."""

from . import ltsft
from .ltsft import LTSFTConfig, LTSFTLayer, LTSFTModel
from .sparse_layer import SparseDeltaLayer
from .sparse_model import SparseTunerModel, sparse_deltas
from .spiel import SpIELConfig, SpIELLayer, SpIELLinear, SpIELModel

__all__ = [
    "LTSFTConfig",
    "LTSFTLayer",
    "LTSFTModel",
    "SpIELConfig",
    "SpIELLayer",
    "SpIELLinear",
    "SpIELModel",
    "SparseDeltaLayer",
    "SparseTunerModel",
    "ltsft",
    "sparse_deltas",
]
