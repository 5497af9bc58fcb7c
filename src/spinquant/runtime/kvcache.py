"""A transformers `Cache` whose K and V live as integer codes (packed two per byte at ≤ 4 bits).

Per token and per head (the group is head_dim), as in fake quantization. R3: keys are Hadamard-rotated
before they are quantized; the attention function rotates the queries (the two cancel in Q·Kᵀ). Reads
dequantize the whole prefix with the fake quantizer's formula, so attention sees bit-identical K and V.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .. import native
from ..config import QuantSpec
from ..quant.quantizer import qrange, quantize_activation
from ..rotation.hadamard import online_hadamard as hadamard
from .packing import pack_unsigned, packs_two_per_byte, unpack_unsigned


def _quantize(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unsigned codes (code - qmin, uint8), scale and zero (float, asymmetric only) per head vector: one
    native call on the CPU (same codes as the fake quantizer), else the PyTorch formula."""
    kern = native.kernels() if x.device.type == "cpu" and x.dtype == torch.float32 and spec.bits <= 8 else None
    if kern is not None:
        d = x.shape[-1]
        u, offset, scale = kern.quantize_rows(x.reshape(-1, d).contiguous(), spec.bits, spec.symmetric,
                                              spec.clip_ratio, d)
        lead = x.shape[:-1]
        zero = None if spec.symmetric else offset.to(torch.float32).reshape(*lead, 1)
        return u.reshape(x.shape), scale.reshape(*lead, 1), zero
    q, scale, zero = quantize_activation(x, spec)
    qmin, _ = qrange(spec.bits, spec.symmetric)
    return (q.sub_(qmin) if qmin else q).to(torch.uint8), scale, zero


class CodeStore:
    """[batch, heads, time, head_dim] vectors, stored quantized (or as floats when spec.bits == 16).

    Buffers grow by doubling so that appending one token is amortised O(1) instead of a full copy.
    """

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.length = 0
        self.data: torch.Tensor | None = None  # codes (uint8) or floats
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None

    def _grow(self, needed: int) -> None:
        cap = 0 if self.data is None else self.data.shape[2]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, 16)
        for name in ("data", "scale", "zero"):
            old = getattr(self, name)
            if old is None:
                continue
            grown = old.new_zeros(*old.shape[:2], new_cap, old.shape[3])
            grown[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, grown)

    def append(self, x: torch.Tensor) -> None:
        b, h, t, _ = x.shape
        spec = self.spec
        if not spec.enabled:
            new = {"data": x}
        else:
            u, scale, zero = _quantize(x, spec)
            new = {"data": pack_unsigned(u, spec.bits), "scale": scale}
            if zero is not None:
                new["zero"] = zero  # kept in float: saves a conversion on every read
        if self.data is None:
            for name, value in new.items():
                setattr(self, name, value.new_zeros(b, h, 0, value.shape[3]))
        self._grow(self.length + t)
        for name, value in new.items():
            getattr(self, name)[:, :, self.length: self.length + t] = value
        self.length += t

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        n = self.length
        if not self.spec.enabled:
            return self.data[:, :, :n]
        q = unpack_unsigned(self.data[:, :, :n], self.spec.bits).to(torch.float32)
        qmin, _ = qrange(self.spec.bits, self.spec.symmetric)
        # (code - zero) · scale exactly as the fake quantizer; code = u + qmin is exact in float.
        if qmin:
            q.add_(qmin)
        if self.zero is not None:
            q.sub_(self.zero[:, :, :n])
        q.mul_(self.scale[:, :, :n])
        return q if q.dtype == dtype else q.to(dtype)

    def nbytes(self) -> int:
        """Bytes held for the stored tokens (not the spare capacity)."""
        total = 0
        for t in (self.data, self.scale, self.zero):
            if t is not None:
                total += t[:, :, : self.length].numel() * t.element_size()
        return total

    def map_batch(self, fn) -> None:
        for name in ("data", "scale", "zero"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def crop(self, length: int) -> None:
        self.length = max(0, min(self.length, length))


class QuantKVLayer(DynamicLayer):
    """One layer's cache: quantize K (after R3) and V on the way in, dequantize on the way out."""

    def __init__(self, key: QuantSpec, value: QuantSpec, rotate_keys: bool):
        super().__init__()
        self.key_spec, self.value_spec, self.rotate_keys = key, value, rotate_keys
        self._k: CodeStore | None = None
        self._v: CodeStore | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self._k, self._v = CodeStore(self.key_spec), CodeStore(self.value_spec)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.rotate_keys:
            key_states = hadamard(key_states)
        if packs_two_per_byte(self.key_spec.bits) and key_states.shape[-1] % 2:
            raise ValueError("head_dim must be even to pack 4-bit K/V codes")
        self._k.append(key_states)
        self._v.append(value_states)
        return self._k.read(key_states.dtype), self._v.read(value_states.dtype)

    def get_seq_length(self) -> int:
        return self._k.length if self.is_initialized else 0

    @property
    def batch_size(self) -> int:
        return self._k.data.shape[0] if self.is_initialized and self._k.data is not None else -1

    def reset(self) -> None:
        self._k = self._v = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        if self.is_initialized and tokens_to_remove:
            for store in (self._k, self._v):
                store.crop(store.length + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            for store in (self._k, self._v):
                store.map_batch(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for store in (self._k, self._v):
                store.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:  # the quantized cache is already small; keep it where it is
        pass

    def prefetch(self) -> None:
        pass

    def nbytes(self) -> int:
        return (self._k.nbytes() + self._v.nbytes()) if self.is_initialized else 0


class QuantKVCache(Cache):
    """One `QuantKVLayer` per decoder layer."""

    def __init__(self, num_layers: int, key: QuantSpec, value: QuantSpec, rotate_keys: bool):
        super().__init__(layers=[QuantKVLayer(key, value, rotate_keys) for _ in range(num_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
