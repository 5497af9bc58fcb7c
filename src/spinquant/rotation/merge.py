"""Function-preserving surgery: untie, fuse RMSNorm scales, merge rotations into weights.

The tensor functions (`rotate_in`, `rotate_out`, `rotate_heads_in`, `rotate_heads_out`) are the whole
algebra; they serve both the exact float64 merge here and the differentiable forward in rotation training.
Convention: a linear computes y = x Wᵀ + b. If its input arrives rotated (x R), use W R; if its output must
leave rotated (y R), use Rᵀ W and Rᵀ b.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..models import ModelParts
from ..streaming import LayerStream, PerDevice, each_layer, on_device


def rotate_in(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Weight [out, in] whose input is now x·R: W·R. Also for embedding tables [vocab, hidden]."""
    return w @ r


def rotate_out(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Weight [out, in] (or bias [out]) whose output must become y·R: Rᵀ·W."""
    return r.T @ w


def rotate_heads_out(w: torch.Tensor, r: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rᵀ applied to every head block of the output side (v_proj weight [h·d, in] or bias [h·d])."""
    shape = w.shape
    heads = w.reshape(shape[0] // head_dim, head_dim, -1)
    return (r.T @ heads).reshape(shape)


def rotate_heads_in(w: torch.Tensor, r: torch.Tensor, head_dim: int) -> torch.Tensor:
    """R applied to every head block of the input side (o_proj weight [out, h·d])."""
    out, inp = w.shape
    heads = w.reshape(out, inp // head_dim, head_dim)
    return (heads @ r).reshape(out, inp)


@torch.no_grad()
def update_weight(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], name: str = "weight") -> None:
    """Apply fn to a parameter in float64 and store it back in its own dtype."""
    param = getattr(module, name)
    if param is None:
        return
    param.data = fn(param.data.double()).to(param.dtype)


def untie_embeddings(parts: ModelParts) -> bool:
    """Give lm_head its own weight: it will absorb the final norm and R1 differently from the embedding."""
    model = parts.model
    tied = parts.lm_head.weight is parts.embedding.weight or parts.lm_head.weight.data_ptr() == (
        parts.embedding.weight.data_ptr()
    )
    if tied:
        parts.lm_head.weight = nn.Parameter(parts.embedding.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    # transformers re-ties on save/load when these keys are set.
    if getattr(model, "_tied_weights_keys", None):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []
    return tied


@torch.no_grad()
def fuse_norm(norm: nn.Module, readers: Iterable[nn.Module]) -> None:
    """Fold an RMSNorm's scale into the columns of the linears reading it; the norm becomes scale-free.

    No mean subtraction: that belongs to LayerNorm models and would change an RMSNorm model's function.
    """
    scale = norm.weight.data.double()
    for linear in readers:
        update_weight(linear, lambda w: w * scale)
    norm.weight.data.fill_(1.0)


def fuse_norms(parts: ModelParts) -> None:
    for layer in parts.layers:
        fuse_norm(layer.input_norm, (layer.q, layer.k, layer.v))
        fuse_norm(layer.post_attention_norm, (layer.gate, layer.up))
    fuse_norm(parts.final_norm, (parts.lm_head,))


def prepare(parts: ModelParts) -> None:
    """Untie and fuse: after this, every residual-stream norm is scale-free and rotations commute with it."""
    untie_embeddings(parts)
    fuse_norms(parts)


def merge_r1(parts: ModelParts, r1: torch.Tensor, stream: LayerStream | None = None) -> None:
    """Rotate the residual stream: readers get W·R1, writers Rᵀ1·W, the embedding E·R1.

    With a stream, each layer (and the embedding, lm_head) is merged on the compute device in turn."""
    r = PerDevice(r1.double())
    with on_device(stream, parts.embedding):
        update_weight(parts.embedding, lambda w: rotate_in(w, r(w)))
    for layer in each_layer(parts, stream):
        for reader in (layer.q, layer.k, layer.v, layer.gate, layer.up):
            update_weight(reader, lambda w: rotate_in(w, r(w)))
        for writer in (layer.o, layer.down):
            update_weight(writer, lambda w: rotate_out(w, r(w)))
            update_weight(writer, lambda b: rotate_out(b, r(b)), "bias")
    with on_device(stream, parts.lm_head):
        update_weight(parts.lm_head, lambda w: rotate_in(w, r(w)))


def merge_r2(parts: ModelParts, r2: list[torch.Tensor], stream: LayerStream | None = None) -> None:
    """Rotate each head's value space: v_proj output by R2, o_proj input back by R2ᵀ."""
    d = parts.head_dim
    if len(r2) != len(parts.layers):
        raise ValueError(f"{len(r2)} R2 matrices for {len(parts.layers)} layers")
    for layer in each_layer(parts, stream):
        r = PerDevice(r2[layer.index].double())
        update_weight(layer.v, lambda w, r=r: rotate_heads_out(w, r(w), d))
        update_weight(layer.v, lambda b, r=r: rotate_heads_out(b, r(b), d), "bias")
        update_weight(layer.o, lambda w, r=r: rotate_heads_in(w, r(w), d))
