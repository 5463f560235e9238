"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning (thesis chapter 4, ACL 2022) as a PEFT tuner.

Phase 1 trains the targeted weights densely from theta0; ``select_and_rewind`` keeps the K entries with the largest
``|theta1 - theta0|`` (one exact global top-K), rewinds every targeted weight and the ``modules_to_save`` heads, and
phase 2 trains only those K values (stored as a sparse delta, so every other entry stays bit-identical, weight decay
included). The result is an ordinary PEFT adapter (``"peft_type": "LTSFT"``): it saves, loads, merges and composes
like SpIEL's.

The change to an existing HF Trainer script::

    import peft_sparse
    from peft import get_peft_model

    model = get_peft_model(model, peft_sparse.LTSFTConfig(num_tunable_weights=K))    # 1. dense phase
    Trainer(model=model, args=args, train_dataset=ds).train()
    peft_sparse.ltsft.select_and_rewind(model)                                       # 2. select, rewind
    Trainer(model=model, args=args, train_dataset=ds).train()                        # 3. sparse phase (new Trainer:
    model.save_pretrained(out)                                                       #    fresh optimizer and schedule)

or, for any ``n_iterations``, ``for phase in peft_sparse.ltsft.phases(model): Trainer(...).train()``. A plain loop
works the same way (create a new optimizer after ``select_and_rewind``). The L1 term (``dense_l1_reg``,
``sparse_l1_reg``) is added to ``outputs.loss`` by a forward hook; the Trainer shows the phase when training starts
and logs ``ltsft_phase`` and ``ltsft_l1``; ``select_and_rewind`` prints what it selected.

Memory: the dense phase keeps one copy of the targeted weights (theta0, ``theta0_device="cpu"`` to keep it off the
accelerator); selection is chunked and never lists all parameters; the sparse phase keeps no copy.
"""

from .config import LTSFTConfig
from .layer import LTSFTLayer, LTSFTModule
from .model import LTSFTModel, SelectionReport, default_target_modules
from .phases import (
    PhaseInfo,
    current_phase,
    l1_penalty,
    ltsft_tuner,
    phases,
    select_and_rewind,
    start_dense_phase,
)

__all__ = [
    "LTSFTConfig",
    "LTSFTLayer",
    "LTSFTModel",
    "LTSFTModule",
    "PhaseInfo",
    "SelectionReport",
    "current_phase",
    "default_target_modules",
    "l1_penalty",
    "ltsft_tuner",
    "phases",
    "select_and_rewind",
    "start_dense_phase",
]
