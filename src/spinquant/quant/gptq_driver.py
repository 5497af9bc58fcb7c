"""Layer-sequential GPTQ over a whole (rotated) model (DESIGN.md §4).

The inputs of the first decoder layer are captured once; then, one layer at a time on the compute device,
the layer's linears are quantized in "true-sequential" groups — [q, k, v], [o], [gate, up], [down] — each
group's Hessians collected with the earlier groups already quantized, and finally the calibration samples
are pushed through the quantized layer to become the next layer's inputs.

Hessian basis: the input the weight actually multiplies, i.e. after the QuantLinear's online transform
(R4 for down_proj) and before its activation quantizer. Activation quantizers are configured after the
weights in the pipeline, so they are off here and the next layer's inputs are computed in float; the
W16-activation Hessian is GPTQ's usual choice. With `act` and GPTQConfig.act_aware = α, GPTQ minimises
α‖W x − Ŵ x̃‖² + (1 − α)‖W x − Ŵ x‖² (x̃: x quantized by `act`): the Hessian α·H̃ + (1 − α)·H and the cross
term α·C + (1 − α)·H go to gptq.gptq_quantize.

With GPTQConfig.float_targets (GPTAQ's asymmetric calibration), x in that objective is the input the float
model gives the same linear, carried as a second stream of layer inputs beside the quantized model's:
the weights then also undo the error the quantized layers before them left in their inputs. The float
pass of a layer runs its float weights, swapped in for the pass and out again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import GPTQConfig, QuantSpec, layer_spec, weight_specs
from ..errors import SpinQuantError
from ..streaming import LayerStream
from .gptq import HessianAccumulator, gptq_quantize
from .quantizer import fake_quantize

if TYPE_CHECKING:
    from ..models import ModelParts

# True-sequential order: each group reads the outputs of the groups before it.
GROUPS: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
# Keyword arguments that would carry state from one calibration sample into the next.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once everything it was run for has been recorded."""


def _to_device(obj: Any, device: torch.device) -> Any:
    """Move the tensors inside nested tuples / lists / dicts; anything else passes through unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(o, device) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _check_calib(calib: torch.Tensor) -> torch.Tensor:
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.numel() == 0:
        raise SpinQuantError(
            "GPTQ calibration ids must be a non-empty [samples, seq_len] tensor of token ids"
        )
    if calib.is_floating_point() or calib.is_complex():
        raise SpinQuantError(f"GPTQ calibration ids must be integer token ids, got {calib.dtype}")
    return calib.long()


@dataclasses.dataclass
class _LayerInputs:
    """What the first decoder layer receives: per-sample hidden states (CPU) and the shared arguments."""

    hidden: torch.Tensor  # [n, L, hidden] on CPU
    args: tuple  # extra positional arguments after the hidden states (usually none)
    kwargs: dict  # attention mask, position ids / embeddings, ...


@torch.no_grad()
def capture_layer_inputs(parts: ModelParts, ids: torch.Tensor) -> _LayerInputs:
    """Run the model up to its first decoder layer, one sequence at a time, and record that layer's inputs.

    Runs where the embedding lives: only embeddings, rotary tables and masks are computed, no layer.
    """
    seen: dict[str, Any] = {}

    def _hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        if args:
            seen["hidden"], seen["args"] = args[0], tuple(args[1:])
        else:
            seen["hidden"], seen["args"] = kwargs.pop("hidden_states"), ()
        seen["kwargs"] = kwargs
        raise _StopForward

    device = parts.embedding.weight.device
    handle = parts.layers[0].module.register_forward_pre_hook(_hook, with_kwargs=True)
    hidden = None
    args: tuple = ()
    kwargs: dict = {}
    try:
        # One sequence at a time: masks and activations for 128 × 2048 tokens at once would not fit.
        for i in range(ids.shape[0]):
            try:
                parts.model(ids[i : i + 1].to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise SpinQuantError(
                    "the model never called its first decoder layer; check the model adapter"
                )
            h = seen["hidden"]
            if hidden is None:
                hidden = torch.empty((ids.shape[0], *h.shape[1:]), dtype=h.dtype)
                # Every sample has the same length and no padding: the first sample's arguments serve all.
                args = _to_device(seen["args"], torch.device("cpu"))
                kwargs = _to_device(seen["kwargs"], torch.device("cpu"))
            hidden[i] = h[0].cpu()
    finally:
        handle.remove()
    for key in _CACHE_KWARGS:
        if key in kwargs:
            kwargs[key] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return _LayerInputs(hidden, args, kwargs)


class _GroupHessians:
    """Hessians of the inputs of one group of linears, in the basis their weights multiply.

    Linears that read the very same tensor (q/k/v, gate/up) share one accumulator: the Hessian is
    identical and the x·xᵀ sums are the main cost of calibration.
    """

    def __init__(self, linears: dict[str, nn.Module], device: torch.device, act: QuantSpec | None = None,
                 aware: float = 0.0, float_targets: bool = False) -> None:
        self.linears = linears
        self.device = device
        act = act if act is not None and act.enabled else None
        # input-aware: pairs (what the weight will multiply, what it should have multiplied), mixed with
        # weight `aware`; the second is the float model's input with float_targets, else the same input
        # before activation quantization.
        self.paired = aware > 0 and (act is not None or float_targets)
        self.act = act if self.paired else None
        self.aware = aware
        self.float_targets = float_targets and self.paired
        self.acc: dict[str, HessianAccumulator] = {}
        self.shares: dict[str, str] = {}  # role -> earlier role whose input is the same tensor
        self._seen: dict[str, torch.Tensor] = {}  # untransformed inputs seen in the current forward
        self._targets: dict[str, torch.Tensor] = {}  # float model's inputs of this sample, by role
        self.recording_targets = False  # the current forward is the float model's
        self._pending: set[str] = set(linears)
        self._handles = [
            m.register_forward_pre_hook(partial(self._hook, role)) for role, m in linears.items()
        ]

    def begin(self) -> None:
        self._seen.clear()
        self._pending = set(self.linears)

    def _hook(self, role: str, module: nn.Module, args: tuple) -> None:
        x = args[0]
        transform = getattr(module, "input_transform", None)
        src = self.shares.get(role)
        if src is None and role not in self.acc and transform is None:
            src = next((r for r, t in self._seen.items() if t is x), None)
            if src is not None:
                self.shares[role] = src
        if src is not None:
            if self._seen.get(src) is not x:
                raise SpinQuantError(
                    f"{role} and {src} read the same input on the first sample but not later; "
                    "the decoder layer's forward is not deterministic"
                )
        else:
            # The weight multiplies the transformed input (R4 for down_proj): that is the GPTQ basis.
            basis = transform(x) if transform is not None else x
            if self.recording_targets:
                self._targets[role] = basis
            else:
                if role not in self.acc:
                    self.acc[role] = HessianAccumulator(x.shape[-1], device=self.device)
                quantized = fake_quantize(basis, self.act) if self.act is not None else basis
                exact = None if not self.paired else self._targets.pop(role) if self.float_targets else basis
                self.acc[role].add(quantized, exact=exact)
            if transform is None:
                self._seen[role] = x
        self._pending.discard(role)
        if not self._pending:
            # Everything this pass is for has been seen: skip the rest of the layer.
            self._seen.clear()
            raise _StopForward

    def missing(self) -> list[str]:
        return sorted(self._pending)

    def hessian(self, role: str) -> torch.Tensor:
        acc = self.acc[self.shares.get(role, role)]
        return acc.hessian if not self.paired else self._mix(acc.hessian, acc.exact_hessian)

    def cross(self, role: str) -> torch.Tensor | None:
        acc = self.acc[self.shares.get(role, role)]
        return None if not self.paired else self._mix(acc.cross, acc.exact_hessian)

    def _mix(self, quantized_term: torch.Tensor, float_term: torch.Tensor) -> torch.Tensor:
        """α·(term of the quantized inputs) + (1 − α)·(the float inputs' Hessian), α = `aware`."""
        return self.aware * quantized_term + (1 - self.aware) * float_term

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.acc.clear()
        self._seen.clear()
        self._targets.clear()


@contextmanager
def _float_weights(linears: dict[str, nn.Module], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """The layer as the float model has it, for one pass: float weights in, codes out, then back."""
    kept = {role: (m.weight.data, getattr(m, "quantized", None)) for role, m in linears.items()}
    try:
        for role, m in linears.items():
            m.weight.data = weights[role]
            if hasattr(m, "quantized"):
                m.quantized = None
        yield
    finally:
        for role, m in linears.items():
            m.weight.data, quantized = kept[role]
            if hasattr(m, "quantized"):
                m.quantized = quantized


@torch.no_grad()
def _run_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    args: tuple,
    kwargs: dict,
    device: torch.device,
    outputs: torch.Tensor | None = None,
    hessians: _GroupHessians | None = None,
    targets: tuple[torch.Tensor, Callable[[], AbstractContextManager]] | None = None,
) -> None:
    """Push every calibration sample of `hidden` ([n, L, hidden], CPU) through `layer` (args / kwargs
    already on `device`).

    With `outputs`, store each sample's output there (CPU); with `hessians`, each pass is expected to be
    cut short by the hook once the group's inputs have been seen. `targets` (the float model's layer inputs,
    and a context that gives the layer its float weights): before each sample, the float model's pass over
    it records the inputs that sample's pairs are fitted to.
    """
    for i in range(hidden.shape[0]):
        if hessians is not None and targets is not None:
            float_hidden, float_layer = targets
            hessians.begin()
            hessians.recording_targets = True
            try:
                with float_layer():
                    _forward(layer, float_hidden[i : i + 1].to(device), args, kwargs, hessians)
            finally:
                hessians.recording_targets = False
        if hessians is not None:
            hessians.begin()
        out = _forward(layer, hidden[i : i + 1].to(device), args, kwargs, hessians)
        if outputs is not None:
            out = out[0] if isinstance(out, (tuple, list)) else out
            outputs[i] = out[0].to(outputs.device, outputs.dtype)


def _forward(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict,
             hessians: _GroupHessians | None) -> Any:
    """The layer's output, or None when the Hessian hook cut the pass short (as it must, with `hessians`)."""
    try:
        out = layer(x, *args, **kwargs)
    except _StopForward:
        return None
    if hessians is not None:
        raise SpinQuantError(
            f"the decoder layer never called {', '.join(hessians.missing())}; check the model adapter"
        )
    return out


@torch.no_grad()
def quantize_weights_gptq(
    parts: ModelParts,
    spec: QuantSpec | dict[str, QuantSpec],
    settings: GPTQConfig,
    calib: torch.Tensor,
    progress: bool = True,
    stream: LayerStream | None = None,
    act: QuantSpec | None = None,
) -> dict:
    """GPTQ every decoder linear of `parts` onto its grid (`spec`, or QuantConfig.weight_specs()'s dict), layer
    by layer, in place: weight ← dequantized codes and `linear.quantized` ← the codes, from the inputs that
    `calib` ([samples, seq_len] token ids, e.g. pipeline.calibration_windows) produces. `settings`: block size,
    damping, act-order. act: the activation grid, used when settings.act_aware > 0 (input-aware GPTQ).
    Each layer visits the compute device through `stream` (default: where the model is) and goes back home.

    Returns {"seconds", "samples", "seq_len", "layers"}.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    specs = spec if isinstance(spec, dict) else weight_specs(spec, {})
    if not all(s.enabled for s in specs.values()):
        raise SpinQuantError(
            "GPTQ needs weight bits below 16; use 16 bits without GPTQ to keep weights float"
        )
    ids = _check_calib(calib)
    stream = stream or LayerStream(next(parts.model.parameters()).device)  # default: compute where the model is
    device = stream.device
    model = parts.model
    was_training = model.training
    model.eval()  # calibration must be deterministic (no dropout)
    try:
        inputs = capture_layer_inputs(parts, ids)
        args = _to_device(inputs.args, device)
        kwargs = _to_device(inputs.kwargs, device)
        hidden, outputs = inputs.hidden, torch.empty_like(inputs.hidden)
        # The float model's stream (float_targets): both start from the same embeddings.
        float_targets = settings.float_targets and settings.act_aware > 0
        float_hidden = hidden.clone() if float_targets else None
        float_outputs = torch.empty_like(hidden) if float_targets else None
        n_layers = len(parts.layers)
        for index, layer in enumerate(
            tqdm(parts.layers, desc="GPTQ layers", disable=None if progress else True, leave=False)
        ):
            with stream.visit(layer) as home:
                linears = layer.linears()
                # The float weights are replaced by the quantized ones, never changed in place: keep references.
                float_layer = (partial(_float_weights, linears, {role: m.weight.data for role, m in linears.items()})
                               if float_targets else None)
                targets = (float_hidden, float_layer) if float_targets else None
                for group in GROUPS:
                    hessians = _GroupHessians({role: linears[role] for role in group}, device, act,
                                              settings.act_aware, float_targets)
                    try:
                        _run_layer(layer.module, hidden, args, kwargs, device, hessians=hessians, targets=targets)
                        for role in group:
                            linear = linears[role]
                            qt = gptq_quantize(
                                linear.weight.data,
                                hessians.hessian(role),
                                layer_spec(specs, index, role),
                                block_size=settings.block_size,
                                damp=settings.damp,
                                act_order=settings.act_order,
                                weighted_clip=settings.weighted_clip,
                                cross=hessians.cross(role),
                            )
                            linear.weight.data = qt.dequantize(linear.weight.dtype)
                            linear.quantized = qt.to(home)
                    finally:
                        hessians.close()
                if index + 1 < n_layers:  # the last layer's outputs feed nothing GPTQ needs
                    _run_layer(layer.module, hidden, args, kwargs, device, outputs=outputs)
                    hidden, outputs = outputs, hidden
                    if float_targets:
                        with float_layer():
                            _run_layer(layer.module, float_hidden, args, kwargs, device, outputs=float_outputs)
                        float_hidden, float_outputs = float_outputs, float_hidden
    finally:
        model.train(was_training)
    return {
        "seconds": time.perf_counter() - start,
        "samples": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "layers": len(parts.layers),
    }
