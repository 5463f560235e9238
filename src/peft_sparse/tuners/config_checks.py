"""Checks of the config fields that every sparse tuner shares (targets, budget, dtype, kernels)."""

from __future__ import annotations

from typing import Any, Sequence

from ..kernels import BACKENDS
from .sparse_layer import DTYPES

DEFAULT_DENSITY = 0.01


def check_common_fields(config: Any, budget_fields: Sequence[str]) -> None:
    """Normalise and validate the shared fields of a sparse tuner config in place.

    Target lists become sets; at most one of ``budget_fields`` may be set, and with none ``density`` becomes
    ``DEFAULT_DENSITY``. Raises ValueError naming the field and the value.
    """
    if isinstance(config.target_modules, list):
        config.target_modules = set(config.target_modules)
    if isinstance(config.exclude_modules, list):
        config.exclude_modules = set(config.exclude_modules)
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError("layers_pattern is only used with layers_to_transform, which is None")
    budgets = [name for name in budget_fields if getattr(config, name) is not None]
    if len(budgets) > 1:
        given = ", ".join(f"{name}={getattr(config, name)!r}" for name in budgets)
        raise ValueError(f"set only one of {', '.join(budget_fields)}; got {given}")
    if not budgets:
        config.density = DEFAULT_DENSITY
    if config.density is not None and not 0.0 < config.density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {config.density}")
    if config.num_tunable_weights is not None and (
        not isinstance(config.num_tunable_weights, int) or config.num_tunable_weights < 1
    ):
        raise ValueError(f"num_tunable_weights must be a positive integer, got {config.num_tunable_weights!r}")
    if config.delta_dtype not in DTYPES:
        raise ValueError(f"delta_dtype must be one of {tuple(DTYPES)}, got {config.delta_dtype!r}")
    if config.kernel_backend not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {config.kernel_backend!r}")
