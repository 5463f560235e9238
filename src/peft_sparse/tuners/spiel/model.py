"""SpIELModel: the PEFT tuner that injects SpIEL layers."""

from __future__ import annotations

from ..sparse_model import SparseTunerModel
from .layer import SpIELLayer, SpIELLinear


class SpIELModel(SparseTunerModel):
    """Creates a SpIEL model from a pretrained transformers model (use ``get_peft_model`` with a ``SpIELConfig``).

    Example::

        from peft import get_peft_model
        from peft_sparse import SpIELConfig

        model = get_peft_model(base_model, SpIELConfig(target_modules="all-linear", density=0.01))
    """

    prefix: str = "spiel_"
    tuner_layer_cls = SpIELLayer
    layer_cls = SpIELLinear
