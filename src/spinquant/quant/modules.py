"""The small modules spinquant inserts into a Hugging Face model.

- `QuantLinear` replaces an `nn.Linear`: optional online Hadamard on its input (R4), dynamic activation
  fake quantization, then the (already rotated, possibly quantized) weight.
- `KVQuant` sits on each attention module: Hadamard on Q and K after RoPE (R3), then K and V quantized per
  token per head. It runs inside an attention function registered with transformers' AttentionInterface
  as "spinquant", which delegates to SDPA: no Hugging Face modeling file is copied or patched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantSpec
from ..rotation.hadamard import OnlineHadamard, online_hadamard
from .quantizer import QuantizedTensor, fake_quantize, integer_order_linear

ATTN_IMPLEMENTATION = "spinquant"
__all__ = ["ActQuantizer", "KVQuant", "OnlineHadamard", "QuantLinear", "TableEmbedding", "TableHead",
           "use_spinquant_attention"]
# lm_head's input over an int8 table, per token: one spec for the in-memory TableHead and the runtime's head
HEAD_ACT = QuantSpec(bits=8, symmetric=True)


class ActQuantizer(nn.Module):
    """Dynamic per-token (or per-group) fake quantization; identity when spec.bits == 16."""

    def __init__(self, spec: QuantSpec | None = None):
        super().__init__()
        self.spec = spec or QuantSpec()
        self.ste = "clipped"  # the straight-through gradient rotation training sees (config.STE_KINDS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.spec, self.ste)

    def extra_repr(self) -> str:
        s = self.spec
        if not s.enabled:
            return "off"
        return f"bits={s.bits}, symmetric={s.symmetric}, group={s.group_size}, clip={s.clip_ratio}"


class QuantLinear(nn.Module):
    """A linear whose input may be rotated online and fake-quantized; its weight is stored dequantized."""

    def __init__(self, linear: nn.Linear, input_transform: nn.Module | None = None):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_transform = input_transform
        self.act_quant = ActQuantizer()
        self.quantized: QuantizedTensor | None = None  # integer codes, kept for packing / export

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None, bias=None) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if weight is None and self.quantized is not None and not torch.is_grad_enabled():
            # Evaluation: the same product in the integer kernels' order, so the saved model matches it.
            y = integer_order_linear(x, self.act_quant.spec, self.quantized, self.bias)
            if y is not None:
                return y
        x = self.act_quant(x)
        return F.linear(x, self.weight if weight is None else weight, self.bias if bias is None else bias)

    @classmethod
    def wrap(cls, module: nn.Module) -> QuantLinear:
        return module if isinstance(module, QuantLinear) else cls(module)


class TableEmbedding(nn.Embedding):
    """The embedding as the saved model stores it: `weight` holds the stored values (e.g. int8 codes × row
    scale, exactly what the runtime computes), `table` the codes themselves when `storage` is int8."""

    def __init__(self, weight: torch.Tensor, table: QuantizedTensor | None, storage: str,
                 padding_idx: int | None = None):
        super().__init__(*weight.shape, padding_idx=padding_idx, _weight=weight, _freeze=True)
        self.table = table
        self.storage = storage  # a TABLE_STORAGE name: what save_quantized writes by default


class TableHead(nn.Module):
    """lm_head as the saved model runs it: logits = table-product of (x · Mᵀ) when the head shares the
    embedding's table through a hidden × hidden M (`transform`), else of x. With an int8 table the input is
    quantized per token to int8 and the codes multiplied first, like the runtime's W8A8 head; with a float
    table it is a float product. `weight` gives the effective float matrix (table · M) for readers that want
    one (exporters); the table itself is not duplicated in memory.
    """

    def __init__(self, table: torch.Tensor | QuantizedTensor, transform: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.table = table  # plain attributes, like QuantLinear.quantized: not state, moved on use
        self.transform = transform
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = table.codes.shape if isinstance(table, QuantizedTensor) else table.shape

    def stored(self) -> torch.Tensor:
        """The table's values as float (int8 codes × row scale, or the float table)."""
        return self.table.dequantize() if isinstance(self.table, QuantizedTensor) else self.table

    @property
    def weight(self) -> torch.Tensor:
        w = self.stored()
        return w if self.transform is None else (w.double() @ self.transform.double()).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = F.linear(x, self.transform.to(x))
        if isinstance(self.table, QuantizedTensor):
            y = integer_order_linear(x, HEAD_ACT, self.table, self.bias)
            if y is not None:
                return y
            x = fake_quantize(x, HEAD_ACT)
        return F.linear(x, self.stored().to(x), self.bias)

    def extra_repr(self) -> str:
        kind = "int8 per-row" if isinstance(self.table, QuantizedTensor) else str(self.table.dtype)
        tied = ", tied through M" if self.transform is not None else ""
        return f"in={self.in_features}, out={self.out_features}, {kind}{tied}"


class KVQuant(nn.Module):
    """R3 (Hadamard over head_dim on Q and K) and per-token, per-head K / V fake quantization."""

    def __init__(self, head_dim: int, rotate_qk: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.rotate_qk = rotate_qk
        self.key_quant = ActQuantizer()
        self.value_quant = ActQuantizer()

    def forward(self, q, k, v):
        if self.rotate_qk:  # cancels in Q·Kᵀ, spreads K's outlier channels before the cache is quantized
            q = online_hadamard(q)
            k = online_hadamard(k)
        return q, self.key_quant(k), self.value_quant(v)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotate_qk={self.rotate_qk}"


def spinquant_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Attention function for transformers' AttentionInterface: KVQuant (if installed), then SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv = getattr(module, "kv_quant", None)
    if kv is not None:
        query, key, value = kv(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> None:
    """Make "spinquant" a valid attn_implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, spinquant_attention)
    if ATTN_IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def use_spinquant_attention(model: nn.Module) -> None:
    register_attention()
    try:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    except (ValueError, KeyError, AttributeError):
        model.config._attn_implementation = ATTN_IMPLEMENTATION
