"""Fake quantizers: grid range, zero point, groups, clip search and straight-through gradients."""

import pytest
import torch

from spinquant import native
from spinquant.config import QuantSpec
from spinquant.errors import SpinQuantError
from spinquant.quant.quantizer import (
    compute_qparams,
    fake_quantize,
    fake_quantize_weight,
    qrange,
    quantize_weight,
    round_ste,
    to_groups,
)

G = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_stay_in_range_and_values_on_the_grid(bits, symmetric):
    w = torch.randn(8, 64, generator=G) * 3
    qt = quantize_weight(w, QuantSpec(bits, symmetric=symmetric))
    qmin, qmax = qrange(bits, symmetric)
    assert int(qt.codes.min()) >= qmin and int(qt.codes.max()) <= qmax
    assert len(torch.unique(qt.dequantize()[0])) <= 2**bits
    # Without clipping, min-max RTN error is at most half a step per element.
    step = qt.scale.unsqueeze(-1)
    assert ((qt.dequantize() - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_full_range_grid_puts_the_largest_magnitude_on_the_negative_end(bits):
    """llama.cpp's Q4_0 grid: every slice's largest |w| becomes code -2^(b-1) exactly (its scale takes the
    sign), so 2^b levels serve where amax / (2^(b-1) - 1) uses 2^b - 1; the reconstruction error drops."""
    w = torch.randn(64, 128, generator=G)
    w[::2, 7] = -5.0  # the extreme negative in even rows, positive in odd rows
    w[1::2, 9] = 5.0
    spec = QuantSpec(bits, group_size=32, full_range=True)
    qt = quantize_weight(w, spec)
    groups = to_groups(w, 32)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.equal(qt.scale.sign(), -extreme.sign())
    assert torch.allclose(to_groups(qt.dequantize(), 32).gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1),
                          extreme)
    assert int(qt.codes.min()) == -(2 ** (bits - 1)) and int(qt.codes.max()) <= 2 ** (bits - 1) - 1
    plain = quantize_weight(w, QuantSpec(bits, group_size=32))
    assert (qt.dequantize() - w).pow(2).mean() < 0.9 * (plain.dequantize() - w).pow(2).mean()
    with pytest.raises(SpinQuantError, match="full-range grid is a symmetric one"):
        QuantSpec(bits, symmetric=False, full_range=True).validate("weight")


def test_weighted_clip_search_spares_the_important_values():
    """With one column weighted 1000x, the search keeps that column's outlier on the grid (ratio 1) where
    the unweighted search clips it."""
    from spinquant.quant.quantizer import search_clip_ratio

    w = torch.randn(16, 64, generator=G)
    w[:, 3] = 20.0
    imp = torch.ones(64)
    imp[3] = 1000.0
    plain = search_clip_ratio(w, 4, True)
    weighted = search_clip_ratio(w, 4, True, importance=imp)
    assert (plain < 1).all() and (weighted > 0.97).all()


@pytest.mark.parametrize("full", [False, True])
def test_weighted_search_refits_the_scale_below_every_grid_point(full):
    """The weighted search refits each candidate's scale by least squares: its weighted squared error is at
    most that of every plain shrink on the grid."""
    from spinquant.quant.quantizer import fake_quant, search_clip_ratio

    gen = torch.Generator().manual_seed(5)
    g = to_groups(torch.randn(40, 128, generator=gen) * torch.rand(40, 1, generator=gen), 32)
    imp = to_groups(torch.rand(128, generator=gen).pow(3) * 50, 32)

    def error(ratio):
        scale, zero = compute_qparams(g, 4, True, ratio, full)
        return ((fake_quant(g, scale, zero, 4, True) - g).pow(2) * imp).sum(-1, keepdim=True)

    chosen = error(search_clip_ratio(g, 4, True, full_range=full, importance=imp))
    grid = torch.stack([error(1.0 - i / 100) for i in range(80)]).amin(0)
    assert (chosen <= grid * (1 + 1e-5)).all() and (chosen < grid * 0.999).any()


def test_asymmetric_zero_point_keeps_zero_exact():
    x = torch.tensor([[0.0, 0.3, 1.7, 2.5, 4.0]])  # all non-negative: zero must still be on the grid
    _scale, zero = compute_qparams(x, 4, symmetric=False)
    assert zero.item() == 0
    y = fake_quantize(torch.tensor([[-1.0, 0.0, 3.0]]), QuantSpec(4, symmetric=False))
    assert y[0, 1].item() == 0.0


def test_groups_quantize_each_chunk_on_its_own_scale():
    w = torch.cat([torch.randn(4, 16, generator=G) * 0.01, torch.randn(4, 16, generator=G) * 100], dim=1)
    per_row = fake_quantize_weight(w, QuantSpec(4))
    grouped = fake_quantize_weight(w, QuantSpec(4, group_size=16))
    small = slice(0, 16)
    assert (grouped[:, small] - w[:, small]).abs().max() < (per_row[:, small] - w[:, small]).abs().max()
    assert quantize_weight(w, QuantSpec(4, group_size=16)).scale.shape == (4, 2)
    with pytest.raises(SpinQuantError, match="does not divide"):
        fake_quantize_weight(w, QuantSpec(4, group_size=12))


def test_clip_search_never_worse_than_min_max():
    w = torch.randn(32, 128, generator=G)
    w[:, 0] *= 20  # an outlier per row
    plain = (fake_quantize_weight(w, QuantSpec(4)) - w).abs().pow(2.4).sum(-1)
    searched = (fake_quantize_weight(w, QuantSpec(4, clip_search=True)) - w).abs().pow(2.4).sum(-1)
    assert (searched <= plain + 1e-5).all() and searched.sum() < plain.sum()


def test_activation_clip_ratio_shrinks_the_range():
    x = torch.randn(4, 64, generator=G)
    s_full, _ = compute_qparams(x, 4, True, 1.0)
    s_clip, _ = compute_qparams(x, 4, True, 0.9)
    assert torch.allclose(s_clip, 0.9 * s_full)


def test_sixteen_bits_is_identity():
    x = torch.randn(3, 5, generator=G)
    assert fake_quantize(x, QuantSpec(16)) is x and fake_quantize_weight(x, QuantSpec(16)) is x


def test_straight_through_gradients():
    x = torch.randn(2, 32, generator=G, requires_grad=True)
    round_ste(x * 3).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 3.0))
    x.grad = None
    fake_quantize(x, QuantSpec(4, symmetric=True)).sum().backward()
    # Unclipped elements pass the gradient through unchanged; the scale gets none.
    assert torch.allclose(x.grad, torch.ones_like(x))


def test_identity_ste_passes_gradient_where_the_grid_clips():
    x = torch.randn(4, 64, generator=G)
    x[:, 0] = 8.0  # an outlier per row: clip 0.5 cuts it (and others) off the grid
    spec = QuantSpec(4, symmetric=False, clip_ratio=0.5)
    grads, values = {}, {}
    for ste in ("clipped", "identity"):
        xi = x.clone().requires_grad_(True)
        y = fake_quantize(xi, spec, ste)
        y.sum().backward()
        grads[ste], values[ste] = xi.grad, y.detach()
    assert torch.equal(values["clipped"], values["identity"])  # the forward is the same, bit for bit
    assert torch.equal(grads["identity"], torch.ones_like(x))
    assert (grads["clipped"][:, 0] == 0).all() and (grads["clipped"] == 1).float().mean() > 0.5


def test_invalid_bits_are_refused_with_the_fix():
    for bits in (0, 1, 9, 17):
        with pytest.raises(SpinQuantError, match="use 2-8, or 16"):
            QuantSpec(bits).validate("weight")


@pytest.mark.parametrize("w_bits,a_bits,a_sym", [(4, 4, False), (4, 8, False), (8, 8, True), (8, 8, False)])
def test_integer_order_linear_is_the_fake_quant_product(w_bits, a_bits, a_sym):
    from spinquant.quant.quantizer import integer_order_linear

    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 7, 96, generator=gen), torch.randn(40, 96, generator=gen), torch.randn(40, generator=gen)
    act = QuantSpec(a_bits, symmetric=a_sym, clip_ratio=0.9)
    qw = quantize_weight(w, QuantSpec(w_bits, symmetric=w_bits == 8, clip_search=True))
    ref = torch.nn.functional.linear(fake_quantize(x, act), qw.dequantize(), b)
    out = integer_order_linear(x, act, qw, b)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Layouts it does not cover say so (the caller then fake-quantizes in float).
    assert integer_order_linear(x, QuantSpec(16), qw) is None
    assert integer_order_linear(x, QuantSpec(4, group_size=32), qw) is None
    assert integer_order_linear(x.bfloat16(), act, qw) is None


def test_integer_order_linear_sums_exactly_past_float32_integers():
    from spinquant.quant.quantizer import QuantizedTensor, integer_order_linear

    # 8-bit codes over k = 4096: sums reach 2^26, past float32's exact integers; float64 keeps them exact.
    k = 4096
    codes = torch.full((2, k), 127, dtype=torch.int8)
    codes[1, ::2] = -128
    qw = QuantizedTensor(codes, torch.ones(2), torch.zeros(2), 8, True, None)
    x = torch.full((1, k), 127.0)
    x[0, 0] = 126.0  # an odd total: a float32 sum would round it
    y = integer_order_linear(x, QuantSpec(8, symmetric=True), qw)
    expected = [126 * 127 + (k - 1) * 127 * 127, 126 * -128 + 127 * (127 * (k // 2) - 128 * (k // 2 - 1))]
    # Scale 1 per token and per row (amax 127 / qmax 127): the output is the exact integer sum, rounded once
    # to float32, as the int32 → float32 conversion of the integer kernel rounds it.
    assert torch.equal(y[0], torch.tensor(expected, dtype=torch.float64).float())


@pytest.mark.parametrize("symmetric,group", [(True, None), (False, None), (True, 32)])
def test_clip_search_in_chunks_of_rows_equals_the_whole_search(monkeypatch, symmetric, group):
    from spinquant.quant import quantizer

    w = to_groups(torch.randn(37, 96, generator=torch.Generator().manual_seed(3)) * 2, group)
    whole = quantizer._search_clip_ratio(w, 4, symmetric, 100, 0.8, 2.4)
    monkeypatch.setattr(quantizer, "CLIP_SEARCH_CHUNK", 5 * 96)  # several chunks, the last one short
    monkeypatch.setattr(quantizer.native, "kernels", lambda: None)  # the tensor-op path (no native library)
    assert torch.equal(quantizer.search_clip_ratio(w, 4, symmetric), whole)


@pytest.mark.skipif(not native.available(), reason="native kernels not built on this machine")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric,group", [(True, None), (False, None), (True, 32), (False, 64)])
@pytest.mark.parametrize("full", [False, True])
def test_native_clip_search_finds_the_tensor_search_minimum(bits, symmetric, group, full):
    """The native search (its own exp/log for |e|^2.4, its own order of summing) picks the ratio the tensor
    ops pick, or one whose error (measured by the tensor ops) ties the best to float rounding; also on the
    full-range grid."""
    from spinquant.quant import quantizer

    if full and not symmetric:
        pytest.skip("the full-range grid is symmetric")
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(96, 192, generator=gen) * torch.rand(96, 1, generator=gen) * 3
    w[::7, 5] *= 15  # outliers, so the best ratio is well below 1 in some rows
    w[3] = 0.0  # an all-zero row: every ratio gives error 0, the first one wins
    g = to_groups(w, group)
    expected = quantizer._search_clip_ratio(g, bits, symmetric, 100, 0.8, 2.4, full)
    got = quantizer.search_clip_ratio(g, bits, symmetric, full_range=full)
    assert got.shape == expected.shape and (bits == 8 or (expected < 1).any())

    def error(ratio):
        scale, zero = compute_qparams(g, bits, symmetric, ratio, full)
        return (quantizer.fake_quant(g, scale, zero, bits, symmetric) - g).abs().pow(2.4).sum(-1, keepdim=True)

    best, chosen = error(expected), error(got)
    assert torch.all(chosen <= best * (1 + 1e-5) + 1e-30)
    assert (got == expected).float().mean() > 0.98
    assert float(got.reshape(-1, 1)[3 * (g.shape[-2] if g.dim() == 3 else 1)]) == 1.0


@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_one_dequantizer_for_every_scale_layout(group, symmetric):
    """QuantizedTensor.dequantize, the runtime's weight-only modules and the exports all call
    dequantize_codes: scales as [N], [N, 1] or [N, G] give the same floats, other dtypes are their rounding."""
    from spinquant.quant.quantizer import dequantize_codes

    w = torch.randn(6, 64, generator=G)
    qt = quantize_weight(w, QuantSpec(4, symmetric=symmetric, group_size=group))
    per = (6, -1, 1) if group else (6, 1)
    codes = to_groups(qt.codes.double(), group)
    ref = ((codes - qt.zero.double().reshape(per)) * qt.scale.double().reshape(per)).reshape(6, 64)
    for scale, zero in ((qt.scale, qt.zero), (qt.scale.reshape(6, -1), qt.zero.reshape(6, -1))):
        out = dequantize_codes(qt.codes, scale, zero, group)
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-7)
        assert torch.equal(out, qt.dequantize())
        assert torch.equal(dequantize_codes(qt.codes, scale, zero, group, torch.bfloat16), out.bfloat16())
