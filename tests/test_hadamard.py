"""Hadamard constructions, the fast transform and random rotations."""

from __future__ import annotations

import math

import pytest
import torch

from spinquant import native
from spinquant.errors import SpinQuantError
from spinquant.rotation import hadamard as hadamard_module
from spinquant.rotation.hadamard import (
    HadamardSizeError,
    OnlineHadamard,
    _base_matrix,
    _paley1,
    _paley2,
    _prime_power,
    _sylvester,
    fast_hadamard_transform,
    hadamard_factors,
    hadamard_matrix,
    is_hadamard_size,
    online_hadamard,
    random_hadamard,
    random_orthogonal,
)

# Dense H @ H.T is cheap up to here; above it we check the factors and the kron structure instead.
DENSE_SIZES = [12, 20, 28, 36, 40, 44, 52, 60, 64, 72, 80, 96, 128, 160, 344, 576, 1536, 2048]
BIG_SIZES = [3072, 4096, 5632, 8192, 11008, 14336, 18944]
EXPECTED_FACTORS = {
    576: (36, 16),
    1536: (12, 128),
    5632: (44, 128),
    11008: (344, 32),
    14336: (28, 512),
    18944: (148, 128),
    4096: (1, 4096),
}


def _assert_hadamard(h: torch.Tensor) -> None:
    n = h.shape[0]
    assert h.shape == (n, n)
    assert bool(h.abs().eq(1).all())
    # Entries are ±1, so every partial sum is an integer well below 2^53: the float64 product is exact.
    h = h.to(torch.float64)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", DENSE_SIZES)
def test_dense_hadamard(n: int) -> None:
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64
    _assert_hadamard(h)
    assert torch.equal(h, hadamard_matrix(n))  # deterministic


@pytest.mark.parametrize("n", BIG_SIZES)
def test_big_sizes_by_structure(n: int) -> None:
    assert is_hadamard_size(n)
    k, two_m = hadamard_factors(n)
    assert k * two_m == n and two_m & (two_m - 1) == 0
    if n in EXPECTED_FACTORS:
        assert (k, two_m) == EXPECTED_FACTORS[n]
    base = _base_matrix(k)
    _assert_hadamard(base)
    # Rows of H via the fast transform of unit vectors must be kron(H_K[a], S[b]), S[b, j] = (-1)^popcount(b & j).
    idx = torch.tensor([0, 1, n // 2 + 3, n - 1])
    units = torch.zeros(len(idx), n, dtype=torch.float64)
    units[torch.arange(len(idx)), idx] = 1.0
    rows = fast_hadamard_transform(units, scale=1.0)
    j = torch.arange(two_m)
    for r, i in zip(rows, idx.tolist()):
        a, b = divmod(i, two_m)
        bits = torch.tensor([(b & v).bit_count() for v in j.tolist()])
        s_row = (1 - 2 * (bits % 2)).to(torch.float64)
        assert torch.equal(r, torch.kron(base[a].to(torch.float64), s_row))


def test_sylvester_is_hadamard() -> None:
    for m in range(11):
        _assert_hadamard(_sylvester(m, torch.float64))


# Prime powers cover GF(p^k) with k = 2, 3, 4, 5: 9, 25, 27, 49, 81, 121, 125, 169, 243, 343.
PALEY1_Q = [3, 7, 11, 19, 23, 27, 43, 59, 67, 71, 131, 243, 343]
PALEY2_Q = [5, 9, 13, 17, 25, 29, 49, 73, 81, 121, 125, 169]


@pytest.mark.parametrize("q", PALEY1_Q)
def test_paley1(q: int) -> None:
    h = _paley1(q)
    _assert_hadamard(h)
    s = h - torch.eye(q + 1, dtype=h.dtype)
    assert torch.equal(s, -s.T)  # skew-Hadamard, as the construction promises


@pytest.mark.parametrize("q", PALEY2_Q)
def test_paley2(q: int) -> None:
    _assert_hadamard(_paley2(q))


def test_prime_power() -> None:
    assert _prime_power(343) == (7, 3)
    assert _prime_power(73) == (73, 1)
    assert _prime_power(1024) == (2, 10)
    assert _prime_power(171) is None and _prime_power(1) is None


def test_base_build_is_fast() -> None:
    import time

    for k in (148, 344):
        _base_matrix.cache_clear()
        t = time.perf_counter()
        _base_matrix(k)
        assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("n", [6, 10, 22, 92, 172, 0, -4])
def test_unsupported_sizes(n: int) -> None:
    assert not is_hadamard_size(n)
    with pytest.raises(HadamardSizeError) as err:
        hadamard_matrix(n)
    assert isinstance(err.value, SpinQuantError)
    msg = str(err.value)
    assert f"size {n};" in msg
    assert "use --rotation random (a random orthogonal matrix) instead" in msg
    with pytest.raises(HadamardSizeError):
        OnlineHadamard(n)
    if n > 0:
        with pytest.raises(HadamardSizeError):
            fast_hadamard_transform(torch.zeros(2, n))


@pytest.mark.parametrize("n", [64, 576, 1536, 5632, 344, 28])
def test_fast_matches_dense(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, n, generator=g, dtype=torch.float64)
    y = fast_hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    h = hadamard_matrix(n)
    torch.testing.assert_close(y, x @ h / math.sqrt(n), rtol=0, atol=1e-10)
    torch.testing.assert_close(fast_hadamard_transform(x, scale=1.0), x @ h, rtol=0, atol=1e-10)


def test_fast_is_orthogonal_on_big_size() -> None:
    x = torch.randn(2, 18944, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = fast_hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


def test_autograd_matches_dense() -> None:
    n = 576
    x = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, n, dtype=torch.float64)
    (fast_hadamard_transform(x) * w).sum().backward()
    g_fast = x.grad.clone()
    x.grad = None
    (x @ hadamard_matrix(n) / math.sqrt(n) * w).sum().backward()
    torch.testing.assert_close(g_fast, x.grad, rtol=0, atol=1e-10)


@pytest.mark.skipif(not native.available(), reason="native kernels not built on this machine")
@pytest.mark.parametrize("n", [64, 1536, 4096, 28 * 64])
def test_online_hadamard_on_cpu_is_the_native_butterfly_with_its_gradient(n: int) -> None:
    """float32 on a CPU runs the native butterfly (a plan first made in inference mode included); forward and
    gradient equal the dense transform to float32 rounding."""
    plan_key = (n, torch.float32, torch.device("cpu"))
    hadamard_module._PLANS.pop(plan_key, None)
    with torch.inference_mode():
        online_hadamard(torch.randn(1, n))
    assert hadamard_module._PLANS[plan_key].kernels is not None
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n), requires_grad=True)
    w = torch.randn(3, 5, n)
    y = online_hadamard(x)
    dense = hadamard_matrix(n).float() / math.sqrt(n)
    torch.testing.assert_close(y, x.detach() @ dense, rtol=0, atol=2e-5)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w @ dense.t(), rtol=0, atol=2e-5)


def test_cache_made_in_inference_mode_still_supports_autograd() -> None:
    n = 20 * 8  # base 20: make sure the (K, dtype, device) cache entry is first created here
    with torch.inference_mode():
        fast_hadamard_transform(torch.randn(1, n, dtype=torch.float16))
    x = torch.randn(1, n, dtype=torch.float16, requires_grad=True)
    fast_hadamard_transform(x).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_kept(dtype: torch.dtype) -> None:
    n = 1536
    x = torch.randn(3, n, dtype=torch.float64)
    y = fast_hadamard_transform(x.to(dtype))
    assert y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    ref = x @ hadamard_matrix(n) / math.sqrt(n)
    torch.testing.assert_close(y.to(torch.float64), ref, rtol=0, atol=tol)


def test_half_precision_no_overflow() -> None:
    # Unnormalised, the butterfly would reach 8192 * 100 > fp16 max; scaling first keeps it finite.
    x = torch.full((1, 8192), 100.0, dtype=torch.float16)
    y = fast_hadamard_transform(x)
    assert torch.isfinite(y).all()
    assert y[0, 0].item() == pytest.approx(100.0 * math.sqrt(8192), rel=1e-2)


def test_integer_input_rejected() -> None:
    with pytest.raises(TypeError):
        fast_hadamard_transform(torch.ones(2, 8, dtype=torch.int64))


@pytest.mark.parametrize("n", [64, 576, 344])
def test_random_hadamard(n: int) -> None:
    q = random_hadamard(n, torch.Generator().manual_seed(1))
    assert q.dtype == torch.float64
    assert torch.linalg.matrix_norm(q.T @ q - torch.eye(n, dtype=torch.float64)) <= 1e-12
    assert torch.equal(q, random_hadamard(n, torch.Generator().manual_seed(1)))
    assert not torch.equal(q, random_hadamard(n, torch.Generator().manual_seed(2)))
    # Column j is H[:, j] * s_j / √n.
    signs = (q * math.sqrt(n) / hadamard_matrix(n))[0]
    assert bool(signs.abs().eq(1).all())
    assert random_hadamard(n, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n", [1, 7, 64, 200])
def test_random_orthogonal(n: int) -> None:
    q = random_orthogonal(n, torch.Generator().manual_seed(3))
    assert q.shape == (n, n) and q.dtype == torch.float64
    assert torch.linalg.matrix_norm(q.T @ q - torch.eye(n, dtype=torch.float64)) <= 1e-12
    assert torch.equal(q, random_orthogonal(n, torch.Generator().manual_seed(3)))
    if n > 1:
        assert not torch.equal(q, random_orthogonal(n, torch.Generator().manual_seed(4)))
    assert random_orthogonal(n, dtype=torch.float32).dtype == torch.float32


def test_random_orthogonal_sign_fix() -> None:
    # With R's diagonal made positive, Q is a unique function of the Gaussian draw: check it directly.
    g = torch.Generator().manual_seed(5)
    a = torch.randn(16, 16, generator=g, dtype=torch.float64)
    q = random_orthogonal(16, torch.Generator().manual_seed(5))
    r = q.T @ a
    torch.testing.assert_close(r, torch.triu(r), rtol=0, atol=1e-10)
    assert bool((torch.diagonal(r) > 0).all())


def test_online_hadamard_module() -> None:
    mod = OnlineHadamard(11008)
    assert "n=11008" in repr(mod)
    assert list(mod.state_dict()) == []  # nothing extra to save in checkpoints
    x = torch.randn(2, 5, 11008, dtype=torch.float32)
    y = mod(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, fast_hadamard_transform(x))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-4, atol=0)
    with pytest.raises(ValueError):
        mod(torch.randn(2, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = torch.randn(2, 3, 11008, dtype=torch.float32)
    y = fast_hadamard_transform(x.cuda())
    assert y.is_cuda and y.dtype == torch.float32
    torch.testing.assert_close(y.cpu(), fast_hadamard_transform(x), rtol=1e-5, atol=1e-5)
    q = random_orthogonal(32, torch.Generator(device="cuda").manual_seed(0))
    assert q.is_cuda
