"""Adding our methods to PEFT's closed ``PeftType`` enum and to its registry, idempotently."""

from __future__ import annotations

from aenum import extend_enum
from peft.utils import PeftType


def ensure_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding the member first if PEFT does not know it yet."""
    if name not in PeftType.__members__:
        extend_enum(PeftType, name, name)
    return PeftType[name]


def register_method(name: str, config_cls: type, model_cls: type) -> None:
    """Register a tuner with PEFT under ``name`` (lower case); a second call is a no-op."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    peft_type = ensure_peft_type(name.upper())
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
