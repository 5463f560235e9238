"""LTSFTConfig: the public contract of the LT-SFT tuner."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ..._registration import ensure_peft_type
from ..config_checks import check_common_fields, check_number, check_positive_integer, is_integer

SELECTION_SCOPES = ("global", "per_tensor")


@dataclass
class LTSFTConfig(PeftConfig):
    """Configuration of an LT-SFT (Lottery-Ticket Sparse Fine-Tuning) adapter, thesis §4.3.1.

    Budget: set one of ``num_tunable_weights`` (K) or ``density`` (K as a fraction of the targeted entries); with
    neither, ``density=0.01``. Training has a dense phase (the targeted weights themselves train), then
    ``peft_sparse.ltsft.select_and_rewind`` keeps the K entries that changed most, rewinds to the pre-trained values
    and starts the sparse phase (only those K values train). See ``peft_sparse.tuners.ltsft`` for the recipe.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (list) or a regex of the nn.Linear / Conv1D / nn.Embedding modules whose weights "
            "(and biases) may be selected. None: every such module of the base model (model.base_model, i.e. without "
            "the task or LM head), embeddings included; normalisation layers are never targeted."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (list) or a regex to exclude from target_modules."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules (e.g. a task head) trained densely in both phases, reset to their initial values at the "
            "start of each, and saved whole."
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices (as in PEFT's LoRA)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform, e.g. 'layers'."}
    )
    num_tunable_weights: int | None = field(
        default=None, metadata={"help": "K: the number of entries selected after the dense phase (all iterations)."}
    )
    density: float | None = field(
        default=None, metadata={"help": "K as a fraction of the targeted entries, in (0, 1]."}
    )
    include_biases: bool = field(
        default=True, metadata={"help": "Whether the biases of the targeted modules may be selected too."}
    )
    untie_output_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Give the output embedding (model.get_output_embeddings()) its own frozen copy of the weights "
            "and never target it: for MLM language SFTs, where the tied output matrix would otherwise take most of K."
        },
    )
    dense_l1_reg: float = field(
        default=0.0,
        metadata={
            "help": "lambda of the L1 term lambda / N * sum |theta - theta0| added to the loss in the dense phase "
            "(N = number of model parameters); 0.1 for language SFTs in the paper."
        },
    )
    sparse_l1_reg: float = field(
        default=0.0, metadata={"help": "lambda of the same L1 term in the sparse phase (on the K values)."}
    )
    n_iterations: int = field(
        default=1,
        metadata={"help": "Dense/sparse rounds; each selects K / n_iterations more entries (the mask accumulates)."},
    )
    selection_scope: str = field(
        default="global",
        metadata={
            "help": "'global': one top-K over all targeted tensors (the paper). 'per_tensor': each tensor keeps the "
            "same fraction of its entries."
        },
    )
    theta0_device: str | None = field(
        default=None,
        metadata={
            "help": "Where the single copy of the pre-trained targeted weights lives during the dense phase: None "
            "(next to the weights) or 'cpu' (saves accelerator memory; makes dense_l1_reg slow)."
        },
    )
    delta_sizes: dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Filled in, not set: {module: [weight entries, bias entries]} of the trained adapter, so that an "
            "adapter loaded in inference mode is created with its final sizes (loaders that check shapes, such as "
            "transformers' load_adapter, need that)."
        },
    )
    delta_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the values: float32, bfloat16, float16 (float16 only with optimizers without second "
            "moments, e.g. SGD; Adam/AdamW refuse it)."
        },
    )
    kernel_backend: str = field(
        default="auto",
        metadata={"help": "'auto', 'torch' or 'triton'; the environment variable PEFT_SPARSE_KERNEL_BACKEND wins."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("LTSFT")
        check_common_fields(self, ("num_tunable_weights", "density"))
        for name in ("dense_l1_reg", "sparse_l1_reg"):
            check_number(name, getattr(self, name), 0.0)
        check_positive_integer("n_iterations", self.n_iterations)
        for name in ("include_biases", "untie_output_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.selection_scope not in SELECTION_SCOPES:
            raise ValueError(f"selection_scope must be one of {SELECTION_SCOPES}, got {self.selection_scope!r}")
        if self.delta_sizes is not None and not (
            isinstance(self.delta_sizes, dict)
            and all(
                isinstance(v, (list, tuple)) and len(v) == 2 and all(is_integer(n) and n >= 0 for n in v)
                for v in self.delta_sizes.values()
            )
        ):
            raise ValueError(
                f"delta_sizes must map module names to [weight, bias] entry counts, got {self.delta_sizes!r}"
            )
        if self.theta0_device not in (None, "cpu"):
            raise ValueError(f"theta0_device must be None or 'cpu', got {self.theta0_device!r}")
