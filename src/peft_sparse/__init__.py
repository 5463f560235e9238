"""peft-sparse: sparse fine-tuning methods as Hugging Face PEFT tuners.

Importing this package adds ``PeftType.SPIEL`` and ``PeftType.LTSFT`` to PEFT and registers the methods, so
``get_peft_model``, ``PeftModel.from_pretrained`` and transformers' ``load_adapter`` work with ``SpIELConfig`` and
``LTSFTConfig`` adapters. ``peft_sparse.ltsft`` drives the LT-SFT phases.
"""

from . import interop
from ._registration import register_method
from .compose import compose_adapters, sparsify
from .optim import SM3
from .sparse_linear import release_held_merges
from .training import install as _install_training_hooks
from .training import set_total_steps
from .training.precision import install as _install_precision_checks
from .tuners import LTSFTConfig, LTSFTLayer, LTSFTModel, SpIELConfig, SpIELLayer, SpIELModel, ltsft, sparse_deltas
from .tuners.loading import AdapterLoadError
from .tuners.loading import install as _install_loading_guards

__version__ = "0.1.0"

register_method("spiel", SpIELConfig, SpIELModel)
register_method("ltsft", LTSFTConfig, LTSFTModel)
_install_training_hooks()
_install_loading_guards()
_install_precision_checks()

__all__ = [
    "AdapterLoadError",
    "SM3",
    "LTSFTConfig",
    "LTSFTLayer",
    "LTSFTModel",
    "SpIELConfig",
    "SpIELLayer",
    "SpIELModel",
    "compose_adapters",
    "interop",
    "ltsft",
    "release_held_merges",
    "set_total_steps",
    "sparse_deltas",
    "sparsify",
]
