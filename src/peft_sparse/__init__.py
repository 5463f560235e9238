"""peft-sparse: sparse fine-tuning methods as Hugging Face PEFT tuners.

Importing this package adds ``PeftType.SPIEL`` to PEFT and registers the method, so ``get_peft_model``,
``PeftModel.from_pretrained`` and transformers' ``load_adapter`` work with ``SpIELConfig`` adapters.
"""

from ._registration import register_method
from .optim import SM3
from .training import install as _install_training_hooks
from .training import set_total_steps
from .tuners import SpIELConfig, SpIELLayer, SpIELModel, sparse_deltas

__version__ = "0.1.0"

register_method("spiel", SpIELConfig, SpIELModel)
_install_training_hooks()

__all__ = ["SM3", "SpIELConfig", "SpIELLayer", "SpIELModel", "set_total_steps", "sparse_deltas"]
