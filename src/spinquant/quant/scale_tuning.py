"""End-to-end tuning of the weight scales after quantization: integer codes fixed, scales trained.

GPTQ fits each linear to its own inputs; what it cannot see is how the layers' errors add up at the output.
Here every weight scale (one per output channel or group) gets a trainable factor, and the whole quantized
network is trained to match the float network's next-token distribution (KL, as the rotation training), with
activation and KV quantizers in the loop. Codes stay as they are, so the result packs, saves and exports as
any quantized model does and costs nothing at inference (EfficientQAT's end-to-end step, scales only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import QuantSpec
from ..errors import SpinQuantError
from .modules import ActQuantizer, QuantLinear
from .quantizer import dequantize_codes


@contextmanager
def float_model(model: torch.nn.Module, float_weights: dict[QuantLinear, torch.Tensor]) -> Iterator[None]:
    """`model` computing as the float network: these float weights in, codes and every activation / KV
    quantizer off (online Hadamards stay: orthogonal, they change nothing in float)."""
    quantizers = [q for q in model.modules() if isinstance(q, ActQuantizer)]
    specs = [q.spec for q in quantizers]
    kept = {lin: (lin.weight.data, lin.quantized) for lin in float_weights}
    try:
        for q in quantizers:
            q.spec = QuantSpec(bits=16)
        for lin, w in float_weights.items():
            lin.weight.data, lin.quantized = w, None
        yield
    finally:
        for q, spec in zip(quantizers, specs):
            q.spec = spec
        for lin, (w, qt) in kept.items():
            lin.weight.data, lin.quantized = w, qt


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    student = student_logits.flatten(0, 1).float().log_softmax(-1)
    teacher = teacher_logits.flatten(0, 1).float().log_softmax(-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def tune_weight_scales(model: torch.nn.Module, teacher: Callable[[torch.Tensor], torch.Tensor],
                       calib_ids: torch.Tensor, steps: int, batch: int = 2, lr: float = 1e-3,
                       progress: bool = True, every: int = 0,
                       checkpoint: Callable[[int], None] | None = None) -> list[float]:
    """Train the weight scales of every quantized linear in `model` against `teacher(ids) -> logits`.

    Each scale s becomes s·(1 + d) with d trained by Adam from 0 (`lr` is per step on that relative factor).
    Batches cycle through `calib_ids` [n, seq_len]. Returns the per-step losses; on a non-finite loss the
    model is left as it was and SpinQuantError names the fix. With `every` > 0, `checkpoint(steps_done)` is
    called at 0 and every `every` steps with the model computing as if tuning had stopped there (to measure
    how many steps pay off in one run).
    """
    watch = checkpoint is not None and every > 0
    names = {id(m): n for n, m in model.named_modules()}
    linears = [m for m in model.modules() if isinstance(m, QuantLinear) and m.quantized is not None]
    if not linears:
        raise SpinQuantError("scale tuning needs quantized weights; run it after RTN or GPTQ (--w-bits < 16)")
    factors = [torch.zeros_like(lin.quantized.scale, dtype=torch.float32, requires_grad=True) for lin in linears]
    weight_names = [f"{names[id(lin)]}.weight" for lin in linears]
    optimizer = torch.optim.Adam(factors, lr=lr)
    quantizers = [q for q in model.modules() if isinstance(q, ActQuantizer)]
    saved_ste = [q.ste for q in quantizers]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    losses: list[float] = []
    was_training = model.training
    try:
        for q in quantizers:
            q.ste = "identity"  # outliers the activation grid clips still pass a gradient (as in rotation training)
        for p, _ in frozen:
            p.requires_grad_(False)
        model.eval()
        if watch:
            checkpoint(0)
        for step in tqdm(range(steps), desc="scale tuning", unit="step", disable=None if progress else True):
            idx = torch.arange(step * batch, (step + 1) * batch) % len(calib_ids)
            ids = calib_ids[idx].to(linears[0].weight.device)
            with torch.no_grad():
                target = teacher(ids)
            weights = {name: dequantize_codes(lin.quantized.codes, lin.quantized.scale.float() * (1 + f),
                                              lin.quantized.zero, lin.quantized.group_size, lin.weight.dtype)
                       for name, lin, f in zip(weight_names, linears, factors)}
            logits = torch.func.functional_call(model, weights, (ids,), {"use_cache": False}).logits
            loss = _kl(logits, target)
            if not torch.isfinite(loss):
                raise SpinQuantError(f"scale tuning loss became {loss.item()} at step {step}; the model is left "
                                     "untuned: lower the learning rate (--tune-lr) or tune fewer steps")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if watch and (step + 1) % every == 0 and step + 1 < steps:
                stored = [(lin.weight.detach().clone(), lin.quantized) for lin in linears]
                _apply_scales(linears, factors)
                checkpoint(step + 1)
                with torch.no_grad():  # as they were: a later failure must leave the model untuned
                    for lin, (w, q) in zip(linears, stored):
                        lin.weight.copy_(w)
                        lin.quantized = q
    finally:
        for q, ste in zip(quantizers, saved_ste):
            q.ste = ste
        for p, grad in frozen:
            p.requires_grad_(grad)
        model.train(was_training)
    _apply_scales(linears, factors)
    if watch and steps % every == 0:
        checkpoint(steps)
    return losses


@torch.no_grad()
def _apply_scales(linears: list[QuantLinear], factors: list[torch.Tensor]) -> None:
    """Each linear's scales times (1 + factor), and its stored weight from the codes and those scales."""
    for lin, f in zip(linears, factors):
        q = lin.quantized
        lin.quantized = replace(q, scale=(q.scale.float() * (1 + f)).to(q.scale.dtype))
        lin.weight.copy_(lin.quantized.dequantize(lin.weight.dtype).to(lin.weight.device))
