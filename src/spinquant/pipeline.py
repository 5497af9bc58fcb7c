"""The steps of a quantization run, in order, each a function over (model parts, config).

    prepare (untie, fuse norms) → rotations R1/R2 (fixed, loaded or learned) merged in float64
    → online R4 before down_proj, R3 on Q/K → weights (RTN or GPTQ) → activation and KV quantizers
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import distributed
from .config import QuantizedAs, QuantSpec, RotationMode, RunConfig, layer_spec, split_role_key, weight_specs
from .errors import SpinQuantError
from .models import ModelParts, model_parts
from .quant.install import install_modules, set_activation_quant
from .quant.quantizer import quantize_weight
from .quant.tables import apply_tables
from .rotation.hadamard import is_hadamard_size
from .rotation.merge import merge_r1, merge_r2, prepare
from .rotation.sets import Rotations, load_rotations, make_rotations
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
    tune_losses: list[float] | None = None  # scale tuning's KL per step (cfg.tune)


def check_supported(parts: ModelParts, cfg: RunConfig) -> None:
    """Fail before any work if a needed Hadamard size or a group size does not fit this model."""
    rot = cfg.rotation
    if rot.mode.needs_hadamard:
        sizes = [("hidden size", parts.hidden_size)] if rot.r1 else []  # R1 is hidden x hidden
        for what, n in [*sizes, ("head_dim", parts.head_dim)]:
            if not is_hadamard_size(n):
                raise SpinQuantError(
                    f"no Hadamard construction known for the {what} {n}; use --rotation random instead"
                )
    if rot.mode.rotates:
        for what, n, on in (("intermediate size (R4)", parts.intermediate_size, rot.r4),
                            ("head_dim (R3)", parts.head_dim, rot.r3)):
            if on and not is_hadamard_size(n):
                raise SpinQuantError(
                    f"no Hadamard construction known for the {what} {n}; pass --no-r4/--no-r3"
                )
    for key in cfg.quant.weight_role_bits:
        layer = split_role_key(key)[1]
        if layer is not None and layer >= len(parts.layers):
            raise SpinQuantError(f"--w-bits-role names layer {layer}, but the model has layers 0-{len(parts.layers) - 1}")
    dims = (parts.hidden_size, parts.intermediate_size, parts.num_heads * parts.head_dim)  # linear input sizes
    for what, spec in (("weight", cfg.quant.weight), ("activation", cfg.quant.act)):  # roles share the group
        g = spec.group_size
        if spec.enabled and g is not None and any(d % g for d in dims):
            raise SpinQuantError(
                f"{what} group size {g} does not divide the model's dimensions {sorted(set(dims))}; "
                "choose a common divisor or omit the group size"
            )


@torch.no_grad()
def quantize_weights_rtn(parts: ModelParts, spec: QuantSpec | dict[str, QuantSpec], progress: bool = True,
                         stream: LayerStream | None = None) -> None:
    """Round every decoder linear to its grid: `spec`, or QuantConfig.weight_specs()'s dict (by role / layer)."""
    from tqdm.auto import tqdm

    layers = tqdm(each_layer(parts, stream), total=len(parts.layers), desc="RTN weights",
                  disable=not progress or None, leave=False)
    specs = spec if isinstance(spec, dict) else weight_specs(spec, {})
    for index, layer in enumerate(layers):
        for role, linear in layer.linears().items():
            qt = quantize_weight(linear.weight.data, layer_spec(specs, index, role))
            linear.weight.data = qt.dequantize(linear.weight.dtype)
            linear.quantized = qt.to(stream.home(layer)) if stream is not None else qt  # codes live with the model


def _tune_scales(model, float_weights: dict, cfg: RunConfig, tokenizer, progress: bool,
                 calib_ids: torch.Tensor | None, every: int = 0,
                 checkpoint: Callable[[int], None] | None = None) -> list[float]:
    """End-to-end scale tuning (cfg.tune) against the same model run as the float network."""
    from .quant.scale_tuning import float_model, tune_weight_scales

    tc = cfg.tune
    if calib_ids is None:
        calib_ids = calibration_windows(tc.calib_data, cfg, tokenizer, tc.seq_len, tc.steps * tc.batch,
                                        "scale tuning data")
    elif calib_ids.shape[1] > tc.seq_len:  # the caller's windows, cut to tc.seq_len: memory grows with length
        n = calib_ids.shape[1] // tc.seq_len
        calib_ids = calib_ids[:, : n * tc.seq_len].reshape(-1, tc.seq_len)

    def teacher(ids: torch.Tensor) -> torch.Tensor:
        with float_model(model, float_weights):
            return model(input_ids=ids, use_cache=False).logits

    return tune_weight_scales(model, teacher, calib_ids, tc.steps, tc.batch, tc.lr, progress, every, checkpoint)


def layer_stream(cfg: RunConfig) -> LayerStream | None:
    """With cfg.offload the model stays where it is and layers visit cfg.device one at a time."""
    return LayerStream(resolve_device(cfg.device)) if cfg.offload else None


def calibration_windows(source: str, cfg: RunConfig, tokenizer, seq_len: int, samples: int, what: str,
                        split_hint: str | None = None) -> torch.Tensor:
    """`samples` random windows of `seq_len` tokens of the calibration text, for training or GPTQ: the one
    place that reads calibration text and refuses the evaluation text (read once per process, data.load_text)."""
    from .evaluation.data import calibration_batches, check_calibration_differs, load_text

    check_calibration_differs(source, cfg.eval.data, what=what)
    if tokenizer is None:
        raise SpinQuantError(f"{what} is text: load the model's tokenizer, or pass calib_ids (token ids)")
    return calibration_batches(load_text(source, split_hint=split_hint), tokenizer, seq_len, samples, cfg.seed)


def resolve_rotations(parts: ModelParts, cfg: RunConfig, tokenizer=None, progress: bool = True,
                      report: QuantizeReport | None = None, calib_ids: torch.Tensor | None = None,
                      stream: LayerStream | None = None) -> Rotations | None:
    """Fixed rotations by construction, learned ones from a file or by training (model already prepared)."""
    rot = cfg.rotation
    n_layers = len(parts.layers)
    if rot.mode == RotationMode.LEARNED and rot.rotation_file:
        r = load_rotations(rot.rotation_file)
        r.check(parts.hidden_size, parts.head_dim, n_layers)
        if not rot.r1 and not torch.equal(r.r1, torch.eye(parts.hidden_size, dtype=r.r1.dtype)):
            raise SpinQuantError(f"{rot.rotation_file} holds a trained R1, and its R2 were learned with it; "
                                 "drop --no-r1 to use the file, or train with --no-r1")
        return r
    init = make_rotations(rot.mode, parts.hidden_size, parts.head_dim, n_layers, seed=cfg.seed, r1=rot.r1)
    if rot.mode != RotationMode.LEARNED:
        return init
    from .training.loop import train_rotations

    log_stem = cfg.loss_curve_stem()
    # Training needs every layer for each step: under torchrun FSDP2 shards the model onto the ranks' devices;
    # a single process with --offload holds the whole model on the device while it trains.
    with on_device(None if distributed.launched() else stream, parts.model):
        if calib_ids is None:
            calib_ids = calibration_windows(cfg.train.calib_data, cfg, tokenizer, cfg.train.seq_len,
                                            cfg.train.steps * cfg.train.batch, "rotation calibration data",
                                            split_hint="train")
        result = train_rotations(parts, init, cfg, calib_ids, progress=progress, log_dir=log_stem)
    if report is not None:
        report.train = result.summary
    return result.rotations


def quantize_model(model, cfg: RunConfig, tokenizer=None, progress: bool = True,
                   calib_ids: torch.Tensor | None = None, tune_every: int = 0,
                   tune_checkpoint: Callable[[int], None] | None = None) -> QuantizeReport:
    """Rotate and quantize `model` in place according to `cfg`.

    `calib_ids` ([n, seq_len] token ids) replaces the calibration text for training and GPTQ.
    `tune_checkpoint(steps_done)` is called every `tune_every` scale-tuning steps with the model as tuning
    would leave it there, its embedding and lm_head still float (benchmarks/bench_tune_steps.py).
    """
    cfg.validate()
    caller_ids = calib_ids  # GPTQ below loads its own long windows into calib_ids; tuning must not take those
    parts = model_parts(model)
    check_supported(parts, cfg)
    report = QuantizeReport(rotation=cfg.rotation.mode, quant=cfg.quant.label, weight_method=cfg.quant.weight_method)
    rotated = cfg.rotation.mode.rotates
    t = time.perf_counter()
    if rotated and cfg.rotation.r1:  # without R1 the norms stay and a tied table stays one table
        prepare(parts)
    install_modules(parts, r3=rotated and cfg.rotation.r3, r4=rotated and cfg.rotation.r4)
    report.seconds["prepare"] = time.perf_counter() - t

    stream = layer_stream(cfg)
    t = time.perf_counter()
    rotations = (resolve_rotations(parts, cfg, tokenizer, progress, report, calib_ids, stream) if rotated else None)
    if not distributed.is_main():
        return report  # under torchrun the other ranks only help train the rotations
    if rotations is not None:
        if cfg.rotation.r1:
            merge_r1(parts, rotations.r1, stream)
        merge_r2(parts, rotations.r2, stream)
        if cfg.rotation.save_file:
            from .rotation.sets import save_rotations

            save_rotations(rotations, cfg.rotation.save_file, overwrite=cfg.overwrite)
    report.seconds["rotate"] = time.perf_counter() - t

    t = time.perf_counter()
    # Scale tuning's teacher is the float model: keep the float weights (RTN and GPTQ replace, never edit them).
    float_weights = ({linear: linear.weight.data for layer in parts.layers for linear in layer.linears().values()}
                     if cfg.tune.steps else None)
    if cfg.quant.weight.enabled:
        if cfg.quant.weight_method == "gptq":
            from .quant.gptq_driver import quantize_weights_gptq

            if calib_ids is None:
                calib_ids = calibration_windows(cfg.gptq.calib_data, cfg, tokenizer, cfg.gptq.seq_len,
                                                cfg.gptq.samples, "GPTQ calibration data")
            report.gptq = quantize_weights_gptq(parts, cfg.quant.weight_specs(), cfg.gptq, calib_ids,
                                                progress=progress, stream=stream, act=cfg.quant.act)
        else:
            quantize_weights_rtn(parts, cfg.quant.weight_specs(), progress=progress, stream=stream)
    report.seconds["weights"] = time.perf_counter() - t
    set_activation_quant(parts, cfg.quant)
    if float_weights:
        t = time.perf_counter()
        report.tune_losses = _tune_scales(model, float_weights, cfg, tokenizer, progress, caller_ids,
                                          tune_every, tune_checkpoint)
        report.seconds["tune"] = time.perf_counter() - t
    # Last: embedding and lm_head as the saved model stores them, so this model computes what it will.
    apply_tables(parts, cfg.tables)
    model.spinquant_rotations = rotations
    model.spinquant_quantized_as = QuantizedAs.from_config(cfg)  # what save and export write (runtime/checkpoint.py)
    return report
