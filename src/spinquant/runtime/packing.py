"""Integer codes ↔ bytes on disk.

Codes are stored unsigned (`code - qmin`, so 0 .. 2^bits - 1). Codes of 4 bits or fewer go two per byte
along the last dimension, the even index in the low nibble; wider codes (5-8 bits) take one byte each.
"""

from __future__ import annotations

import torch

from ..errors import SpinQuantError
from ..quant.quantizer import qrange


def packs_two_per_byte(bits: int) -> bool:
    return bits <= 4


def pack_codes(codes: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """int8 codes (any shape, last dim even when bits ≤ 4) → uint8 storage."""
    qmin, qmax = qrange(bits, symmetric)
    u = codes.to(torch.int16) - qmin
    if bits == 8 and not symmetric:
        u = u % 256  # unsigned 8-bit codes that were held in int8 wrapped around: take them back
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > qmax - qmin):
        raise ValueError(f"codes out of the {bits}-bit range [{qmin}, {qmax}]")
    u = u.to(torch.uint8)
    if not packs_two_per_byte(bits):
        return u.contiguous()
    if u.shape[-1] % 2:
        raise SpinQuantError(f"cannot pack {bits}-bit codes along an odd dimension {u.shape[-1]}; "
                             "use a model whose input sizes are even")
    pairs = u.reshape(*u.shape[:-1], u.shape[-1] // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """uint8 storage → codes qmin .. qmax: int8, or int16 for unsigned 8-bit codes (which int8 cannot hold)."""
    qmin, _ = qrange(bits, symmetric)
    if packs_two_per_byte(bits):
        u = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    else:
        u = packed
    codes = u.to(torch.int16) + qmin
    return codes if bits == 8 and not symmetric else codes.to(torch.int8)


def unpack_unsigned(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 storage → unsigned codes 0 .. 2^bits - 1 as uint8 (the KV cache keeps its codes unsigned)."""
    if not packs_two_per_byte(bits):
        return packed
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_unsigned(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned uint8 codes → storage (two per byte when bits ≤ 4)."""
    if not packs_two_per_byte(bits):
        return u
    pairs = u.reshape(*u.shape[:-1], u.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def to_block32(u: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes [N, K] (K a multiple of 32) → the native kernel's bytes [N, K/2]: in each block
    of 32 codes, byte b holds code b (low nibble) and code b + 16 (high nibble), llama.cpp's Q4_0 order."""
    n, k = u.shape
    blocks = u.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def from_block32(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_block32`: unsigned codes [N, K] as uint8."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // 16, 1, 16)
    return torch.cat((blocks & 0x0F, blocks >> 4), dim=2).reshape(n, half * 2)
