"""SGD on the Stiefel manifold (square orthogonal matrices) through the Cayley transform.

For a parameter X with Euclidean gradient G, the projected gradient Ĝ = G − ½·X·XᵀG gives the skew matrix
W = Ĝ·Xᵀ − X·Ĝᵀ; the step X ← (I + α/2·W)⁻¹(I − α/2·W)·X stays exactly orthogonal because the Cayley
transform of a skew matrix is orthogonal. We solve that system exactly (float64) rather than using the
fixed-point approximation, which drifts off the manifold over hundreds of steps.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def skew_direction(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """W = Ĝ Xᵀ − X Ĝᵀ with Ĝ = G − ½ X XᵀG (the Riemannian gradient in skew form)."""
    g_hat = g - 0.5 * x @ (x.T @ g)
    return g_hat @ x.T - x @ g_hat.T


def cayley_step(x: torch.Tensor, w: torch.Tensor, lr: float) -> torch.Tensor:
    """(I + lr/2·W)⁻¹ (I − lr/2·W) X, exact, in float64."""
    x64, w64 = x.double(), w.double()
    eye = torch.eye(x.shape[0], dtype=torch.float64, device=x.device)
    return torch.linalg.solve(eye + 0.5 * lr * w64, (eye - 0.5 * lr * w64) @ x64).to(x.dtype)


class CayleySGD(Optimizer):
    """SGD (with optional momentum on the skew direction) for square orthogonal parameters."""

    def __init__(self, params, lr: float = 1.5, momentum: float = 0.0, reorthogonalize_every: int = 0,
                 max_step: float | None = 1.0):
        """max_step caps lr·‖W‖_F (the rotation taken in one step), as Li et al.'s Cayley SGD does with
        α = min(lr, 2q/‖W‖); without it lr 1.5 turns a large gradient into a near-random rotation."""
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        defaults = {"lr": lr, "momentum": momentum, "reorthogonalize_every": reorthogonalize_every,
                    "max_step": max_step}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim != 2 or p.shape[0] != p.shape[1]:
                    raise ValueError(f"CayleySGD needs square matrices, got shape {tuple(p.shape)}")
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                w = skew_direction(p.double(), p.grad.double())
                if group["momentum"]:
                    buf = state.get("momentum_buffer")
                    # A sum of skew matrices is skew: momentum stays on the manifold's tangent algebra.
                    buf = w if buf is None else group["momentum"] * buf + w
                    state["momentum_buffer"] = buf
                    w = buf
                lr = group["lr"]
                if group["max_step"]:
                    lr = min(lr, group["max_step"] / (w.norm().item() + 1e-12))
                p.copy_(cayley_step(p.data, w, lr))
                every = group["reorthogonalize_every"]
                if every and state["step"] % every == 0:
                    p.copy_(nearest_orthogonal(p.data))
        return loss


def nearest_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """Q of X's QR with positive diagonal: removes accumulated rounding drift."""
    q, r = torch.linalg.qr(x.double())
    return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).to(x.dtype)


def lr_schedule(optimizer: Optimizer, total_steps: int, kind: str = "linear") -> LambdaLR:
    """Learning-rate decay to 0 over `total_steps` (linear as in the paper, or cosine), or constant."""
    def factor(step: int) -> float:
        frac = min(step / max(total_steps, 1), 1.0)
        if kind == "linear":
            return 1.0 - frac
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    return LambdaLR(optimizer, factor)
