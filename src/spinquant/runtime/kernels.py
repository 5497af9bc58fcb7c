"""Integer matmul and the dynamic activation quantizer the runtime linears share.

`int8_matmul` wraps `torch._int_mm` (int8 × int8 → int32 on CPU and CUDA). On CUDA it needs more than 16
rows and inner/outer sizes that are multiples of 8: decode (one row) is padded, odd sizes take an exact
fallback. `quantize_activation` reproduces `quant.quantizer.fake_quantize` bit for bit, so the integer
path sees exactly the codes the fake-quant model rounds to.
"""

from __future__ import annotations

import torch

from ..config import QuantSpec
from ..quant.quantizer import qrange

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


def quantize_activation(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [..., n] → (codes as floats, scale, zero or None), per slice of the last dim.

    The same float operations as `compute_qparams` + `quantize_codes` (so the codes match the fake
    quantizer exactly: `round_ste(x)` equals `round(x)` in value), with fewer kernel launches: one
    aminmax instead of two reductions, in-place updates where the fake path allocates.
    """
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    clip = spec.clip_ratio
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    if spec.symmetric:
        amax = torch.maximum(lo.neg_(), hi)  # = |x|.amax
        if clip != 1.0:
            amax = amax * clip
        scale = (amax / qmax).clamp_(min=_scale_floor(x))
        return torch.round(x / scale).clamp_(qmin, qmax), scale, None
    # The grid must contain 0: min clamped to ≤ 0, max to ≥ 0 (as compute_qparams does).
    lo, hi = lo.clamp_(max=0), hi.clamp_(min=0)
    if clip != 1.0:
        lo, hi = lo * clip, hi * clip
    scale = (hi - lo) / qmax
    zero = torch.round(lo.neg_() / scale.clamp(min=torch.finfo(scale.dtype).tiny))
    scale.clamp_(min=_scale_floor(x))
    q = torch.round(x / scale)
    return q.add_(zero).clamp_(qmin, qmax), scale, zero


def _scale_floor(x: torch.Tensor) -> float:
    return 1e-8 if x.dtype != torch.float16 else 1e-5


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


class HadamardPlan:
    """x @ hadamard_matrix(n) / √n as two or three small dense matmuls (Kronecker factors).

    hadamard_matrix(n) = H_K ⊗ S_p (S: Sylvester, S_{ab} = S_a ⊗ S_b), so with x viewed as [K, p1, p2]
    the transform is H_Kᵀ · (S_p1 · X · S_p2). BLAS does this 3-5x faster on CPU than the butterfly's
    log2(p) passes of small ops (measured: decode R4 0.02 vs 0.10 ms, prefill R3 0.4 vs 2.0 ms); results
    agree with `fast_hadamard_transform` to float rounding.
    """

    MAX_DENSE = 512  # largest Sylvester block kept dense (1 MiB in float32)

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        from ..hadamard import _base_on, hadamard_factors, hadamard_matrix

        self.n = n
        self.k, p = hadamard_factors(n)
        self.p2 = min(p, self.MAX_DENSE)
        self.p1 = p // self.p2
        self.s2 = (hadamard_matrix(self.p2, torch.float64) / n**0.5).to(dtype=dtype, device=device)
        self.s1 = hadamard_matrix(self.p1, torch.float64).to(dtype=dtype, device=device) if self.p1 > 1 else None
        self.base = _base_on(self.k, dtype, device) if self.k > 1 else None  # H_Kᵀ

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = x.reshape(-1, self.p2) @ self.s2
        if self.s1 is not None:
            y = torch.matmul(self.s1, y.reshape(-1, self.p1, self.p2))
        if self.base is not None:
            y = torch.matmul(self.base, y.reshape(-1, self.k, self.p1 * self.p2))
        return y.reshape(shape)


_PLANS: dict[tuple[int, torch.dtype, torch.device], HadamardPlan] = {}


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal Hadamard transform over the last dim (R3 / R4 at run time)."""
    key = (x.shape[-1], x.dtype, x.device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = HadamardPlan(*key)
    return plan(x)
