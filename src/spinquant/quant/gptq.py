"""GPTQ: quantize a linear's weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's input (DESIGN.md §4).

The grid (scale / zero point per row or per group) comes from quantizer.py, so GPTQ and RTN share one
quantizer; with H = I no error is propagated and GPTQ gives exactly the RTN codes.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..config import QuantSpec
from ..errors import SpinQuantError
from .quantizer import QuantizedTensor, code_dtype, quantize_codes, quantize_weight, to_groups, weight_qparams


class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over a linear's input rows; batches of any size combine exactly."""

    def __init__(
        self, in_features: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
    ) -> None:
        # float64 by default: tokens number in the hundreds of thousands and float32 sums lose digits.
        self._h = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self._n = 0

    @property
    def in_features(self) -> int:
        return self._h.shape[0]

    @property
    def n_samples(self) -> int:
        return self._n

    @property
    def hessian(self) -> torch.Tensor:
        return self._h

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add activations of shape [..., in_features] (leading dims are flattened into samples)."""
        if x.shape[-1] != self.in_features:
            raise SpinQuantError(
                f"Hessian accumulator expects inputs with {self.in_features} features, got shape "
                f"{tuple(x.shape)}; hook the linear whose in_features is {x.shape[-1]}"
            )
        x = x.detach().reshape(-1, self.in_features).to(device=self._h.device, dtype=self._h.dtype)
        m = x.shape[0]
        if m == 0:
            return
        total = self._n + m
        # Rescale the old average instead of keeping a raw sum, so H stays O(1) in magnitude.
        self._h.mul_(self._n / total)
        x = x * (2.0 / total) ** 0.5
        self._h.addmm_(x.T, x)
        self._n = total


class CrossAccumulator:
    """Running C = 2/n Σ x̃ xᵀ between a reference input x̃ (the float model's) and the input x the quantized
    layer sees, scaled like HessianAccumulator's H so the two combine in `float_target_weight`."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self._c = torch.zeros(in_features, in_features, device=device, dtype=torch.float64)
        self._n = 0

    @property
    def cross(self) -> torch.Tensor:
        return self._c

    @torch.no_grad()
    def add(self, x_ref: torch.Tensor, x: torch.Tensor) -> None:
        if x_ref.shape != x.shape:
            raise SpinQuantError(
                f"reference input {tuple(x_ref.shape)} and quantized-model input {tuple(x.shape)} differ in "
                "shape; both must come from the same calibration sample"
            )
        n = self._c.shape[0]
        x_ref = x_ref.detach().reshape(-1, n).to(self._c)
        x = x.detach().reshape(-1, n).to(self._c)
        total = self._n + x.shape[0]
        if x.shape[0] == 0:
            return
        self._c.mul_(self._n / total).addmm_(x_ref.T, x, alpha=2.0 / total)
        self._n = total


@torch.no_grad()
def float_target_weight(
    weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp: float = 0.01
) -> torch.Tensor:
    """W* = W C (H + λI)⁻¹: the weight whose output on the quantized model's inputs X best matches the float
    model's output W X̃ (least squares). ‖W X̃ − Q X‖² = ‖W* X − Q X‖² + const, so GPTQ on W* with H fits
    each layer to the float model instead of to itself on already-degraded inputs (asymmetric calibration,
    as in GPTAQ). λ is GPTQ's damping, so W* = W when X̃ = X up to that damping.
    """
    h = hessian.to(weight.device, torch.float64)
    damped = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    rhs = weight.double() @ cross.to(weight.device, torch.float64)  # [out, in] = W C
    try:
        # (W C) (H+λI)⁻¹ = solve((H+λI)ᵀ, (W C)ᵀ)ᵀ; H+λI is symmetric positive definite.
        target = torch.cholesky_solve(rhs.T, torch.linalg.cholesky(damped)).T
    except torch.linalg.LinAlgError:
        warnings.warn("GPTQ float target: the Hessian is not positive definite; fitting the layer to itself",
                      stacklevel=2)
        return weight
    if not torch.isfinite(target).all():
        return weight
    return target.to(weight.dtype)


def hessian_hook(module: nn.Module, accumulator: HessianAccumulator) -> torch.utils.hooks.RemovableHandle:
    """Feed `module`'s first positional input (as the module receives it) to `accumulator`; returns the
    handle, call `.remove()` when calibration is done."""

    def _pre_hook(_mod: nn.Module, args: tuple) -> None:
        if args:
            accumulator.add(args[0])

    return module.register_forward_pre_hook(_pre_hook)


def _inverse_hessian_factor(h: torch.Tensor, damp: float, retries: int = 3) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp·mean(diag H); λ grows ×10 on failure.

    Returns None when every attempt fails (indefinite or non-finite H)."""
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(retries + 1):
        hd = h + (damp * 10**attempt) * mean_diag * eye
        try:
            lower = torch.linalg.cholesky(hd)
            u = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            continue
        if torch.isfinite(u).all():
            return u
    return None


def _rtn_fallback(weight: torch.Tensor, spec: QuantSpec, why: str) -> QuantizedTensor:
    warnings.warn(f"GPTQ: {why}; falling back to round-to-nearest for this layer", stacklevel=3)
    return quantize_weight(weight, spec)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QuantizedTensor:
    """Quantize weight [out, in] with GPTQ given the input Hessian [in, in].

    Codes come back in the original column order; `dequantize()` gives the GPTQ weight. With groups and
    act_order, group parameters are fixed up front from the original weight ("static groups") so that a
    group is still a run of consecutive original columns. `grid` = (scale, zero), shaped like a
    QuantizedTensor's, fixes the grid instead of deriving it from the weight (see `refit_gptq`).
    """
    if weight.dim() != 2:
        raise SpinQuantError(f"GPTQ quantizes 2-D weights, got shape {tuple(weight.shape)}")
    n_out, n_in = weight.shape
    if hessian.shape != (n_in, n_in):
        raise SpinQuantError(
            f"GPTQ Hessian has shape {tuple(hessian.shape)} but the weight has {n_in} input columns; "
            f"collect the Hessian from this layer's input"
        )
    if not spec.enabled:
        raise SpinQuantError(
            "GPTQ needs weight bits below 16; use 16 bits without GPTQ to keep weights float"
        )
    if block_size <= 0:
        raise SpinQuantError(f"GPTQ block size {block_size} must be positive, e.g. 128")
    if not torch.isfinite(weight).all():
        raise SpinQuantError(
            "GPTQ got a weight with NaN or inf entries; check the checkpoint or the rotation"
        )
    group_size = None if spec.group_size in (None, n_in) else spec.group_size
    to_groups(weight[:1], group_size)  # raises a clear error when the group size does not divide `in`

    device = weight.device
    w = weight.detach().float().clone()
    h = hessian.detach().to(device=device, dtype=torch.float64).clone()
    if not torch.isfinite(h).all():
        return _rtn_fallback(weight, spec, "the Hessian has NaN or inf entries")

    # Columns that never saw a nonzero input do not affect the output: zero them (so they take no grid
    # range) and give them a unit diagonal so H stays invertible.
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    # Per-channel and static-group parameters come from the whole (un-updated) weight, exactly as RTN.
    static = group_size is None or act_order or grid is not None
    if grid is not None:
        scale_all, zero_all = (t.detach().float().to(device).unsqueeze(-1).clone() for t in grid)
    elif static:
        scale_all, zero_all = weight_qparams(to_groups(w, group_size), spec)  # [out, 1] or [out, ng, 1]
    else:
        n_groups = n_in // group_size
        scale_all = torch.empty(n_out, n_groups, 1, device=device)
        zero_all = torch.empty(n_out, n_groups, 1, device=device)

    perm = None
    orig_cols = list(range(n_in))
    if act_order:
        # Quantize high-activation columns first, while most columns are still free to absorb error.
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
        orig_cols = perm.tolist()  # one host copy, not a device sync per column

    u64 = _inverse_hessian_factor(h, damp)
    if u64 is None:
        return _rtn_fallback(weight, spec, "the Hessian is not positive definite even after extra damping")
    u = u64.float()
    del h, u64

    codes = torch.zeros_like(w)
    for b1 in range(0, n_in, block_size):
        b2 = min(b1 + block_size, n_in)
        w1 = w[:, b1:b2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[b1:b2, b1:b2]
        for i in range(b2 - b1):
            col = b1 + i
            if group_size is None:
                s, z = scale_all, zero_all
            elif static:
                g = orig_cols[col] // group_size
                s, z = scale_all[:, g], zero_all[:, g]
            else:
                g = col // group_size
                if col % group_size == 0:
                    # New group: parameters from its columns as they are now, including the error pushed
                    # onto them so far (in-block updates live in w1, this block's lazy update is pending).
                    end = col + group_size
                    cur = w1[:, i : min(end, b2) - b1]
                    if end > b2:
                        rest = w[:, b2:end] - err1[:, :i] @ u[b1:col, b2:end]
                        cur = torch.cat([cur, rest], dim=1)
                    scale_all[:, g], zero_all[:, g] = weight_qparams(cur, spec)
                s, z = scale_all[:, g], zero_all[:, g]
            col_w = w1[:, i : i + 1]
            q_codes = quantize_codes(col_w, s, z, spec.bits, spec.symmetric)
            codes[:, col : col + 1] = q_codes
            err = (col_w - (q_codes - z) * s) / u1[i, i]
            # Spread this column's error over the rest of the block (row i of U, right of the diagonal).
            w1[:, i + 1 :] -= err @ u1[i : i + 1, i + 1 :]
            err1[:, i : i + 1] = err
        # Lazy batch update: the whole block's error reaches the later columns in one matmul.
        w[:, b2:] -= err1 @ u[b1:b2, b2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    if not (torch.isfinite(scale_all).all() and torch.isfinite(zero_all).all()):
        return _rtn_fallback(weight, spec, "the quantization parameters became non-finite")
    return QuantizedTensor(
        codes=codes.to(code_dtype(spec.symmetric)),
        scale=scale_all.squeeze(-1),
        zero=zero_all.squeeze(-1),
        bits=spec.bits,
        symmetric=spec.symmetric,
        group_size=group_size,
    )


@torch.no_grad()
def hessian_error(weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per row, (w − q)ᵀ H (w − q): the output error GPTQ minimises, without materialising the inputs."""
    d = weight.double() - qweight.to(weight.device).double()
    return ((d @ hessian.to(d.device, torch.float64)) * d).sum(-1)


@torch.no_grad()
def refit_scales(weight: torch.Tensor, qt: QuantizedTensor, hessian: torch.Tensor) -> QuantizedTensor:
    """For fixed integer codes, the scales that minimise the output error (w − ŵ)ᵀ H (w − ŵ) row by row.

    The grid GPTQ starts from is fit to the weight alone (clip search); once GPTQ has chosen its codes, the
    best scale for them is a small least-squares problem in the H metric: one unknown per row, or one per
    group (a [groups × groups] system per row). Zero points stay as they are. A row keeps its old scales
    where the new ones would not be positive and finite (e.g. a row of zero codes).
    """
    n_out = weight.shape[0]
    h = hessian.to(weight.device, torch.float64)
    centered = to_groups(qt.codes.double(), qt.group_size) - qt.zero.double().unsqueeze(-1)
    centered = centered.reshape(n_out, -1, centered.shape[-1])  # [out, ng, gs] (ng = 1 per channel)
    ng, gs = centered.shape[1:]
    target = weight.double() @ h  # [out, in]: row r is (H w_r)ᵀ
    new_scale = torch.empty(n_out, ng, dtype=torch.float64, device=weight.device)
    h_blocks = h.reshape(ng, gs, ng, gs)
    for r0 in range(0, n_out, 256):  # rows in chunks: the [rows, ng, gs, ng] product grows with ng
        c = centered[r0 : r0 + 256]
        hc = torch.einsum("gihj,rhj->rgih", h_blocks, c)  # H q̃ split by the group it lands in
        a = torch.einsum("rgi,rgih->rgh", c, hc)
        b = (c * target[r0 : r0 + 256].reshape(-1, ng, gs)).sum(-1)
        eye = torch.eye(ng, dtype=a.dtype, device=a.device)
        # A tiny ridge keeps rows whose codes vanish in some group solvable; those rows are reverted below.
        ridge = 1e-12 * a.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp(min=1e-30)
        new_scale[r0 : r0 + 256] = torch.linalg.solve(a + ridge[:, None, None] * eye, b)
    old = qt.scale.double().reshape(n_out, ng)
    ok = (torch.isfinite(new_scale) & (new_scale > 0)).all(-1, keepdim=True)
    scale = torch.where(ok, new_scale, old).reshape(qt.scale.shape).to(qt.scale.dtype)
    return replace(qt, scale=scale)


@torch.no_grad()
def refit_gptq(
    weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, rounds: int = 1, **gptq: Any
) -> QuantizedTensor:
    """GPTQ, then `rounds` times: refit the scales to the codes (`refit_scales`), and rerun GPTQ on that
    grid. Every candidate is scored by its output error in the undamped H; the best one is returned, so
    the result is never worse than plain GPTQ's. rounds = 0 is plain GPTQ.
    """
    best = gptq_quantize(weight, hessian, spec, **gptq)
    if rounds <= 0:
        return best
    best_err = hessian_error(weight, best.dequantize(), hessian).sum()
    current = best
    for _ in range(rounds):
        candidates = [refit_scales(weight, current, hessian)]
        candidates.append(gptq_quantize(weight, hessian, spec, grid=(candidates[0].scale, candidates[0].zero), **gptq))
        candidates.append(refit_scales(weight, candidates[1], hessian))
        current = candidates[-1]
        for cand in candidates:
            err = hessian_error(weight, cand.dequantize(), hessian).sum()
            if err < best_err:
                best, best_err = cand, err
    return best


@torch.no_grad()
def gptq_error(weight: torch.Tensor, qweight: torch.Tensor | QuantizedTensor, x: torch.Tensor) -> float:
    """Squared output error ‖X Wᵀ − X Q(W)ᵀ‖_F² on inputs x [..., in] (the quantity GPTQ minimises)."""
    if isinstance(qweight, QuantizedTensor):
        qweight = qweight.dequantize()
    x = x.reshape(-1, weight.shape[1]).double()
    diff = weight.double() - qweight.to(weight.device).double()
    return float((x @ diff.T).pow(2).sum())
