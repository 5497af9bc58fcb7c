"""Exports a quantized model to formats other tools read.

- `compressed-tensors`: a Hugging Face folder vLLM and transformers load (packed int weights, R4 as an online
  transform) — `export_compressed_tensors`
- `gguf`: a llama.cpp file (R1/R2 merged; models quantized without R3/R4) — `export_gguf`
- `rotations`: R1/R2 in the reference SpinQuant layout (R.bin) — `export_rotations`

Each takes the in-memory model after `spinquant.quantize`; the first two also take a folder saved by
`spinquant quantize --output`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RotationMode
from ..errors import SpinQuantError
from .compressed_tensors import export_compressed_tensors, load_compressed_tensors
from .gguf import WEIGHT_TYPES, export_gguf
from .rotations import export_rotations
from .source import ExportSource, as_source, source_from_checkpoint, source_from_model

FORMATS = ("compressed-tensors", "gguf", "rotations")
DTYPE_CHOICES = ("bfloat16", "float16", "float32")


@dataclass
class ExportRequest:
    """One export asked for on the command line (or by a Python caller of api.run_quantize)."""

    format: str
    output: str
    gguf_type: str = "Q8_0"  # GGUF: Q8_0, Q5_0, Q4_0 or F16
    gguf_tables: str | None = None  # GGUF embedding / output type (default Q8_0; F16 for an F16 export)
    dtype: str = "bfloat16"  # compressed-tensors: storage of scales and float tensors
    overwrite: bool = False


def export(model: Any, tokenizer: Any, fmt: str, out: str | Path, overwrite: bool = False,
           gguf_type: str = "Q8_0", dtype: str = "bfloat16", gguf_tables: str | None = None) -> Path:
    """Dispatch on the format name. `model`: the in-memory quantized model or a `quantize --output` folder."""
    if fmt == "compressed-tensors":
        return export_compressed_tensors(model, tokenizer, out, dtype=dtype, overwrite=overwrite)
    if fmt == "gguf":
        return export_gguf(model, tokenizer, out, weight_type=gguf_type, overwrite=overwrite, table_type=gguf_tables)
    if fmt == "rotations":
        return export_rotations(model, out, overwrite=overwrite)
    raise SpinQuantError(f"export format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")


def run_export(model: Any, tokenizer: Any, request: ExportRequest, verify: bool = True) -> Path:
    if isinstance(model, (str, Path)):  # a saved folder: read (and, unless told not to, verify) it once here
        from .source import source_from_checkpoint

        model = source_from_checkpoint(model, verify=verify)
    return export(model, tokenizer, request.format, request.output, overwrite=request.overwrite,
                  gguf_type=request.gguf_type, dtype=request.dtype, gguf_tables=request.gguf_tables)


def check_request(request: ExportRequest, cfg: Any = None) -> None:
    """Refuse an export that cannot work before any quantization time is spent (cfg: the RunConfig)."""
    from ..io import check_writable

    if request.format not in FORMATS:
        raise SpinQuantError(f"export format {request.format!r} is unknown; use one of {', '.join(FORMATS)}")
    if request.gguf_type not in WEIGHT_TYPES:
        raise SpinQuantError(f"GGUF weight type {request.gguf_type!r} is unknown; use one of "
                             f"{', '.join(WEIGHT_TYPES)}")
    if request.dtype not in DTYPE_CHOICES:
        raise SpinQuantError(f"export dtype {request.dtype!r} is unknown; use one of {', '.join(DTYPE_CHOICES)}")
    if not request.output:
        raise SpinQuantError(f"--export {request.format} needs --export-output PATH")
    check_writable(Path(request.output), request.overwrite)
    if cfg is None:
        return
    rotated = cfg.rotation.mode != RotationMode.NONE
    if request.format == "gguf" and rotated and (cfg.rotation.r3 or cfg.rotation.r4):
        raise SpinQuantError("llama.cpp has no online Hadamard (R3/R4); add --no-r3 --no-r4 for a GGUF export "
                             "(R1/R2 are merged and kept)")
    if request.format == "rotations" and not rotated:
        raise SpinQuantError("--rotation none has no R1/R2 to export; use --rotation hadamard, random or learned")
    if request.format == "compressed-tensors" and not cfg.quant.weight.enabled:
        raise SpinQuantError("compressed-tensors export needs quantized weights; use --w-bits 2-8")


__all__ = [
    "DTYPE_CHOICES",
    "FORMATS",
    "WEIGHT_TYPES",
    "ExportRequest",
    "ExportSource",
    "as_source",
    "check_request",
    "export",
    "export_compressed_tensors",
    "export_gguf",
    "export_rotations",
    "load_compressed_tensors",
    "run_export",
    "source_from_checkpoint",
    "source_from_model",
]
