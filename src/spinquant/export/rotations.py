"""Export R1/R2 in the reference SpinQuant layout (`R.bin`: a torch dict read by torchao / ExecuTorch tooling)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SpinQuantError
from ..rotation.sets import Rotations, save_rotations


def export_rotations(model: Any, out_path: str | Path, overwrite: bool = False) -> Path:
    """Write the rotations a model was quantized with (`model.spinquant_rotations`, or a Rotations) as R.bin.

    Checkpoint folders hold the merged weights only, not R1/R2: save rotations with --save-rotation at quantize
    time, or export them from the in-memory model right after `spinquant.quantize`.
    """
    if isinstance(model, (str, Path)):
        raise SpinQuantError(f"{model} holds R1/R2 merged into its weights, not the rotations themselves; use "
                             "spinquant quantize ... --export rotations, or --save-rotation FILE")
    rotations = model if isinstance(model, Rotations) else getattr(model, "spinquant_rotations", None)
    if rotations is None:
        raise SpinQuantError("this model has no R1/R2 (quantized with --rotation none, or not quantized); "
                             "quantize with --rotation hadamard, random or learned")
    return save_rotations(rotations, out_path, layout="reference", overwrite=overwrite)
