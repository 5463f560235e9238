"""SpIEL: Sparse Iterative Efficient Learning (thesis chapter 7)."""

from .config import SpIELConfig
from .layer import SpIELLayer, SpIELLinear
from .model import SpIELModel

__all__ = ["SpIELConfig", "SpIELLayer", "SpIELLinear", "SpIELModel"]
