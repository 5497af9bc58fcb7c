"""Putting the fake-quant modules into a model, and setting their activation and KV quantizers."""

from __future__ import annotations

from ..config import QuantConfig, QuantSpec
from ..models import ModelParts
from ..rotation.hadamard import OnlineHadamard, fast_hadamard_transform
from ..rotation.merge import update_weight
from .modules import KVQuant, QuantLinear, use_spinquant_attention


def install_modules(parts: ModelParts, r3: bool, r4: bool) -> None:
    """Wrap every decoder linear in QuantLinear, add R4 before down_proj and KVQuant (R3) on attention."""
    for layer in parts.layers:
        for role, linear in layer.linears().items():
            layer.set(role, QuantLinear.wrap(linear))
        if r4 and layer.down.input_transform is None:
            down = layer.down
            down.input_transform = OnlineHadamard(down.in_features)
            # y = H(x)·W'ᵀ with W' = W·H/√n gives back x·Wᵀ: apply the same transform to W's rows.
            update_weight(down, fast_hadamard_transform)
        if getattr(layer.attention, "kv_quant", None) is None:
            layer.attention.kv_quant = KVQuant(parts.head_dim, rotate_qk=r3)
    use_spinquant_attention(parts.model)


def quant_linears(parts: ModelParts):
    """(name, QuantLinear) for every decoder linear, in layer order."""
    for layer in parts.layers:
        for role, linear in layer.linears().items():
            yield f"layers.{layer.index}.{role}", linear


def kv_spec(spec: QuantSpec) -> QuantSpec:
    """K/V are quantized per token per head: the group is the head, whatever the user's group size."""
    return QuantSpec(bits=spec.bits, symmetric=spec.symmetric, group_size=None, clip_ratio=spec.clip_ratio)


def set_activation_quant(parts: ModelParts, q: QuantConfig) -> None:
    """Configure the dynamic quantizers; lm_head's input stays in floating point."""
    for _, linear in quant_linears(parts):
        linear.act_quant.spec = q.act
    for layer in parts.layers:
        layer.attention.kv_quant.key_quant.spec = kv_spec(q.key)
        layer.attention.kv_quant.value_quant.spec = kv_spec(q.value)
