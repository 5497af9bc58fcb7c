"""Uniform fake quantization with straight-through gradients, and the weight clip search.

Every quantizer works on the last dimension: a row of a weight matrix (per output channel), a token of an
activation, or one head of one token in the K/V cache. Groups split that last dimension into equal chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import native
from ..config import STE_KINDS, QuantSpec
from ..errors import SpinQuantError


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: signed for symmetric grids, unsigned for asymmetric ones."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def to_groups(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View the last dimension as (n_groups, group_size) so reductions over -1 are per group."""
    if group_size is None or group_size == x.shape[-1]:
        return x
    if x.shape[-1] % group_size:
        raise SpinQuantError(
            f"group size {group_size} does not divide dimension {x.shape[-1]}; "
            f"choose a divisor of {x.shape[-1]} or omit the group size"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def compute_qparams(
    x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float | torch.Tensor = 1.0, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per slice of the last dim (keepdim). Computed without gradient.

    full_range (symmetric grids): the slice's largest-magnitude value maps to the grid's negative end
    -2^(b-1), with a scale of that value's sign, so all 2^b levels are used (llama.cpp's Q4_0 / Q5_0 grid):
    a step 8/7 finer at 4 bits than amax / 7, at the cost of clipping the other side at +2^(b-1) - 1.
    """
    x = x.detach()
    qmin, qmax = qrange(bits, symmetric)
    if symmetric and full_range:
        extreme = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)) * clip_ratio
        scale = extreme / qmin
        floor = _scale_floor(x)
        return torch.where(scale.abs() < floor, torch.full_like(scale, floor), scale), torch.zeros_like(scale)
    if symmetric:
        amax = x.abs().amax(dim=-1, keepdim=True) * clip_ratio
        scale = amax / qmax
        zero = torch.zeros_like(scale)
    else:
        # The grid must contain 0 so that zeros (padding, ReLU outputs) stay exact.
        xmin = x.amin(dim=-1, keepdim=True).clamp(max=0) * clip_ratio
        xmax = x.amax(dim=-1, keepdim=True).clamp(min=0) * clip_ratio
        scale = (xmax - xmin) / qmax
        zero = torch.round(-xmin / scale.clamp(min=torch.finfo(scale.dtype).tiny))
    scale = scale.clamp(min=1e-8 if x.dtype != torch.float16 else 1e-5)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale, zero, bits: int, symmetric: bool, ste: str = "clipped") -> torch.Tensor:
    """Integer codes (as floats) on the grid, with a straight-through gradient for the rounding.

    ste "clipped": values the grid clips get no gradient (the clamp's own); "identity": every value passes
    its gradient straight through, clipped or not (the reference SpinQuant code). Same forward values.
    """
    qmin, qmax = qrange(bits, symmetric)
    if ste not in STE_KINDS:
        raise ValueError(f"straight-through estimator {ste!r} is unknown; use one of {STE_KINDS}")
    if ste == "identity":
        y = x / scale + zero
        return torch.clamp(torch.round(y.detach()), qmin, qmax) + (y - y.detach())  # + exactly 0 going forward
    return torch.clamp(round_ste(x / scale) + zero, qmin, qmax)


def fake_quant(x: torch.Tensor, scale, zero, bits: int, symmetric: bool, ste: str = "clipped") -> torch.Tensor:
    return (quantize_codes(x, scale, zero, bits, symmetric, ste) - zero) * scale


def fake_quantize(x: torch.Tensor, spec: QuantSpec, ste: str = "clipped") -> torch.Tensor:
    """Dynamic quantize-dequantize with a fixed clip ratio (activations, K, V)."""
    if not spec.enabled:
        return x
    g = to_groups(x, spec.group_size)
    scale, zero = compute_qparams(g, spec.bits, spec.symmetric, spec.clip_ratio)
    return fake_quant(g, scale, zero, spec.bits, spec.symmetric, ste).reshape(x.shape)


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


def search_clip_ratio(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    full_range: bool = False,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per slice, the range shrink in [1 - max_shrink, 1] minimising sum |Q(w) - w|^norm ([..., 1]).

    The 2.4 norm (GPTQ's choice) weighs large errors a little more than L2, which suits the outliers
    that rotations leave behind. `importance` (broadcastable to w) weighs each value's error, e.g. by its
    input channel's mean squared activation (the Hessian diagonal; llama.cpp's importance matrix): without
    it the search clips a weight that meets an outlier channel as readily as any other. With importance the
    error is the weighted squared one (what the importance approximates: the output's squared error) and
    each candidate's scale is refitted by weighted least squares on its codes; the returned ratio is then
    that scale's (it may exceed 1).
    """
    w = w.detach()
    rows = w.reshape(-1, w.shape[-1])
    imp = None if importance is None else importance.detach().to(w.dtype).expand_as(w).reshape(rows.shape)
    if imp is not None:
        norm = 2.0
    if imp is None and w.device.type == "cpu" and w.dtype == torch.float32 and (kern := native.kernels()) is not None:
        # One native pass per row (native/clip_search.cpp): ~7x faster than the tensor ops below, the same
        # choice but where two grid points' errors tie to float rounding. (The weighted search, used by GPTQ
        # one group at a time, stays in tensor ops.)
        return kern.clip_search(rows.contiguous(), bits, symmetric, grid, max_shrink, norm, full_range).reshape(
            *w.shape[:-1], 1)
    step = max(1, CLIP_SEARCH_CHUNK // rows.shape[-1])
    if w.device.type == "cpu" and len(rows) > step:
        # Each slice's search is independent: a chunk of rows at a time keeps the ~10 temporaries of every
        # grid point in cache (3.4x faster on a 1536 x 576 weight here, bit-identical results).
        parts = [_search_clip_ratio(rows[i:i + step], bits, symmetric, grid, max_shrink, norm, full_range,
                                    None if imp is None else imp[i:i + step])
                 for i in range(0, len(rows), step)]
        return torch.cat(parts).reshape(*w.shape[:-1], 1)
    return _search_clip_ratio(w, bits, symmetric, grid, max_shrink, norm, full_range,
                              None if imp is None else imp.reshape(w.shape))


CLIP_SEARCH_CHUNK = 1 << 17  # elements per chunk of the clip search (512 KiB in float32; measured best of 2^13-2^19)


def _search_clip_ratio(w: torch.Tensor, bits: int, symmetric: bool, grid: int, max_shrink: float,
                       norm: float, full_range: bool = False, importance: torch.Tensor | None = None) -> torch.Tensor:
    best_err = torch.full(w.shape[:-1] + (1,), float("inf"), device=w.device, dtype=w.dtype)
    best_ratio = torch.ones_like(best_err)
    for i in range(int(max_shrink * grid)):
        ratio = 1.0 - i / grid
        scale, zero = compute_qparams(w, bits, symmetric, ratio, full_range)
        if importance is not None and symmetric:
            # Weighted least-squares scale for these codes, as llama.cpp's imatrix quantizers refit theirs.
            codes = quantize_codes(w, scale, zero, bits, symmetric)
            weighted = codes * importance
            num, den = (weighted * w).sum(-1, keepdim=True), (weighted * codes).sum(-1, keepdim=True)
            fitted = torch.where((den > 0) & (num * scale > 0), num / den.clamp(min=1e-30), scale)
            ratio = ratio * fitted / scale
            scale, zero = compute_qparams(w, bits, symmetric, ratio, full_range)
        err = (fake_quant(w, scale, zero, bits, symmetric) - w).abs().pow(norm)
        err = (err if importance is None else err * importance).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, ratio, best_ratio)  # ratio: a float, or per slice once refitted
    return best_ratio


def search_clip(w: torch.Tensor, bits: int, symmetric: bool, full_range: bool = False,
                **search) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point at the clip-searched range shrink of each slice."""
    ratio = search_clip_ratio(w, bits, symmetric, full_range=full_range, **search)
    return compute_qparams(w, bits, symmetric, ratio, full_range)


def weight_qparams(w: torch.Tensor, spec: QuantSpec,
                   importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for a weight (rows or groups along the last dim), clip-searched if asked, with each
    value's error weighted by `importance` (broadcastable to w) when given."""
    if spec.clip_search:
        return search_clip(w, spec.bits, spec.symmetric, spec.full_range, importance=importance)
    return compute_qparams(w, spec.bits, spec.symmetric, spec.clip_ratio, spec.full_range)


def code_dtype(symmetric: bool) -> torch.dtype:
    """Signed grids fit int8; unsigned 8-bit grids (0..255) need uint8."""
    return torch.int8 if symmetric else torch.uint8


@dataclass
class QuantizedTensor:
    """Integer codes with their scale and zero point; `dequantize()` gives back floats."""

    codes: torch.Tensor  # int8 (symmetric) or uint8 (asymmetric), shape of the original tensor
    scale: torch.Tensor  # [..., n_groups] (float)
    zero: torch.Tensor  # [..., n_groups] (float holding integers)
    bits: int
    symmetric: bool
    group_size: int | None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scale, self.zero, self.group_size, dtype)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return replace(self, codes=self.codes.to(device), scale=self.scale.to(device), zero=self.zero.to(device))


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int | None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes - zero) · scale per row, or per group of `group_size` along the last dim, in float32, then
    `dtype`: the one dequantizer (fake-quant weights, the runtime's weight-only modules, exports). Scale and
    zero hold one value per row or group, in any shape with that many elements ([N], [N, 1], [N, G])."""
    g = to_groups(codes.float(), group_size)
    per = (*g.shape[:-1], 1) if g.dim() > codes.dim() else (*codes.shape[:-1], 1)
    z = zero.float().reshape(per) if zero is not None else 0.0
    return ((g - z) * scale.float().reshape(per)).reshape(codes.shape).to(dtype)


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Round-to-nearest weight quantization (per output channel or per group)."""
    g = to_groups(w.float(), spec.group_size)
    scale, zero = weight_qparams(g, spec)
    codes = quantize_codes(g, scale, zero, spec.bits, spec.symmetric)
    return QuantizedTensor(
        codes=codes.reshape(w.shape).to(code_dtype(spec.symmetric)),
        scale=scale.squeeze(-1),
        zero=zero.squeeze(-1),
        bits=spec.bits,
        symmetric=spec.symmetric,
        group_size=spec.group_size if spec.group_size != w.shape[-1] else None,
    )


def fake_quantize_weight(w: torch.Tensor, spec: QuantSpec, clip_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize a weight; differentiable (STE) so rotation training can pass through it.

    `clip_ratio` ([..., n_groups, 1] or [rows, 1]) fixes each slice's range shrink, e.g. one found by an
    earlier clip search, so a training step does not repeat the search.
    """
    if not spec.enabled:
        return w
    g = to_groups(w, spec.group_size)
    if clip_ratio is not None:
        scale, zero = compute_qparams(g, spec.bits, spec.symmetric, clip_ratio, spec.full_range)
    else:
        scale, zero = weight_qparams(g, spec)
    return fake_quant(g, scale, zero, spec.bits, spec.symmetric).reshape(w.shape)


def integer_order_linear(x: torch.Tensor, act: QuantSpec, w: QuantizedTensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """Q(x) · Q(W)ᵀ (+ b) with integer codes multiplied first and the scales applied after, the order of
    the runtime's int8 kernels; None where this layout is not covered (groups, float activations).

    The value is the fake-quant product's; only the float rounding differs, and that matters: at W4A4 a
    1e-7 relative change moves a small model's perplexity by percents (benchmarks/RESULTS.md, "Tried and dropped"), so the
    in-memory model evaluates in this order to report what the saved model computes. The code products are
    summed exactly: in float32 while every sum stays below 2^24, else in float64.
    """
    k = x.shape[-1]
    if (not act.enabled or act.group_size not in (None, k) or w.group_size not in (None, k)
            or x.dtype != torch.float32):
        return None
    q, sx, zx = quantize_activation(x.reshape(-1, k), act)
    if zx is not None:
        q = q.sub_(zx)
    wq = w.codes.to(device=x.device, dtype=torch.float32)  # codes may live on the CPU (--offload)
    if not w.symmetric:
        wq = wq.sub_(w.zero.reshape(-1, 1).to(device=x.device, dtype=torch.float32))
    largest_sum = k * _max_centered_code(act.bits, act.symmetric) * _max_centered_code(w.bits, w.symmetric)
    exact = torch.float32 if largest_sum < 2**24 else torch.float64
    acc = (q.to(exact) @ wq.to(exact).T).to(torch.float32)
    y = acc.mul_(sx).mul_(w.scale.reshape(-1).to(device=x.device, dtype=torch.float32))
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], -1)


def _max_centered_code(bits: int, symmetric: bool) -> int:
    """The largest |code - zero| on a grid: the negative end of a signed one, the full span of an unsigned one."""
    qmin, qmax = qrange(bits, symmetric)
    return -qmin if symmetric else qmax - qmin
