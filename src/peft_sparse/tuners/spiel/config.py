"""SpIELConfig: the public contract of the SpIEL tuner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ..._registration import ensure_peft_type
from ...selection import SCHEDULES
from ..config_checks import check_common_fields, check_number, check_positive_integer, is_integer

SELECTIONS = ("ag", "ma", "random")


@dataclass
class SpIELConfig(PeftConfig):
    """Configuration of a SpIEL (Sparse Iterative Efficient Learning) adapter.

    Budget: set exactly one of ``density``, ``num_tunable_weights`` or ``match_lora_rank``; with none set,
    ``density=0.01``. Every S = ``reselection_steps`` optimizer updates the entries that changed least are dropped and
    as many new ones are grown, by accumulated gradients ("ag"), SM3 row/column statistics ("ma") or at random.
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
        metadata={"help": "Give each target r * (in + out) entries: the parameter count of LoRA at rank r."},
    )
    selection: str = field(default="ag", metadata={"help": "Growth criterion: 'ag', 'ma' or 'random'."})
    reselection_steps: int = field(default=20, metadata={"help": "S: optimizer updates between reselections."})
    accumulation_steps: int = field(
        default=5, metadata={"help": "gamma: updates of gradient estimation before each reselection (AG)."}
    )
    initial_reselection_rate: float = field(
        default=0.2, metadata={"help": "xi: fraction of entries replaced at the second reselection, then decayed."}
    )
    reselection_schedule: str = field(default="linear", metadata={"help": "Decay of xi: 'linear' or 'cosine'."})
    total_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "T: total optimizer updates. None: the HF Trainer's max_steps at train start; in a plain loop "
            "without it, xi is not decayed."
        },
    )
    delta_dtype: str = field(default="float32", metadata={"help": "dtype of the values: float32, bfloat16, float16."})
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
        if self.reselection_schedule not in SCHEDULES:
            raise ValueError(f"reselection_schedule must be one of {SCHEDULES}, got {self.reselection_schedule!r}")
        check_positive_integer("total_steps", self.total_steps, optional=True)
        if not is_integer(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}")
