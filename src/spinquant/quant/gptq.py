"""GPTQ: quantize a linear's weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's input (DESIGN.md §4).

The grid (scale / zero point per row or per group) comes from quantizer.py, so GPTQ and RTN share one
quantizer; with H = I no error is propagated and GPTQ gives exactly the RTN codes.
"""

from __future__ import annotations

import warnings

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
        # Input-aware pairs only (`add(x, exact=...)`): Σ x x̃ᵀ and Σ x xᵀ of the float inputs.
        self._c: torch.Tensor | None = None
        self._he: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self._h.shape[0]

    @property
    def n_samples(self) -> int:
        return self._n

    @property
    def hessian(self) -> torch.Tensor:
        return self._h

    @property
    def cross(self) -> torch.Tensor | None:
        """2/n Σ x x̃ᵀ of the pairs given to `add` (None when none was): the float input against the
        quantized one the weight will really multiply."""
        return self._c

    @property
    def exact_hessian(self) -> torch.Tensor | None:
        """2/n Σ x xᵀ of the float inputs of the pairs given to `add` (None when none was)."""
        return self._he

    @torch.no_grad()
    def add(self, x: torch.Tensor, exact: torch.Tensor | None = None) -> None:
        """Add activations of shape [..., in_features] (leading dims are flattened into samples). With
        `exact` (the same inputs before activation quantization, x being the quantized ones), also
        accumulate the cross term for input-aware GPTQ (`gptq_quantize(cross=...)`)."""
        for t in (x,) if exact is None else (x, exact):
            if t.shape[-1] != self.in_features:
                raise SpinQuantError(
                    f"Hessian accumulator expects inputs with {self.in_features} features, got shape "
                    f"{tuple(t.shape)}; hook the linear whose in_features is {t.shape[-1]}"
                )
        x = x.detach().reshape(-1, self.in_features).to(device=self._h.device, dtype=self._h.dtype)
        m = x.shape[0]
        if m == 0:
            return
        total = self._n + m
        # Rescale the old averages instead of keeping raw sums, so they stay O(1) in magnitude.
        keep, root = self._n / total, (2.0 / total) ** 0.5
        x = x * root
        self._h.mul_(keep).addmm_(x.T, x)
        if exact is not None:
            e = exact.detach().reshape(-1, self.in_features).to(device=self._h.device, dtype=self._h.dtype) * root
            if self._c is None:
                self._c, self._he = torch.zeros_like(self._h), torch.zeros_like(self._h)
            self._c.mul_(keep).addmm_(e.T, x)
            self._he.mul_(keep).addmm_(e.T, e)
        self._n = total


def hessian_hook(module: nn.Module, accumulator: HessianAccumulator) -> torch.utils.hooks.RemovableHandle:
    """Feed `module`'s first positional input (as the module receives it) to `accumulator`; returns the
    handle, call `.remove()` when calibration is done."""

    def _pre_hook(_mod: nn.Module, args: tuple) -> None:
        if args:
            accumulator.add(args[0])

    return module.register_forward_pre_hook(_pre_hook)


FIT_DAMP = 1e-6  # relative ridge of the input-aware fit (only to keep a rank-deficient H solvable)


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
    weighted_clip: bool = False,
    cross: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize weight [out, in] with GPTQ given the input Hessian [in, in].

    Codes come back in the original column order; `dequantize()` gives the GPTQ weight. With groups and
    act_order, group parameters are fixed up front from the original weight ("static groups") so that a
    group is still a run of consecutive original columns. weighted_clip: the clip search of each row or group
    weighs a column's error by its Hessian diagonal (the input's mean square, as llama.cpp's importance
    matrix weighs its scale search), so a weight that meets an outlier channel is not clipped like the rest.

    cross (input-aware GPTQ, after GPTAQ): `hessian` is then that of the quantized inputs x̃ the weight will
    multiply, and cross = 2/n Σ x x̃ᵀ against the float inputs x. GPTQ then minimises ‖W x − Ŵ x̃‖ rather
    than ‖W x − Ŵ x‖: the weight W' = W·cross·H⁻¹ that best maps x̃ to the float output is found first (the
    remaining error is orthogonal to x̃), and GPTQ rounds W' under H.
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

    if cross is not None:  # least squares W' = W·C·(H + εI)⁻¹, solved as (H + εI)·W'ᵀ = Cᵀ·Wᵀ
        c = cross.detach().to(device=device, dtype=torch.float64)
        # A bare ridge: GPTQ's damping here would shrink W even where x̃ = x.
        hd = h + FIT_DAMP * torch.diagonal(h).mean() * torch.eye(n_in, dtype=h.dtype, device=device)
        fitted = torch.linalg.solve(hd, c.T @ w.double().T).T
        if not torch.isfinite(fitted).all():
            return _rtn_fallback(weight, spec, "the input-aware weight fit became non-finite")
        w = fitted.float()
        w[:, dead] = 0.0
    importance = torch.diagonal(h).float() if weighted_clip else None  # original column order
    # Per-channel and static-group parameters come from the whole (un-updated) weight, exactly as RTN.
    static = group_size is None or act_order
    if static:
        imp = None if importance is None else to_groups(importance[None], group_size)
        scale_all, zero_all = weight_qparams(to_groups(w, group_size), spec, imp)  # [out, 1] or [out, ng, 1]
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
                    imp = None if importance is None else importance[None, col : col + cur.shape[1]]
                    scale_all[:, g], zero_all[:, g] = weight_qparams(cur, spec, imp)
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
def gptq_error(weight: torch.Tensor, qweight: torch.Tensor | QuantizedTensor, x: torch.Tensor) -> float:
    """Squared output error ‖X Wᵀ − X Q(W)ᵀ‖_F² on inputs x [..., in] (the quantity GPTQ minimises)."""
    if isinstance(qweight, QuantizedTensor):
        qweight = qweight.dequantize()
    x = x.reshape(-1, weight.shape[1]).double()
    diff = weight.double() - qweight.to(weight.device).double()
    return float((x @ diff.T).pow(2).sum())
