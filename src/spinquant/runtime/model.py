"""Build a Hugging Face causal LM that runs the packed weights with the runtime modules.

The model class is the architecture's own (LlamaForCausalLM, ...) with a small mixin in front: every
forward and generate call gets a `QuantKVCache`, so K and V are always quantized, with or without a
cache requested, exactly where the fake-quant model quantizes them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..config import QuantSpec
from ..errors import SpinQuantError
from ..models import model_parts
from ..models.base import get_module, set_module
from ..quant.modules import HEAD_ACT
from ..rotation.hadamard import online_hadamard as hadamard
from .kvcache import QuantKVCache
from .modules import (
    FloatLinear,
    FusedInput,
    Int4Linear,
    Int8Embedding,
    IntLinear,
    WeightOnlyLinear,
    int4_kernel_group,
)
from .packing import unpack_codes

RUNTIME_ATTENTION = "spinquant_runtime"


def runtime_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """SDPA after R3 on the queries; the keys were rotated (and quantized) by the cache."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if getattr(module, "spinquant_rotate_q", False):
        query = hadamard(query)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_runtime_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(RUNTIME_ATTENTION, runtime_attention)
    if RUNTIME_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(RUNTIME_ATTENTION, sdpa_mask)


class RuntimeLMMixin:
    """Put in front of a transformers *ForCausalLM class: forward and generate always use a QuantKVCache."""

    spinquant_kv: tuple[QuantSpec, QuantSpec, bool]

    def new_cache(self) -> QuantKVCache:
        key, value, rotate = self.spinquant_kv
        return QuantKVCache(self.config.num_hidden_layers, key, value, rotate)

    def forward(self, *args, **kwargs):
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy
        if cache is None:
            # No cache asked for (e.g. perplexity): a fresh one still quantizes K and V inside this call.
            cache = self.new_cache()
        elif not isinstance(cache, QuantKVCache):
            raise SpinQuantError(f"a spinquant model needs its own KV cache, got {type(cache).__name__}; "
                                 "pass cache=model.new_cache() or no cache at all")
        return super().forward(*args, cache=cache, **kwargs)

    def generate(self, *args, **kwargs):
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs["cache"] = self.new_cache()
        return super().generate(*args, **kwargs)


@functools.cache
def runtime_class(base: type) -> type:
    return type(f"SpinQuant{base.__name__}", (RuntimeLMMixin, base), {"__module__": __name__})


def _pop(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor | None:
    return tensors.pop(key, None)


def make_linear(prefix: str, tensors: dict[str, torch.Tensor], weight: QuantSpec, act: QuantSpec,
                hadamard: bool, dtype: torch.dtype, weight_only: str) -> nn.Module:
    """The fastest exact runtime module for one saved decoder linear (tensors are consumed)."""
    bias = _pop(tensors, f"{prefix}.bias")
    if f"{prefix}.weight" in tensors:
        return FloatLinear(tensors.pop(f"{prefix}.weight"), bias, act, hadamard, dtype)
    packed = tensors.pop(f"{prefix}.qweight")
    scale = tensors.pop(f"{prefix}.scale")
    zero = _pop(tensors, f"{prefix}.zero")
    codes = unpack_codes(packed, weight.bits, weight.symmetric)
    n, k = codes.shape
    group = weight.group_size if weight.group_size not in (None, k) else None
    kernel_group = int4_kernel_group(k, group, act) if weight.bits <= 4 and dtype == torch.float32 else None
    if kernel_group and weight_only == "native" and native.available():
        return Int4Linear(codes, scale, zero, weight, act, kernel_group, bias, hadamard)
    weight_only = "cached" if weight_only == "native" else weight_only
    if not act.enabled:
        mode = "cached" if weight_only == "int4pack" and weight.bits > 4 else weight_only
        return WeightOnlyLinear(codes, scale, zero, group, bias, None, hadamard, mode, dtype)
    centred = codes.to(torch.int16) - (zero.to(torch.int16).reshape(n, -1, 1).expand(n, -1, group or k)
                                       .reshape(n, k) if zero is not None else 0)
    fits = not centred.numel() or (int(centred.min()) >= -128 and int(centred.max()) <= 127)
    groups_match = act.group_size in (None, k) or group is None or act.group_size == group
    if act.bits <= 8 and fits and groups_match:
        return IntLinear(centred.to(torch.int8), scale, act, bias, group, hadamard, dtype)
    # Unsigned 8-bit weights or mismatched groups: exact float fallback (dequantized weight, fake activations).
    return WeightOnlyLinear(codes, scale, zero, group, bias, act, hadamard, "cached", dtype)


FUSED_ROLES = (("q", "k", "v"), ("gate", "up"))  # linears that read the same input tensor


def fuse_saved(prefixes: list[str], tensors: dict[str, torch.Tensor], into: str) -> list[int]:
    """Concatenate the saved tensors of several linears along the output dim under `into` (consumed)."""
    sizes = [len(tensors.get(f"{p}.scale", tensors.get(f"{p}.weight"))) for p in prefixes]
    for field in ("qweight", "scale", "zero", "weight"):
        if f"{prefixes[0]}.{field}" in tensors:
            tensors[f"{into}.{field}"] = torch.cat([tensors.pop(f"{p}.{field}") for p in prefixes])
    biases = [tensors.pop(f"{p}.bias", None) for p in prefixes]
    if any(b is not None for b in biases):
        tensors[f"{into}.bias"] = torch.cat([b if b is not None else torch.zeros(n) for b, n in zip(biases, sizes)])
    return sizes


def make_embedding(prefix: str, tensors: dict, padding_idx: int | None, dtype: torch.dtype) -> nn.Module:
    if f"{prefix}.qweight" in tensors:  # clone: see build_model (no module may pin the file mapping)
        return Int8Embedding(tensors.pop(f"{prefix}.qweight").clone(), tensors.pop(f"{prefix}.scale"), padding_idx,
                             dtype)
    weight = tensors.pop(f"{prefix}.weight").to(dtype).clone()
    return nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=padding_idx)


class TiedLMHead(nn.Module):
    """lm_head that shares the embedding table: logits = head(x·Mᵀ), head reading the table's storage."""

    def __init__(self, transform: torch.Tensor, head: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("transform", transform.to(dtype))
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(x, self.transform))


def make_head(prefix: str, tensors: dict, dtype: torch.dtype, head_act_bits: int,
              embedding: nn.Module | None = None) -> nn.Module:
    bias = _pop(tensors, f"{prefix}.bias")
    if f"{prefix}.tied_transform" in tensors:
        transform = tensors.pop(f"{prefix}.tied_transform")
        if isinstance(embedding, Int8Embedding):
            table = {f"{prefix}.qweight": embedding.codes, f"{prefix}.scale": embedding.scale}
        else:
            table = {f"{prefix}.weight": embedding.weight}
        return TiedLMHead(transform, make_head(prefix, table, dtype, head_act_bits), dtype)
    if f"{prefix}.qweight" in tensors:
        codes, scale = tensors.pop(f"{prefix}.qweight"), tensors.pop(f"{prefix}.scale")
        if head_act_bits == 8:
            # W8A8 with a per-token symmetric int8 input: 3-4x faster than float on CPU (the vocab matmul
            # is the largest one in a small model); head_act_bits=16 keeps the input in float.
            return IntLinear(codes, scale, HEAD_ACT, bias, dtype=dtype)
        return WeightOnlyLinear(codes, scale, None, None, bias, None, False, "cached", dtype)
    return FloatLinear(tensors.pop(f"{prefix}.weight"), bias, None, False, dtype)


def build_model(config, tensors: dict[str, torch.Tensor], sq: dict, dtype: torch.dtype = torch.float32,
                weight_only: str = "native", head_act_bits: int = 8, fuse: bool = True) -> nn.Module:
    """A runtime model from a transformers config, the saved tensors (consumed) and the `spinquant` section.

    fuse: run q/k/v and gate/up as one linear each (same results, fewer ops per token).
    """
    from transformers import AutoModelForCausalLM

    from .manifest import spec_from_dict

    register_runtime_attention()
    config.tie_word_embeddings = False
    base = AutoModelForCausalLM._model_mapping[type(config)]
    # On the meta device: no random init, no transient float copy of the full model in memory.
    with torch.device("meta"):
        model = runtime_class(base)(config)
    parts = model_parts(model)
    adapter = parts.adapter
    q = sq["quantization"]
    weight, act = spec_from_dict(q["weight"]), spec_from_dict(q["act"])
    key, value = spec_from_dict(q["key"]), spec_from_dict(q["value"])
    r3, r4 = sq["online_hadamard"]["r3"] is not None, sq["online_hadamard"]["r4"] is not None
    # `tensors` is consumed: each packed tensor is dropped as soon as its runtime module exists.
    for layer in parts.layers:
        path = f"{adapter.layers}.{layer.index}"
        for roles in (FUSED_ROLES if fuse else ()):
            prefixes = [f"{path}.{getattr(layer.names, r)}" for r in roles]
            sizes = fuse_saved(prefixes, tensors, into="fused")
            owner = FusedInput(make_linear("fused", tensors, weight, act, False, dtype, weight_only), sizes)
            layer.module.add_module(f"spinquant_{'_'.join(roles)}", owner)
            for role, piece in zip(roles, owner.slices()):
                layer.set(role, piece)
        for role in layer.LINEAR_ROLES:
            prefix = f"{path}.{getattr(layer.names, role)}"
            if f"{prefix}.qweight" in tensors or f"{prefix}.weight" in tensors:
                layer.set(role, make_linear(prefix, tensors, weight, act, hadamard=r4 and role == "down",
                                            dtype=dtype, weight_only=weight_only))
        layer.attention.spinquant_rotate_q = r3
    padding_idx = getattr(parts.embedding, "padding_idx", None)
    embedding = make_embedding(adapter.embedding, tensors, padding_idx, dtype)
    set_module(model, adapter.embedding, embedding)
    parts.set_lm_head(make_head(adapter.lm_head, tensors, dtype, head_act_bits, embedding))
    # Norms (and anything else stored as plain floats) load into the remaining parameters.
    # Copies, so that no module keeps the file's memory map (and its touched pages) alive.
    rest = {k: (v.to(dtype) if v.is_floating_point() else v).clone() for k, v in tensors.items()}
    tensors.clear()
    unexpected = model.load_state_dict(rest, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise SpinQuantError(f"the checkpoint has {len(unexpected)} tensors this architecture does not use "
                             f"(e.g. {unexpected[0]}); re-save the model with this spinquant version")
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):  # non-persistent buffers computed in __init__: build for real
            set_module(model, name, type(module)(config=config))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise SpinQuantError(f"the checkpoint lacks {len(left)} tensors (e.g. {left[0]}); re-save the model")
    model.spinquant_kv = (key, value, r3)
    model.spinquant_config = sq
    try:
        model.set_attn_implementation(RUNTIME_ATTENTION)
    except (ValueError, KeyError, AttributeError):
        model.config._attn_implementation = RUNTIME_ATTENTION
    return model.eval()


def module_summary(model: nn.Module) -> dict[str, int]:
    """How many modules of each runtime kind the model runs (for logs and tests)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        name = type(m).__name__
        if name in ("Int4Linear", "IntLinear", "WeightOnlyLinear", "FloatLinear", "Int8Embedding"):
            counts[name] = counts.get(name, 0) + 1
    return counts


__all__ = ["RUNTIME_ATTENTION", "RuntimeLMMixin", "build_model", "get_module", "module_summary", "runtime_class"]
