"""Layer streaming (`--offload`): the model stays in CPU memory and one decoder layer at a time visits the
compute device, so a model larger than the device can be rotated, quantized and evaluated.

Two ways a layer visits: `layers(parts)` for layer-by-layer work (the R1/R2 merge, RTN, GPTQ), and
`forward(parts)` for whole-model forwards (evaluation), where hooks load each layer just before it runs and
put it back right after. The small rest of the model (embedding, final norm, lm_head, rotary tables) stays
on the device for the duration of `forward`. Every load and unload is logged in `moves`, and `peak` counts
the most layers ever resident at once: the tests check it is one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from . import distributed
from .errors import SpinQuantError
from .models import LayerParts, ModelParts


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA when present, else CPU; under torchrun each rank gets its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpinQuantError(f"--device {name}: no CUDA device is visible; use --device cpu")
    return distributed.local_device(device)


def module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _move_own(modules: list[nn.Module], device: torch.device) -> list[tuple[nn.Module, str, torch.device]]:
    """Move these modules' own parameters and buffers (not their children's); returns where each was."""
    was = []
    for m in modules:
        for name, p in m._parameters.items():
            if p is not None:
                was.append((m, name, p.device))
                p.data = p.data.to(device)
        for name, b in m._buffers.items():
            if b is not None:
                was.append((m, name, b.device))
                m._buffers[name] = b.to(device)
    return was


def _move_back(was: list[tuple[nn.Module, str, torch.device]]) -> None:
    for m, name, device in reversed(was):  # reversed: a tied weight seen twice ends where it first was
        if name in m._parameters:
            m._parameters[name].data = m._parameters[name].data.to(device)
        else:
            m._buffers[name] = m._buffers[name].to(device)


class LayerStream:
    """Moves decoder layers to `device` one at a time and back to where each lives."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.moves: list[tuple[str, int]] = []  # ("load" | "unload", layer index), in order
        self.peak = 0
        self._resident: set[int] = set()
        self._homes: dict[int, torch.device] = {}

    def load(self, layer: LayerParts) -> torch.device:
        """Put `layer` on the device; returns the device it came from."""
        home = self._homes.setdefault(layer.index, module_device(layer.module))
        layer.module.to(self.device)
        self._resident.add(layer.index)
        self.peak = max(self.peak, len(self._resident))
        self.moves.append(("load", layer.index))
        return home

    def home(self, layer: LayerParts) -> torch.device:
        """Where a resident layer goes back to."""
        return self._homes[layer.index]

    def unload(self, layer: LayerParts) -> None:
        layer.module.to(self._homes.pop(layer.index))
        self._resident.discard(layer.index)
        self.moves.append(("unload", layer.index))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the next layer reuses this one's memory

    @contextmanager
    def visit(self, layer: LayerParts) -> Iterator[torch.device]:
        """The layer on the device inside; yields its home device."""
        home = self.load(layer)
        try:
            yield home
        finally:
            self.unload(layer)

    def layers(self, parts: ModelParts) -> Iterator[LayerParts]:
        """Each decoder layer in turn, on the device while the loop body runs."""
        for layer in parts.layers:
            with self.visit(layer):
                yield layer

    @contextmanager
    def module(self, module: nn.Module):
        """A non-layer module (embedding, lm_head) on the device inside, back home after."""
        home = module_device(module)
        module.to(self.device)
        try:
            yield
        finally:
            module.to(home)

    @contextmanager
    def forward(self, parts: ModelParts):
        """Inside, forwards of `parts.model` run on the device with one decoder layer resident at a time."""
        in_layers = {id(m) for layer in parts.layers for m in layer.module.modules()}
        rest = [m for m in parts.model.modules() if id(m) not in in_layers]
        by_module = {id(layer.module): layer for layer in parts.layers}

        def before(module, args):
            self.load(by_module[id(module)])

        def after(module, args, out):
            self.unload(by_module[id(module)])

        hooks = [h for layer in parts.layers for h in (layer.module.register_forward_pre_hook(before),
                                                        layer.module.register_forward_hook(after))]
        was = []
        try:
            was = _move_own(rest, self.device)
            yield
        finally:
            for h in hooks:
                h.remove()
            for layer in parts.layers:  # a forward that raised may have left its layer here
                if layer.index in self._resident:
                    self.unload(layer)
            _move_back(was)


def each_layer(parts: ModelParts, stream: LayerStream | None) -> Iterator[LayerParts]:
    """parts.layers, streamed through the device when a stream is given."""
    return stream.layers(parts) if stream is not None else iter(parts.layers)


def on_device(stream: LayerStream | None, module: nn.Module):
    return stream.module(module) if stream is not None else nullcontext()


class PerDevice:
    """A tensor copied once to each device that asks for it (R1 for layers visiting the GPU)."""

    def __init__(self, tensor: torch.Tensor):
        self._copies = {tensor.device: tensor}

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        if like.device not in self._copies:
            self._copies[like.device] = next(iter(self._copies.values())).to(like.device)
        return self._copies[like.device]
