"""Hadamard and random orthogonal rotations, plus an O(n log n) Hadamard transform.

A Hadamard matrix of order n = K * 2^m is built as kron(H_K, S_{2^m}), where S is Sylvester's
construction and H_K is a small "base" matrix from Paley's constructions over GF(q), q a prime power.
The fast transform uses the same factorisation: a butterfly over the 2^m part and a K x K matmul.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from .. import native
from ..errors import SpinQuantError

__all__ = [
    "HadamardSizeError",
    "OnlineHadamard",
    "fast_hadamard_transform",
    "hadamard_factors",
    "hadamard_matrix",
    "is_hadamard_size",
    "random_hadamard",
    "random_orthogonal",
]


class HadamardSizeError(SpinQuantError):
    """No Hadamard matrix of this order can be built here."""

    def __init__(self, n: int) -> None:
        self.n = n
        super().__init__(
            f"no Hadamard construction known for size {n}; "
            "use --rotation random (a random orthogonal matrix) instead"
        )


# ---------------------------------------------------------------------------------------------
# Number theory and finite fields
# ---------------------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q == p**k and p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


# Polynomials over GF(p) are coefficient lists, lowest degree first.


def _poly_rem(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); f is monic."""
    a = [c % p for c in a]
    d = len(f) - 1
    for i in range(len(a) - 1, d - 1, -1):
        c = a[i]
        if c:
            for j in range(d + 1):
                a[i - d + j] = (a[i - d + j] - c * f[j]) % p
    return a[:d]


def _is_irreducible(f: list[int], p: int) -> bool:
    """Trial division by every monic polynomial of degree 1..deg(f)//2 (fields here are tiny)."""
    k = len(f) - 1
    for d in range(1, k // 2 + 1):
        for low in itertools.product(range(p), repeat=d):
            if not any(_poly_rem(f, [*low, 1], p)):
                return False
    return True


@functools.cache
def _irreducible(p: int, k: int) -> tuple[int, ...]:
    """The first monic irreducible polynomial of degree k over GF(p), in a fixed order (deterministic)."""
    for low in itertools.product(range(p), repeat=k):
        f = [*low, 1]
        if low[0] != 0 and _is_irreducible(f, p):
            return tuple(f)
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _quadratic_character(p: int, k: int) -> list[int]:
    """chi(x) for every element of GF(p^k), elements numbered by their base-p digits (coefficients)."""
    q = p**k
    f = list(_irreducible(p, k)) if k > 1 else [0, 1]
    chi = [-1] * q
    chi[0] = 0
    for x in range(1, q):
        c = [(x // p**i) % p for i in range(k)]
        sq = [0] * (2 * k - 1)
        for i, j in itertools.product(range(k), repeat=2):
            sq[i + j] += c[i] * c[j]
        r = _poly_rem(sq, f, p) if k > 1 else [sq[0] % p]
        chi[sum(v * p**i for i, v in enumerate(r))] = 1
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) over GF(q), as an int64 q x q tensor."""
    pk = _prime_power(q)
    assert pk is not None
    p, k = pk
    chi = torch.tensor(_quadratic_character(p, k), dtype=torch.int64)
    powers = p ** torch.arange(k, dtype=torch.int64)
    digits = (torch.arange(q, dtype=torch.int64)[:, None] // powers) % p  # (q, k)
    # Subtraction in GF(p^k) is digit-wise subtraction mod p.
    diff = ((digits[:, None, :] - digits[None, :, :]) % p * powers).sum(-1)
    return chi[diff]


# ---------------------------------------------------------------------------------------------
# Base orders
# ---------------------------------------------------------------------------------------------


def _paley1_q(order: int) -> int | None:
    q = order - 1
    return q if q % 4 == 3 and _prime_power(q) else None


def _paley2_q(order: int) -> int | None:
    if order % 2:
        return None
    q = order // 2 - 1
    return q if q % 4 == 1 and _prime_power(q) else None


def _base_known(order: int) -> bool:
    return order in (1, 2) or _paley1_q(order) is not None or _paley2_q(order) is not None


def _paley1(q: int) -> torch.Tensor:
    """Order q+1: I + [[0, 1ᵀ], [-1, Q]] (skew; Q is antisymmetric since chi(-1) = -1)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q+1): in the symmetric conference matrix C, 0 -> B and ±1 -> ±A (2 x 2 blocks)."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    b = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    # C has zeros exactly on the diagonal, so B lands on kron(I, B); AB^T is skew, so cross terms cancel.
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)


@functools.cache
def _base_matrix(order: int) -> torch.Tensor:
    """H_K as int64 (cached; callers must not modify it)."""
    # Built outside inference mode so the cached tensor can later take part in autograd.
    with torch.inference_mode(False):
        if order in (1, 2):
            return _sylvester(order.bit_length() - 1, torch.int64)
        q = _paley1_q(order)
        if q is not None:
            return _paley1(q)
        q = _paley2_q(order)
        if q is not None:
            return _paley2(q)
    raise HadamardSizeError(order)


def _sylvester(m: int, dtype: torch.dtype) -> torch.Tensor:
    """S_{2^m} with S[i, j] = (-1)^popcount(i & j) (symmetric, natural order)."""
    h = torch.ones(1, 1, dtype=dtype)
    for _ in range(m):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _factor(n: int) -> tuple[int, int] | None:
    """(K, m) with n == K * 2^m and H_K known, preferring the largest power of two (cheapest transform)."""
    if n < 1:
        return None
    m = (n & -n).bit_length() - 1
    for mm in range(m, -1, -1):
        if _base_known(n >> mm):
            return n >> mm, mm
    return None


def is_hadamard_size(n: int) -> bool:
    """True when hadamard_matrix(n) can be built."""
    return _factor(n) is not None


def hadamard_factors(n: int) -> tuple[int, int]:
    """(K, 2^m) such that hadamard_matrix(n) == kron(H_K, Sylvester(2^m))."""
    f = _factor(n)
    if f is None:
        raise HadamardSizeError(n)
    return f[0], 1 << f[1]


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Deterministic n x n matrix of ±1 with H @ H.T == n * I."""
    k, two_m = hadamard_factors(n)
    s = _sylvester(two_m.bit_length() - 1, dtype)
    return s if k == 1 else torch.kron(_base_matrix(k).to(dtype), s)


def _generator_device(generator: torch.Generator | None) -> torch.device:
    # torch samplers need the output on the generator's device.
    return generator.device if generator is not None else torch.device("cpu")


def random_hadamard(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Orthogonal H · diag(s) / √n with random signs s ∈ {±1}^n (on the generator's device)."""
    device = _generator_device(generator)
    h = hadamard_matrix(n, torch.float64).to(device)
    s = torch.randint(0, 2, (n,), generator=generator, device=device).to(torch.float64) * 2 - 1
    return (h * (s / math.sqrt(n))).to(dtype)


def random_orthogonal(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian; without the sign fix Q would not be Haar)."""
    device = _generator_device(generator)
    a = torch.randn(n, n, generator=generator, dtype=torch.float64, device=device)
    q, r = torch.linalg.qr(a)
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q)
    return (q * sign).to(dtype)


@functools.cache
def _base_on(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """H_Kᵀ in the compute dtype/device, cached; created outside inference mode so autograd can save it."""
    with torch.inference_mode(False):
        return _base_matrix(k).T.to(dtype=dtype, device=device).contiguous()


def fast_hadamard_transform(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """x @ hadamard_matrix(n) * scale along the last dim (scale defaults to 1/√n: orthogonal)."""
    if not x.is_floating_point():
        raise TypeError(f"fast_hadamard_transform needs a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    k, two_m = hadamard_factors(n)
    if scale is None:
        scale = 1.0 / math.sqrt(n)
    lead = x.shape[:-1]
    # Scale first: every intermediate then stays within ‖x‖, so fp16/bf16 cannot overflow for large n.
    y = (x * scale).reshape(-1, k, two_m)
    rows = y.shape[0]
    h = 1
    while h < two_m:
        # Pair index b with b + h (bit h of b clear / set): one butterfly stage of Sylvester's S.
        y = y.reshape(rows, k, two_m // (2 * h), 2, h)
        lo, hi = y[..., 0, :], y[..., 1, :]
        y = torch.stack((lo + hi, lo - hi), dim=-2)
        h *= 2
    y = y.reshape(rows, k, two_m)
    if k > 1:
        # With i = a * 2^m + b, (x @ kron(A, B)) as a K x 2^m matrix is Aᵀ X B; X B is done above.
        y = torch.matmul(_base_on(k, x.dtype, x.device), y)
    return y.reshape(*lead, n)


class HadamardPlan:
    """x @ hadamard_matrix(n) / √n as two or three small dense matmuls (Kronecker factors), or on a CPU the
    native butterfly (`hadamard_rows`, with its gradient registered for rotation training).

    hadamard_matrix(n) = H_K ⊗ S_p (S: Sylvester, S_{ab} = S_a ⊗ S_b), so with x viewed as [K, p1, p2]
    the transform is H_Kᵀ · (S_p1 · X · S_p2). BLAS does this 3-5x faster than the butterfly as PyTorch
    ops (decode R4 0.02 vs 0.10 ms, prefill R3 0.4 vs 2.0 ms), but the native butterfly is 2-8x faster than
    BLAS on a CPU where the Sylvester part dominates (n = 1536: 3.3 vs 10.7 ms for 512 rows), and no slower
    elsewhere but where K > p (576 = 36 · 16), which keeps BLAS. Results agree to float rounding; one plan
    per (n, dtype, device) serves the fake-quant model and the packed runtime alike, so they round alike.
    """

    MAX_DENSE = 512  # largest Sylvester block kept dense (1 MiB in float32)

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.n = n
        self.k, p = hadamard_factors(n)
        self.p2 = min(p, self.MAX_DENSE)
        self.p1 = p // self.p2
        with torch.inference_mode(False):  # plain tensors, so autograd can save them (rotation training)
            self.s2 = (hadamard_matrix(self.p2, torch.float64) / n**0.5).to(dtype=dtype, device=device)
            self.s1 = hadamard_matrix(self.p1, torch.float64).to(dtype=dtype, device=device) if self.p1 > 1 else None
        self.base = _base_on(self.k, dtype, device) if self.k > 1 else None  # H_Kᵀ
        self.kernels = None
        if device.type == "cpu" and dtype == torch.float32 and self.k <= p:
            self.kernels = native.kernels()
            with torch.inference_mode(False):
                self.native_base = hadamard_base(n).clone()  # H_Kᵀ, or empty for K = 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.kernels is not None:
            return self.kernels.hadamard_rows(x.reshape(-1, self.n).contiguous(), self.native_base).reshape(shape)
        y = x.reshape(-1, self.p2) @ self.s2
        if self.s1 is not None:
            y = torch.matmul(self.s1, y.reshape(-1, self.p1, self.p2))
        if self.base is not None:
            y = torch.matmul(self.base, y.reshape(-1, self.k, self.p1 * self.p2))
        return y.reshape(shape)


_PLANS: dict[tuple[int, torch.dtype, torch.device], HadamardPlan] = {}


def hadamard_base(n: int) -> torch.Tensor:
    """H_Kᵀ of hadamard_matrix(n) = H_K ⊗ S_p in float32 (an empty tensor when K = 1): what the native
    butterfly transform (native, `hadamard_rows`) needs besides x."""
    k, _ = hadamard_factors(n)
    return _base_on(k, torch.float32, torch.device("cpu")) if k > 1 else torch.empty(0)


def online_hadamard(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal Hadamard transform over the last dim at run time (R3, R4): in the fake-quant model
    and in the packed runtime alike, so both round alike (at W4A4 a 1e-7 difference moves perplexity by
    percents, benchmarks/RESULTS.md, "Tried and dropped")."""
    key = (x.shape[-1], x.dtype, x.device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = HadamardPlan(*key)
    return plan(x)


class OnlineHadamard(torch.nn.Module):
    """Applies the orthogonal Hadamard transform to the last dim at run time (e.g. R4 before down_proj)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        if not is_hadamard_size(n):
            raise HadamardSizeError(n)
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"OnlineHadamard(n={self.n}) got a last dim of {x.shape[-1]}")
        return online_hadamard(x)

    def extra_repr(self) -> str:
        k, two_m = hadamard_factors(self.n)
        return f"n={self.n}, base={k}x{two_m}"
