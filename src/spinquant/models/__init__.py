"""Adapter registry keyed by Hugging Face `config.model_type`."""

from __future__ import annotations

from torch import nn

from ..errors import SpinQuantError
from .base import Adapter, LayerParts, ModelParts
from .families import FAMILIES

REGISTRY: dict[str, Adapter] = {mt: a for a in FAMILIES for mt in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def adapter_for(model_or_type: nn.Module | str) -> Adapter:
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise SpinQuantError(
            f"architecture {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())} (a new family needs an adapter in spinquant/models/families.py)"
        ) from None


def model_parts(model: nn.Module) -> ModelParts:
    return adapter_for(model).parts(model)


__all__ = ["REGISTRY", "Adapter", "LayerParts", "ModelParts", "adapter_for", "model_parts", "supported_model_types"]
