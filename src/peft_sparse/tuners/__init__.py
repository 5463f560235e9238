"""PEFT tuners of peft-sparse."""

from .sparse_layer import SparseDeltaLayer
from .sparse_model import SparseTunerModel, sparse_deltas
from .spiel import SpIELConfig, SpIELLayer, SpIELLinear, SpIELModel

__all__ = ["SparseDeltaLayer", "SparseTunerModel", "SpIELConfig", "SpIELLayer", "SpIELLinear", "SpIELModel", "sparse_deltas"]
