"""The steps of a quantization run, in order, each a function over (model parts, config).

    prepare (untie, fuse norms) → rotations R1/R2 (fixed, loaded or learned) merged in float64
    → online R4 before down_proj, R3 on Q/K → weights (RTN or GPTQ) → activation and KV quantizers
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import distributed
from .config import QuantConfig, QuantSpec, RunConfig
from .errors import SpinQuantError
from .hadamard import OnlineHadamard, fast_hadamard_transform, is_hadamard_size
from .models import ModelParts, model_parts
from .nn import KVQuant, QuantLinear, use_spinquant_attention
from .quant.quantizer import quantize_weight
from .quant.tables import apply_tables
from .rotate import merge_r1, merge_r2, prepare, update_weight
from .rotations import Rotations, load_rotations, make_rotations
from .streaming import LayerStream, each_layer, on_device, resolve_device


@dataclass
class QuantizeReport:
    """What a run did, for logs, JSON output and the saved config."""

    rotation: str
    quant: str
    weight_method: str
    seconds: dict[str, float] = field(default_factory=dict)
    train: dict | None = None
    gptq: dict | None = None


def check_supported(parts: ModelParts, cfg: RunConfig) -> None:
    """Fail before any work if a needed Hadamard size or a group size does not fit this model."""
    rot = cfg.rotation
    if rot.mode in ("hadamard", "learned"):
        for what, n in (("hidden size", parts.hidden_size), ("head_dim", parts.head_dim)):
            if not is_hadamard_size(n):
                raise SpinQuantError(
                    f"no Hadamard construction known for the {what} {n}; use --rotation random instead"
                )
    if rot.mode != "none":
        for what, n, on in (("intermediate size (R4)", parts.intermediate_size, rot.r4),
                            ("head_dim (R3)", parts.head_dim, rot.r3)):
            if on and not is_hadamard_size(n):
                raise SpinQuantError(
                    f"no Hadamard construction known for the {what} {n}; pass --no-r4/--no-r3"
                )
    dims = (parts.hidden_size, parts.intermediate_size, parts.num_heads * parts.head_dim)  # linear input sizes
    for what, spec in (("weight", cfg.quant.weight), ("activation", cfg.quant.act)):
        g = spec.group_size
        if spec.enabled and g is not None and any(d % g for d in dims):
            raise SpinQuantError(
                f"{what} group size {g} does not divide the model's dimensions {sorted(set(dims))}; "
                "choose a common divisor or omit the group size"
            )


def install_modules(parts: ModelParts, r3: bool, r4: bool) -> None:
    """Wrap every decoder linear in QuantLinear, add R4 before down_proj and KVQuant (R3) on attention."""
    for layer in parts.layers:
        for role, linear in layer.linears().items():
            layer.set(role, QuantLinear.wrap(linear))
        if r4 and layer.down.input_transform is None:
            down = layer.down
            down.input_transform = OnlineHadamard(down.in_features)
            # y = H(x)·W'ᵀ with W' = W·H/√n gives back x·Wᵀ: apply the same transform to W's rows.
            update_weight(down, fast_hadamard_transform)
        if getattr(layer.attention, "kv_quant", None) is None:
            layer.attention.kv_quant = KVQuant(parts.head_dim, rotate_qk=r3)
    use_spinquant_attention(parts.model)


def quant_linears(parts: ModelParts):
    """(name, QuantLinear) for every decoder linear, in layer order."""
    for layer in parts.layers:
        for role, linear in layer.linears().items():
            yield f"layers.{layer.index}.{role}", linear


def kv_spec(spec: QuantSpec) -> QuantSpec:
    """K/V are quantized per token per head: the group is the head, whatever the user's group size."""
    return QuantSpec(bits=spec.bits, symmetric=spec.symmetric, group_size=None, clip_ratio=spec.clip_ratio)


def set_activation_quant(parts: ModelParts, q: QuantConfig) -> None:
    """Configure the dynamic quantizers; lm_head's input stays in floating point."""
    for _, linear in quant_linears(parts):
        linear.act_quant.spec = q.act
    for layer in parts.layers:
        layer.attention.kv_quant.key_quant.spec = kv_spec(q.key)
        layer.attention.kv_quant.value_quant.spec = kv_spec(q.value)


@torch.no_grad()
def quantize_weights_rtn(parts: ModelParts, spec: QuantSpec, progress: bool = True,
                         stream: LayerStream | None = None) -> None:
    from tqdm.auto import tqdm

    layers = tqdm(each_layer(parts, stream), total=len(parts.layers), desc="RTN weights",
                  disable=not progress or None, leave=False)
    for layer in layers:
        for linear in layer.linears().values():
            qt = quantize_weight(linear.weight.data, spec)
            linear.weight.data = qt.dequantize(linear.weight.dtype)
            linear.quantized = qt.to(stream.home(layer)) if stream is not None else qt  # codes live with the model


def layer_stream(cfg: RunConfig) -> LayerStream | None:
    """With cfg.offload the model stays where it is and layers visit cfg.device one at a time."""
    return LayerStream(resolve_device(cfg.device)) if cfg.offload else None


def resolve_rotations(parts: ModelParts, cfg: RunConfig, tokenizer=None, progress: bool = True,
                      report: QuantizeReport | None = None, calib_ids: torch.Tensor | None = None,
                      stream: LayerStream | None = None) -> Rotations | None:
    """Fixed rotations by construction, learned ones from a file or by training (model already prepared)."""
    rot = cfg.rotation
    n_layers = len(parts.layers)
    if rot.mode == "learned" and rot.rotation_file:
        r = load_rotations(rot.rotation_file)
        r.check(parts.hidden_size, parts.head_dim, n_layers)
        return r
    init = make_rotations(rot.mode, parts.hidden_size, parts.head_dim, n_layers, seed=cfg.seed)
    if rot.mode != "learned":
        return init
    from .train import train_rotations

    log_stem = cfg.loss_curve_stem()
    # Training needs every layer for each step: under torchrun FSDP2 shards the model onto the ranks' devices;
    # a single process with --offload holds the whole model on the device while it trains.
    with on_device(None if distributed.launched() else stream, parts.model):
        result = train_rotations(parts, init, cfg, tokenizer, calib_ids=calib_ids, progress=progress,
                                 log_dir=log_stem)
    if report is not None:
        report.train = result.summary
    return result.rotations


def quantize_model(model, cfg: RunConfig, tokenizer=None, progress: bool = True,
                   calib_ids: torch.Tensor | None = None) -> QuantizeReport:
    """Rotate and quantize `model` in place according to `cfg`.

    `calib_ids` ([n, seq_len] token ids) replaces the calibration text for training and GPTQ.
    """
    cfg.validate()
    parts = model_parts(model)
    check_supported(parts, cfg)
    report = QuantizeReport(rotation=cfg.rotation.mode, quant=cfg.quant.label, weight_method=cfg.quant.weight_method)
    rotated = cfg.rotation.mode != "none"
    t = time.perf_counter()
    if rotated:
        prepare(parts)
    install_modules(parts, r3=rotated and cfg.rotation.r3, r4=rotated and cfg.rotation.r4)
    report.seconds["prepare"] = time.perf_counter() - t

    stream = layer_stream(cfg)
    t = time.perf_counter()
    rotations = (resolve_rotations(parts, cfg, tokenizer, progress, report, calib_ids, stream) if rotated else None)
    if not distributed.is_main():
        return report  # under torchrun the other ranks only help train the rotations
    if rotations is not None:
        merge_r1(parts, rotations.r1, stream)
        merge_r2(parts, rotations.r2, stream)
        if cfg.rotation.save_file:
            from .rotations import save_rotations

            save_rotations(rotations, cfg.rotation.save_file, overwrite=cfg.overwrite)
    report.seconds["rotate"] = time.perf_counter() - t

    t = time.perf_counter()
    if cfg.quant.weight.enabled:
        if cfg.quant.weight_method == "gptq":
            from .quant.gptq_driver import quantize_weights_gptq

            report.gptq = quantize_weights_gptq(parts, cfg, tokenizer, progress=progress, calib=calib_ids,
                                                stream=stream)
        else:
            quantize_weights_rtn(parts, cfg.quant.weight, progress=progress, stream=stream)
    report.seconds["weights"] = time.perf_counter() - t
    set_activation_quant(parts, cfg.quant)
    # Last: embedding and lm_head as the saved model stores them, so this model computes what it will.
    apply_tables(parts, cfg.tables)
    model.spinquant_rotations = rotations
    return report
