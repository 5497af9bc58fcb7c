"""Integer matmul and the code centring the runtime linears share.

`int8_matmul` wraps `torch._int_mm` (int8 × int8 → int32 on CPU and CUDA). On CUDA it needs more than 16
rows and inner/outer sizes that are multiples of 8: decode (one row) is padded, odd sizes take an exact
fallback. Activations are quantized by `quant.quantizer.quantize_activation`, the fake-quant model's own
codes.
"""

from __future__ import annotations

import torch

from ..config import QuantSpec

CUDA_MIN_ROWS = 17  # torch._int_mm on CUDA: self.size(0) > 16
_EXACT_CHUNK = 512  # |a·b| ≤ 2^14 for int8, so 512 products sum to < 2^24: exact in float32


def _exact_float_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 @ int8 → int32 through float32 matmuls over chunks of K small enough to stay exact."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    for k in range(0, a.shape[1], _EXACT_CHUNK):
        part = a[:, k:k + _EXACT_CHUNK].float() @ b[k:k + _EXACT_CHUNK].float()
        out += part.round().to(torch.int32)
    return out


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [K, N] int8 → [M, N] int32, exact. Pass b as `w.t()` of a row-major [N, K] weight."""
    if a.device.type == "cuda":
        m, k = a.shape
        if k % 8 or b.shape[1] % 8:
            return _exact_float_mm(a, b)
        if m < CUDA_MIN_ROWS:
            # Padding rows is cheaper than any fallback: a decode step costs the same as a 17-row GEMM.
            padded = torch.zeros(CUDA_MIN_ROWS, k, dtype=a.dtype, device=a.device)
            padded[:m] = a
            return torch._int_mm(padded, b)[:m]
    return torch._int_mm(a.contiguous(), b)


def centered_codes(q: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes minus their zero point as int8, plus the per-slice offset still owed (or None). Consumes q.

    Symmetric codes already fit int8. Asymmetric codes of ≤ 7 bits minus their zero lie in [-127, 127].
    Unsigned 8-bit codes minus their zero do not fit int8: they are shifted by 128 instead, and the
    caller adds (128 - zero) · Σ_k w back, which keeps the result exact.
    """
    if zero is None:
        return q.to(torch.int8), None
    if spec.bits < 8:
        return q.sub_(zero).to(torch.int8), None
    return q.sub_(128).to(torch.int8), zero.neg().add_(128)
