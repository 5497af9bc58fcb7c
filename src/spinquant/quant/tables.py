"""Embedding and lm_head storage ("tables"), decided once and applied to the in-memory model.

A saved model stores its embedding per row in int8 (or in 16/32-bit floats), and an lm_head that was tied
to the embedding as a hidden × hidden matrix M over the same table. `apply_tables` gives the in-memory
model exactly those tables (`TableEmbedding`, `TableHead`), so what `eval` reports before saving is what
the saved model computes, and the saver writes the same codes instead of rounding the weights again.
"""

from __future__ import annotations

import torch

from ..config import QuantSpec
from ..errors import SpinQuantError
from ..models.base import ModelParts, set_module
from .modules import TableEmbedding, TableHead
from .quantizer import QuantizedTensor, quantize_weight

TABLE_STORAGE = {"int8": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TABLE_SPEC = QuantSpec(bits=8, symmetric=True)  # per row, plain min-max: a table row is one token


def tied_transform(embedding: torch.Tensor, lm_head: torch.Tensor, tol: float = 1e-5) -> torch.Tensor | None:
    """M with lm_head = embedding · M (hidden × hidden), or None when no such M fits.

    A model that was tied before quantization has lm_head = E0·diag(g)·R1 and embedding = E0·R1 (final
    norm g fused, R1 merged), so M = R1ᵀ·diag(g)·R1 exists: one table serves both, and
    logits = (x·Mᵀ)·tableᵀ. Found by least squares, so nothing about the pipeline is assumed.
    """
    if embedding.shape != lm_head.shape:
        return None
    if torch.equal(embedding, lm_head):  # still tied (no R1, norms unfused): exactly the identity
        return torch.eye(embedding.shape[1])
    e, w = embedding.detach().double(), lm_head.detach().double()
    m = torch.linalg.lstsq(e, w).solution
    rel = float((e @ m - w).norm() / w.norm().clamp(min=1e-30))
    return m.float() if rel < tol else None


def resolve_head_storage(parts: ModelParts, embedding: str, lm_head: str) -> tuple[str, torch.Tensor | None]:
    """("tied", M) when lm_head can share the embedding table, else (storage, None). "auto" prefers tied,
    else stores lm_head like the embedding. A head that `apply_tables` already built keeps its choice."""
    for what, storage, allowed in (("embedding", embedding, TABLE_STORAGE),
                                   ("lm_head", lm_head, (*TABLE_STORAGE, "tied", "auto"))):
        if storage not in allowed:
            raise SpinQuantError(f"{what} storage {storage!r} is unknown; use one of {', '.join(allowed)}")
    head = parts.lm_head
    if isinstance(head, TableHead) and lm_head in ("tied", "auto") and head.transform is not None:
        return "tied", head.transform
    if lm_head not in ("tied", "auto"):
        return lm_head, None
    m = None if isinstance(head, TableHead) else tied_transform(parts.embedding.weight, head.weight)
    if m is not None and getattr(head, "bias", None) is None:
        return "tied", m
    if lm_head == "tied":
        raise SpinQuantError("lm_head is not the embedding times a hidden x hidden matrix (the model was not "
                             "tied); save with lm_head='int8' instead")
    return embedding, None


def stored_table(weight: torch.Tensor, storage: str) -> torch.Tensor | QuantizedTensor:
    """A table as `storage` keeps it: int8 codes with a per-row scale, or the float values it rounds to."""
    if storage == "int8":
        return quantize_weight(weight.detach().float(), TABLE_SPEC)
    return weight.detach().to(TABLE_STORAGE[storage]).to(weight.dtype)


def model_storage(parts: ModelParts) -> str:
    """The storage `apply_tables` gave the model; int8 (the default) for a model it has not seen."""
    return getattr(parts.embedding, "storage", "int8")


def table_of(module: torch.nn.Module, storage: str) -> torch.Tensor | QuantizedTensor:
    """The int8 table a module already holds (`apply_tables`), else one rounded from its weight."""
    table = getattr(module, "table", None)
    if storage == "int8" and isinstance(table, QuantizedTensor):
        return table
    return stored_table(module.weight, storage)


@torch.no_grad()
def apply_tables(parts: ModelParts, storage: str) -> None:
    """Store the embedding and lm_head in `storage` in the model itself (see the module docstring)."""
    head_storage, transform = resolve_head_storage(parts, storage, "auto")  # also refuses unknown storage
    emb = parts.embedding
    table = stored_table(emb.weight, storage)
    values = table.dequantize() if isinstance(table, QuantizedTensor) else table
    new_emb = TableEmbedding(values.to(emb.weight), table if storage == "int8" else None, storage,
                             emb.padding_idx)
    set_module(parts.model, parts.adapter.embedding, new_emb)
    parts.embedding = new_emb
    bias = getattr(parts.lm_head, "bias", None)
    if head_storage == "tied":
        head = TableHead(table, transform.float(), bias)
    else:
        head = TableHead(stored_table(parts.lm_head.weight, head_storage), None, bias)
    parts.set_lm_head(head)
