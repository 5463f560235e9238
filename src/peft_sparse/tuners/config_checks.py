"""Checks of the config fields that every sparse tuner shares (targets, budget, dtype, kernels)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from ..kernels import BACKENDS
from .sparse_layer import DTYPES

DEFAULT_DENSITY = 0.01


def is_integer(value: Any) -> bool:
    """True for ints (numpy integers included), False for bools."""
    return isinstance(value, (int, numbers.Integral)) and not isinstance(value, bool)


def check_number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """Raise ValueError naming ``name`` and ``value`` unless ``value`` is a finite real number (not a bool) in
    ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    interval = f"{'(' if low_open else '['}{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_positive_integer(name: str, value: Any, optional: bool = False) -> None:
    """Raise ValueError naming ``name`` and ``value`` unless ``value`` is an int >= 1 (bools refused); None passes
    when ``optional``."""
    if optional and value is None:
        return
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")


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
    if config.layers_to_transform is not None and isinstance(config.target_modules, str):
        # PEFT matches a string target as a regex over full module names, which ignores layers_to_transform
        raise ValueError(
            f"layers_to_transform={config.layers_to_transform!r} cannot be used when target_modules is a string "
            f"({config.target_modules!r}); list the module names instead"
        )
    layers = config.layers_to_transform
    if layers is not None and not (
        is_integer(layers) or (isinstance(layers, (list, tuple)) and all(is_integer(i) for i in layers))
    ):
        raise ValueError(f"layers_to_transform must be an integer or a list of integers, got {layers!r}")
    budgets = [name for name in budget_fields if getattr(config, name) is not None]
    if len(budgets) > 1:
        given = ", ".join(f"{name}={getattr(config, name)!r}" for name in budgets)
        raise ValueError(f"set only one of {', '.join(budget_fields)}; got {given}")
    if not budgets:
        config.density = DEFAULT_DENSITY
    if config.density is not None:
        check_number("density", config.density, 0.0, 1.0, low_open=True)
    check_positive_integer("num_tunable_weights", config.num_tunable_weights, optional=True)
    if config.delta_dtype not in DTYPES:
        raise ValueError(f"delta_dtype must be one of {tuple(DTYPES)}, got {config.delta_dtype!r}")
    if config.kernel_backend not in BACKENDS:
        raise ValueError(f"kernel_backend must be one of {BACKENDS}, got {config.kernel_backend!r}")
