"""GPTQ: equals RTN when H = I, beats RTN on correlated inputs, handles dead columns and bad Hessians."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from spinquant.config import QuantSpec
from spinquant.errors import SpinQuantError
from spinquant.quant.gptq import HessianAccumulator, gptq_error, gptq_quantize, hessian_hook
from spinquant.quant.quantizer import qrange, quantize_weight


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    """A 64x128 weight and 1024 correlated calibration inputs with a few large-scale channels."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    z = torch.randn(1024, 128, generator=gen)
    mix = torch.randn(128, 128, generator=gen) / 128**0.5 + torch.eye(128)
    x = z @ mix
    x[:, [3, 40, 77, 101]] *= 8.0
    return w, x


@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_identity_hessian_equals_rtn(symmetric: bool, group_size: int | None, clip_search: bool) -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits=4, symmetric=symmetric, group_size=group_size, clip_search=clip_search)
    # block_size 24 makes groups straddle block boundaries, exercising the pending-update path.
    q = gptq_quantize(w, torch.eye(64), spec, block_size=24)
    ref = quantize_weight(w, spec)
    assert torch.equal(q.codes, ref.codes)
    assert torch.equal(q.scale, ref.scale)
    assert torch.equal(q.zero, ref.zero)
    assert q.group_size == ref.group_size
    assert torch.equal(q.dequantize(), ref.dequantize())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_on_correlated_inputs(
    layer, bits: int, group_size: int | None, act_order: bool
) -> None:
    w, x = layer
    spec = QuantSpec(bits=bits, symmetric=True, group_size=group_size)
    q = gptq_quantize(w, _hessian(x), spec, block_size=32, act_order=act_order)
    rtn = quantize_weight(w, spec)
    assert gptq_error(w, q, x) < 0.9 * gptq_error(w, rtn, x)

    qmin, qmax = qrange(bits, True)
    assert q.codes.dtype == torch.int8
    assert int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    assert q.scale.shape == rtn.scale.shape == ((64,) if group_size is None else (64, 128 // group_size))
    assert torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_weighted_clip_search_lowers_the_output_error(layer, group_size, act_order) -> None:
    """Weighing the clip search by the Hessian diagonal keeps the weights that meet the outlier input
    channels on the grid: the output error GPTQ minimises drops."""
    w, x = layer
    spec = QuantSpec(bits=4, symmetric=True, group_size=group_size, clip_search=True, full_range=True)
    h = _hessian(x)
    plain = gptq_quantize(w, h, spec, act_order=act_order)
    weighted = gptq_quantize(w, h, spec, act_order=act_order, weighted_clip=True)
    assert gptq_error(w, weighted, x) < gptq_error(w, plain, x)


def test_act_order_static_groups_match_rtn_grid(layer) -> None:
    # With act_order, group scales are fixed from the original weight, i.e. the RTN grid.
    w, x = layer
    spec = QuantSpec(bits=4, symmetric=False, group_size=32)
    q = gptq_quantize(w, _hessian(x), spec, act_order=True)
    ref = quantize_weight(w, spec)
    assert torch.equal(q.scale, ref.scale) and torch.equal(q.zero, ref.zero)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 32])
def test_dead_columns_are_zero(layer, symmetric: bool, group_size: int | None) -> None:
    w, x = layer
    x = x.clone()
    dead = [0, 5, 64, 127]
    x[:, dead] = 0.0
    spec = QuantSpec(bits=4, symmetric=symmetric, group_size=group_size)
    for act_order in (False, True):
        dq = gptq_quantize(w, _hessian(x), spec, block_size=32, act_order=act_order).dequantize()
        assert torch.isfinite(dq).all()
        assert torch.all(dq[:, dead] == 0)


def test_indefinite_hessian_falls_back_to_rtn() -> None:
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(bits=4, group_size=8)
    with pytest.warns(UserWarning, match="round-to-nearest"):
        q = gptq_quantize(w, -torch.eye(32), spec)
    assert torch.equal(q.codes, quantize_weight(w, spec).codes)


def test_nan_hessian_falls_back_to_rtn() -> None:
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    h = torch.eye(32)
    h[3, 4] = float("nan")
    with pytest.warns(UserWarning, match="round-to-nearest"):
        q = gptq_quantize(w, h, QuantSpec(bits=4))
    assert torch.isfinite(q.dequantize()).all()


def test_nearly_singular_hessian_needs_no_fallback() -> None:
    # Rank-deficient H (fewer samples than features): the 1% damping alone makes it invertible.
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(16, 64, generator=gen)
    x = torch.randn(8, 64, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = gptq_quantize(w, _hessian(x), QuantSpec(bits=4))
    assert torch.isfinite(q.dequantize()).all()


def test_bad_inputs_raise() -> None:
    w = torch.randn(8, 32)
    with pytest.raises(SpinQuantError):
        gptq_quantize(w, torch.eye(16), QuantSpec(bits=4))
    with pytest.raises(SpinQuantError):
        gptq_quantize(w, torch.eye(32), QuantSpec(bits=4, group_size=12))


def test_accumulator_batches_combine() -> None:
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, 7, 16, generator=gen)
    b = torch.randn(5, 16, generator=gen)
    acc = HessianAccumulator(16)
    acc.add(a)
    acc.add(b)
    full = torch.cat([a.reshape(-1, 16), b]).double()
    assert acc.n_samples == 26
    assert torch.allclose(acc.hessian, 2 * full.T @ full / 26, rtol=1e-10, atol=1e-12)
    with pytest.raises(SpinQuantError):
        acc.add(torch.randn(4, 8))


def test_hessian_hook_sees_module_input() -> None:
    lin = nn.Linear(16, 4)
    acc = HessianAccumulator(16)
    handle = hessian_hook(lin, acc)
    x = torch.randn(2, 5, 16)
    lin(x)
    handle.remove()
    lin(torch.randn(3, 16))  # after remove(): not counted
    assert acc.n_samples == 10
    assert torch.allclose(acc.hessian, _hessian(x))


def _obq_reference(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Textbook column-by-column OBQ update with an explicit inverse Hessian (float64, per-channel)."""
    w = w.double().clone()
    hinv = torch.linalg.inv(h.double() + 0.01 * torch.diagonal(h).mean() * torch.eye(h.shape[0]))
    scale = quantize_weight(w.float(), spec).scale.double()[:, None]
    qmin, qmax = qrange(spec.bits, True)
    out = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q = torch.clamp(torch.round(w[:, j : j + 1] / scale), qmin, qmax) * scale
        out[:, j : j + 1] = q
        err = (w[:, j : j + 1] - q) / hinv[j, j]
        w -= err @ hinv[j : j + 1]
        # Remove column j from the problem: Schur complement of the inverse.
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1] / hinv[j, j]
        hinv[j, j] = 1.0
    return out.float()


def test_matches_textbook_obq_update(layer) -> None:
    w, x = layer
    w, x = w[:16, :48], x[:, :48]
    spec = QuantSpec(bits=4, symmetric=True)
    q = gptq_quantize(w, _hessian(x), spec, block_size=16).dequantize()
    ref = _obq_reference(w, _hessian(x), spec)
    # Float32 vs float64 may flip a rounding tie or two; the rest must agree.
    assert (q != ref).float().mean() < 0.01


@pytest.mark.parametrize("act_order", [False, True])
def test_block_size_does_not_change_result(layer, act_order: bool) -> None:
    # Lazy batch updates are exact, so the block size only trades speed; 20 makes groups straddle blocks.
    w, x = layer
    spec = QuantSpec(bits=3, symmetric=False, group_size=32, clip_search=True)
    h = _hessian(x)
    a = gptq_quantize(w, h, spec, block_size=20, act_order=act_order)
    b = gptq_quantize(w, h, spec, block_size=128, act_order=act_order)
    assert (a.codes != b.codes).float().mean() < 0.01
    assert torch.allclose(a.scale, b.scale, rtol=1e-4)


def _pair_hessians(x: torch.Tensor, xq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = HessianAccumulator(x.shape[-1])
    for part, part_q in zip(x.split(300), xq.split(300)):  # batches combine exactly, the cross term too
        acc.add(part_q, exact=part)
    return acc.hessian, acc.cross


def test_input_aware_gptq_with_exact_inputs_is_plain_gptq(layer) -> None:
    w, x = layer
    spec = QuantSpec(bits=4, symmetric=True, group_size=32)
    h, cross = _pair_hessians(x, x)
    assert torch.allclose(cross, h) and torch.allclose(h, _hessian(x))
    plain = gptq_quantize(w, h, spec)
    aware = gptq_quantize(w, h, spec, cross=cross)
    # The 1e-6 ridge moves a few near-ties, and GPTQ carries their error on: the same quality, not the same codes.
    assert (aware.codes != plain.codes).float().mean() < 0.05
    assert abs(gptq_error(w, aware, x) / gptq_error(w, plain, x) - 1) < 0.02


@pytest.mark.parametrize("act_order", [False, True])
def test_input_aware_gptq_lowers_the_error_against_quantized_inputs(layer, act_order) -> None:
    """With 4-bit per-token inputs, fitting W to x̃ first lowers ‖W x − Ŵ x̃‖, the error the model sees."""
    from spinquant.quant.quantizer import fake_quantize

    w, x = layer
    xq = fake_quantize(x, QuantSpec(bits=4, symmetric=True))
    spec = QuantSpec(bits=4, symmetric=True, group_size=32)
    h, cross = _pair_hessians(x, xq)
    plain = gptq_quantize(w, _hessian(x), spec, act_order=act_order).dequantize()
    aware = gptq_quantize(w, h, spec, act_order=act_order, cross=cross).dequantize()

    def seen(q: torch.Tensor) -> float:
        return float((x @ w.T - xq @ q.T).pow(2).sum())

    assert seen(aware) < 0.9 * seen(plain)
