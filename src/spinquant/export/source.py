"""What every exporter reads: one quantized model, from memory or from a folder saved by `quantize --output`.

`ExportSource` holds the decoder linears as integer codes + scale / zero (our convention: signed codes for
symmetric grids, unsigned 0..2^b-1 with a zero point for asymmetric ones), every other tensor in float
(embedding, lm_head, norms), the activation / KV settings and the online Hadamards (R3, R4) that are still
active. R1/R2 are already merged into the weights either way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import QuantSpec
from ..errors import SpinQuantError
from ..models import Adapter, adapter_for
from ..quant.quantizer import QuantizedTensor
from ..rotation.hadamard import fast_hadamard_transform
from ..rotation.sets import Rotations


@dataclass
class ExportLinear:
    """One decoder linear: `weight` is the float weight the model computes with (dequantized if quantized)."""

    weight: torch.Tensor  # [out, in] float32
    quantized: QuantizedTensor | None  # codes as int16 in their true range (see `true_codes`)
    bias: torch.Tensor | None


@dataclass
class ExportSource:
    config: Any  # transformers PretrainedConfig (untied, no source quantization_config)
    adapter: Adapter
    linears: dict[str, ExportLinear]  # by module path, e.g. "model.layers.0.self_attn.q_proj"
    tensors: dict[str, torch.Tensor]  # every other tensor by state-dict key, float32
    weight: QuantSpec
    act: QuantSpec
    key: QuantSpec
    value: QuantSpec
    r3: int | None  # head_dim when the online Hadamard on Q/K is active
    r4: int | None  # intermediate size when the online Hadamard before down_proj is active
    rotation: str  # none, merged (in memory), or the mode a checkpoint recorded (hadamard, learned, ...)
    rotations: Rotations | None = None
    tokenizer: Any = None
    tokenizer_dir: Path | None = None  # folder holding the tokenizer files (checkpoint sources)
    source_name: str | None = None  # what the model was loaded from (a built-in name, a .gguf, a folder)
    extra: dict = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def linear(self, layer: int, role: str) -> ExportLinear:
        return self.linears[f"{self.adapter.layers}.{layer}.{getattr(self.adapter.layer, role)}"]

    def tensor(self, path: str) -> torch.Tensor:
        return self.tensors[f"{path}.weight"]


def true_codes(qt: QuantizedTensor) -> torch.Tensor:
    """Codes as int16 in their real range: asymmetric 8-bit codes (0..255) may sit wrapped in an int8."""
    codes = qt.codes.to(torch.int16)
    if not qt.symmetric and qt.bits == 8:
        codes = codes % 256
    return codes


def _normalized(qt: QuantizedTensor, shape: torch.Size) -> QuantizedTensor:
    """Scale / zero always [out, n_groups] (n_groups = 1 per channel), codes int16, zero float."""
    out = shape[0]
    scale = qt.scale.detach().float().reshape(out, -1)
    zero = qt.zero.detach().float().reshape(out, -1) if qt.zero is not None else torch.zeros_like(scale)
    group = qt.group_size if qt.group_size not in (None, shape[-1]) else None
    return QuantizedTensor(codes=true_codes(qt), scale=scale, zero=zero, bits=qt.bits, symmetric=qt.symmetric,
                           group_size=group)


def clean_config(config: Any) -> Any:
    """A copy of the HF config as the exported model has it: untied, no attention override, no source quant."""
    config = copy.deepcopy(config)
    for attr in ("quantization_config", "spinquant"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.tie_word_embeddings = False
    return config


def hadamard_pm1(n: int) -> torch.Tensor:
    """The ±1 matrix T of our online Hadamard: OnlineHadamard(n)(x) == x @ T / √n (float64, exact)."""
    t = fast_hadamard_transform(torch.eye(n, dtype=torch.float64)) * n**0.5
    return t.round()


def source_from_model(model: nn.Module, tokenizer: Any = None) -> ExportSource:
    """Collect an in-memory model after `spinquant.quantize` (a plain float model works for GGUF too)."""
    from ..models import model_parts
    from ..quant.modules import QuantLinear
    from ..runtime.checkpoint import quantization_record

    if getattr(model, "spinquant_config", None) is not None and not hasattr(model, "spinquant_rotations"):
        raise SpinQuantError("this is a runtime model loaded from a saved folder; export the folder itself "
                             "with: spinquant export DIR --format ...")
    parts = model_parts(model)
    adapter = parts.adapter
    # A quantized model carries the record of how (checked against its modules); a float model exports as is.
    record = quantization_record(model) if isinstance(parts.layers[0].linears()["q"], QuantLinear) else None
    off = QuantSpec(bits=16)
    linears: dict[str, ExportLinear] = {}
    for layer in parts.layers:
        for role, lin in layer.linears().items():
            path = f"{adapter.layers}.{layer.index}.{getattr(adapter.layer, role)}"
            qt = getattr(lin, "quantized", None)
            w = lin.weight.detach().float().clone()
            if qt is not None:
                qt = _normalized(qt, w.shape)
            bias = lin.bias.detach().float().clone() if getattr(lin, "bias", None) is not None else None
            linears[path] = ExportLinear(w, qt, bias)
    weight = record.weight if record is not None else off
    done = {f"{p}.{n}" for p in linears for n in ("weight", "bias")}
    tensors = {k: v.detach().float().clone() for k, v in model.state_dict().items() if k not in done}
    # A tied model keeps one table: give the head its own copy under its own name.
    tensors.setdefault(f"{adapter.lm_head}.weight", parts.lm_head.weight.detach().float().clone())
    rotations = getattr(model, "spinquant_rotations", None)
    return ExportSource(
        config=clean_config(model.config), adapter=adapter, linears=linears, tensors=tensors, weight=weight,
        act=record.act if record else off, key=record.key if record else off,
        value=record.value if record else off, r3=parts.head_dim if record and record.r3 else None,
        r4=parts.intermediate_size if record and record.r4 else None,
        rotation="none" if rotations is None else "merged",
        rotations=rotations, tokenizer=tokenizer, source_name=getattr(model, "spinquant_source", None),
    )


def _float_table(prefix: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if f"{prefix}.qweight" in tensors:  # int8 per row
        return tensors.pop(f"{prefix}.qweight").float() * tensors.pop(f"{prefix}.scale").float()[:, None]
    if f"{prefix}.weight" in tensors:
        return tensors.pop(f"{prefix}.weight").float()
    return None


def source_from_checkpoint(path: str | Path, verify: bool = True) -> ExportSource:
    """Read a folder saved by `spinquant quantize --output` (JSON + safetensors only, nothing unpickled)."""
    from transformers import AutoTokenizer

    from ..runtime.manifest import (
        check_layout,
        config_from_manifest,
        load_tensors,
        quant_specs,
        read_manifest,
    )
    from ..runtime.packing import unpack_codes

    path = Path(path)
    data, section = read_manifest(path, verify)
    weight, act, key, value = quant_specs(section, path)
    tensors = load_tensors(path)
    config = config_from_manifest(data, path)
    check_layout(config, section, weight, tensors, path)
    config = clean_config(config)
    adapter = adapter_for(config.model_type)
    linears: dict[str, ExportLinear] = {}
    for i in range(int(config.num_hidden_layers)):
        for role in ("q", "k", "v", "o", "gate", "up", "down"):
            prefix = f"{adapter.layers}.{i}.{getattr(adapter.layer, role)}"
            bias = tensors.pop(f"{prefix}.bias", None)
            bias = bias.float() if bias is not None else None
            if f"{prefix}.weight" in tensors:
                linears[prefix] = ExportLinear(tensors.pop(f"{prefix}.weight").float(), None, bias)
                continue
            if f"{prefix}.qweight" not in tensors:
                raise SpinQuantError(f"{path} lacks the weights of {prefix}; re-save the model")
            codes = unpack_codes(tensors.pop(f"{prefix}.qweight"), weight.bits, weight.symmetric).to(torch.int16)
            scale = tensors.pop(f"{prefix}.scale").float()
            zero = tensors.pop(f"{prefix}.zero", None)
            qt = _normalized(QuantizedTensor(codes, scale, zero.float() if zero is not None else None, weight.bits,
                                             weight.symmetric, weight.group_size), codes.shape)
            linears[prefix] = ExportLinear(qt.dequantize(), qt, bias)
    embedding = _float_table(adapter.embedding, tensors)
    tied = tensors.pop(f"{adapter.lm_head}.tied_transform", None)
    head = embedding @ tied.float() if tied is not None else _float_table(adapter.lm_head, tensors)
    if embedding is None or head is None:
        raise SpinQuantError(f"{path} lacks the embedding or lm_head table; re-save the model")
    rest = {k: v.float() for k, v in tensors.items()}
    rest[f"{adapter.embedding}.weight"] = embedding
    rest[f"{adapter.lm_head}.weight"] = head
    online = section.get("online_hadamard", {})
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    run_config = section.get("run_config") or {}
    return ExportSource(
        config=config, adapter=adapter, linears=linears, tensors=rest, weight=weight, act=act, key=key, value=value,
        r3=online.get("r3"), r4=online.get("r4"), rotation=section.get("rotation", {}).get("mode", "unknown"),
        tokenizer=AutoTokenizer.from_pretrained(str(path)) if has_tokenizer else None,
        tokenizer_dir=path if has_tokenizer else None, source_name=run_config.get("model"),
        extra={"checkpoint": str(path)},
    )


def as_source(model_or_path: Any, tokenizer: Any = None) -> ExportSource:
    """An ExportSource from an in-memory model, a checkpoint folder, or an ExportSource (returned as is)."""
    if isinstance(model_or_path, ExportSource):
        if tokenizer is not None:
            model_or_path.tokenizer = tokenizer
        return model_or_path
    if isinstance(model_or_path, (str, Path)):
        src = source_from_checkpoint(model_or_path)
        if tokenizer is not None:
            src.tokenizer = tokenizer
        return src
    if isinstance(model_or_path, nn.Module):
        return source_from_model(model_or_path, tokenizer)
    raise SpinQuantError(f"cannot export a {type(model_or_path).__name__}; pass a quantized model or a folder "
                         "saved by spinquant quantize --output")
