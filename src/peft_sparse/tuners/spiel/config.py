"""SpIELConfig: the public contract of the SpIEL tuner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ..._registration import ensure_peft_type
from ...selection import SCHEDULES
from ...selection.budget import BUDGET_ALLOCATIONS
from ..config_checks import check_common_fields, check_number, check_positive_integer, is_integer

SELECTIONS = ("ag", "ma", "random")
DROP_CRITERIA = ("magnitude", "change_since_reselection")
AG_STATISTICS = ("as_stepped", "raw")


@dataclass
class SpIELConfig(PeftConfig):
    """Configuration of a SpIEL (Sparse Iterative Efficient Learning) adapter.

    Budget: set exactly one of ``density``, ``num_tunable_weights`` or ``match_lora_rank``; with none set,
    ``density=0.01``; the budget is spread at equal density over the targets (thesis §7.3.1, footnote 2). After
    optimizer updates gamma, S + gamma, 2S + gamma, ... (gamma = ``accumulation_steps``, S = ``reselection_steps``;
    thesis eq. 7.6) the entries that changed least are dropped and as many new ones are grown, by accumulated
    gradients ("ag"), SM3 row/column statistics ("ma") or at random; the first reselection replaces every entry.
    With torch Adam/AdamW (any variant: foreach, fused, amsgrad) each entry's bias correction uses its own age, the
    updates since it was grown (thesis §7.3.1; see ``peft_sparse.optim.age``); other optimizers keep their own
    global-step correction (logged once), SM3 and SGD have none.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (list), a regex, or 'all-linear' to wrap with sparse deltas. None: the "
            "architecture's default (as for LoRA)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (list) or a regex to exclude from target_modules."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained densely and saved whole beside the deltas (e.g. heads)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices (as in PEFT's LoRA)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform, e.g. 'layers'."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: deltas start at zero. False: small random values (for tests)."}
    )
    density: Optional[float] = field(
        default=None, metadata={"help": "Fraction of each targeted weight that is tunable, in (0, 1]."}
    )
    num_tunable_weights: Optional[int] = field(
        default=None, metadata={"help": "Total tunable entries, spread in proportion to each target's size."}
    )
    match_lora_rank: Optional[int] = field(
        default=None,
        metadata={
            "help": "The total parameter count of LoRA at rank r on the same targets (sum of r * (in + out)), "
            "spread at equal density (see budget_allocation)."
        },
    )
    budget_allocation: str = field(
        default="equal_density",
        metadata={
            "help": "How match_lora_rank is spread: 'equal_density' (the same fraction of every target, thesis "
            "§7.3.1 footnote 2) or 'lora_per_tensor' (each target gets LoRA's own r * (in + out))."
        },
    )
    selection: str = field(default="ag", metadata={"help": "Growth criterion: 'ag', 'ma' or 'random'."})
    reselection_steps: int = field(default=20, metadata={"help": "S: optimizer updates between reselections."})
    accumulation_steps: int = field(
        default=5,
        metadata={
            "help": "gamma: the first reselection follows update gamma, later ones every reselection_steps updates "
            "after it (every selection). For 'ag' also the updates of gradient estimation ending at each "
            "reselection, so at most reselection_steps; for 'ma' and 'random' any positive integer."
        },
    )
    initial_reselection_rate: float = field(
        default=0.2, metadata={"help": "xi: fraction of entries replaced at the second reselection, then decayed."}
    )
    reselection_schedule: str = field(default="linear", metadata={"help": "Decay of xi: 'linear' or 'cosine'."})
    drop_criterion: str = field(
        default="magnitude",
        metadata={
            "help": "Which entries are dropped: 'magnitude' (smallest |delta|, the change from the pre-trained "
            "weight; thesis §7.3.1 and the reference code) or 'change_since_reselection' (smallest change since the "
            "last reselection, thesis Algorithm 2 line 10)."
        },
    )
    ag_statistics: str = field(
        default="as_stepped",
        metadata={
            "help": "Units of SpIEL-AG's gradient statistics (growth scores and the Adam moments seeded from them): "
            "'as_stepped' (the gradient the optimizer steps with, after gradient clipping and loss unscaling, so "
            "seeded moments match the moments Adam keeps) or 'raw' (the backward's gradient before clipping, as the "
            "SpIEL reference code does)."
        },
    )
    ag_seed_moments: bool = field(
        default=True,
        metadata={
            "help": "SpIEL-AG: seed the Adam moments of grown entries from the estimation phase's mean gradient and "
            "mean squared gradient, with the phase's length as their age (thesis §7.3.1). False: grown entries start "
            "with zero moments and age 0, as with the other selections."
        },
    )
    regrow_dropped: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Whether a position dropped at a reselection may be grown again in the same reselection (it then "
            "keeps its slot, value and optimizer state). None: True for 'ag' and 'ma' (the thesis grows the top-k of "
            "all weights after the drop, §7.3.1-7.3.2; the SpIEL reference code excludes them for 'ma'), False for "
            "'random'."
        },
    )
    total_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "T: total optimizer updates. None: the HF Trainer's max_steps at train start; in a plain loop "
            "without it, xi is not decayed."
        },
    )
    delta_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the values: float32, bfloat16, float16 (float16 only with optimizers without second "
            "moments, e.g. SGD; Adam/AdamW refuse it)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initial and random indices; same on every process."})
    kernel_backend: str = field(
        default="auto",
        metadata={"help": "'auto', 'torch' or 'triton'; the environment variable PEFT_SPARSE_KERNEL_BACKEND wins."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("SPIEL")
        check_common_fields(self, ("density", "num_tunable_weights", "match_lora_rank"))
        check_positive_integer("match_lora_rank", self.match_lora_rank, optional=True)
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        check_positive_integer("reselection_steps", self.reselection_steps)
        check_positive_integer("accumulation_steps", self.accumulation_steps)
        if self.selection == "ag" and self.accumulation_steps > self.reselection_steps:
            raise ValueError(
                f"accumulation_steps must be at most reselection_steps={self.reselection_steps} for selection 'ag', "
                f"got {self.accumulation_steps!r}"
            )
        check_number("initial_reselection_rate", self.initial_reselection_rate, 0.0, 1.0)
        if self.budget_allocation not in BUDGET_ALLOCATIONS:
            raise ValueError(f"budget_allocation must be one of {BUDGET_ALLOCATIONS}, got {self.budget_allocation!r}")
        if self.drop_criterion not in DROP_CRITERIA:
            raise ValueError(f"drop_criterion must be one of {DROP_CRITERIA}, got {self.drop_criterion!r}")
        if self.ag_statistics not in AG_STATISTICS:
            raise ValueError(f"ag_statistics must be one of {AG_STATISTICS}, got {self.ag_statistics!r}")
        if not isinstance(self.ag_seed_moments, bool):
            raise ValueError(f"ag_seed_moments must be True or False, got {self.ag_seed_moments!r}")
        if self.regrow_dropped is not None and not isinstance(self.regrow_dropped, bool):
            raise ValueError(f"regrow_dropped must be True, False or None, got {self.regrow_dropped!r}")
        if self.reselection_schedule not in SCHEDULES:
            raise ValueError(f"reselection_schedule must be one of {SCHEDULES}, got {self.reselection_schedule!r}")
        check_positive_integer("total_steps", self.total_steps, optional=True)
        if not is_integer(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")

    @property
    def excludes_dropped_from_growth(self) -> bool:
        """True if growth may not pick a position dropped in the same reselection (see ``regrow_dropped``)."""
        if self.regrow_dropped is None:
            return self.selection == "random"
        return not self.regrow_dropped
