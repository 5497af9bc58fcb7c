"""The rotation set R1 (residual stream) and R2 (one per layer, value heads): build, check, save, load.

Two file layouts:
- ours: safetensors with `R1` and `layers.{i}.R2`, plus metadata (model type, sizes);
- the reference SpinQuant layout: a torch file (dict) with `R1` and `model.layers.{i}.self_attn.R2`,
  read with `torch.load(weights_only=True)` so a malicious pickle cannot run code.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RotationMode
from ..errors import SpinQuantError, unpickling_refusal
from ..io import atomic_path
from .hadamard import random_hadamard, random_orthogonal

ORTHOGONALITY_TOL = 1e-4  # float32-trained rotations sit around 1e-6; anything far above is not a rotation


@dataclass
class Rotations:
    r1: torch.Tensor  # [hidden, hidden]
    r2: list[torch.Tensor]  # per layer [head_dim, head_dim]

    def to(self, dtype: torch.dtype) -> Rotations:
        return Rotations(self.r1.to(dtype), [r.to(dtype) for r in self.r2])

    def check(self, hidden: int, head_dim: int, num_layers: int,
              fix: str = "retrain or use another rotation file") -> None:
        """Refuse rotations of the wrong shape, non-finite or non-orthogonal ones, naming the problem. Every
        rotation that comes from a file (rotation files, training checkpoints) passes here before use."""
        if len(self.r2) != num_layers:
            raise SpinQuantError(
                f"rotation file has R2 for {len(self.r2)} layers, the model has {num_layers}; "
                "use a rotation file trained for this model"
            )
        for name, r, n in [("R1", self.r1, hidden)] + [(f"R2[{i}]", r, head_dim) for i, r in enumerate(self.r2)]:
            if tuple(r.shape) != (n, n):
                raise SpinQuantError(
                    f"{name} has shape {tuple(r.shape)}, expected ({n}, {n}); "
                    "use a rotation file trained for this model"
                )
            check_orthogonal(name, r, fix)


def check_orthogonal(name: str, r: torch.Tensor, fix: str) -> None:
    """Refuse a matrix that is not a finite orthogonal one (RᵀR = I to ORTHOGONALITY_TOL)."""
    if not r.is_floating_point() or not torch.isfinite(r).all():
        raise SpinQuantError(f"{name} contains NaN or inf; {fix}")
    r64 = r.double()
    err = (r64.T @ r64 - torch.eye(r.shape[-1], dtype=torch.float64)).abs().max().item()
    if err > ORTHOGONALITY_TOL:
        raise SpinQuantError(f"{name} is not orthogonal (max |RᵀR - I| = {err:.2e}); it is not a rotation: {fix}")


def make_rotations(
    mode: RotationMode, hidden: int, head_dim: int, num_layers: int, seed: int = 0, r1: bool = True
) -> Rotations | None:
    """Fixed rotations: random Hadamard (QuaRot-style, and learned ones' start) or Haar-random orthogonal.
    None for RotationMode.NONE. r1=False: R1 is the identity (R2 alone)."""
    mode = RotationMode(mode)
    if not mode.rotates:
        return None
    gen = torch.Generator().manual_seed(seed)
    make = random_hadamard if mode.needs_hadamard else random_orthogonal
    # An impossible size raises HadamardSizeError, itself a SpinQuantError with the fix in its message.
    first = make(hidden, generator=gen) if r1 else torch.eye(hidden)
    return Rotations(first, [make(head_dim, generator=gen) for _ in range(num_layers)])


REFERENCE_R2 = re.compile(r"model\.layers\.(\d+)\.self_attn\.R2$")
OURS_R2 = re.compile(r"layers\.(\d+)\.R2$")


def _from_dict(d: dict[str, torch.Tensor], pattern: re.Pattern, path: Path) -> Rotations:
    if "R1" not in d:
        raise SpinQuantError(f"{path} holds no R1 tensor; pass a SpinQuant rotation file")
    r2 = {}
    for key, value in d.items():
        m = pattern.match(key)
        if m:
            r2[int(m.group(1))] = value
    if sorted(r2) != list(range(len(r2))):
        raise SpinQuantError(f"{path} has gaps in its per-layer R2 tensors; pass a complete rotation file")
    return Rotations(d["R1"].float(), [r2[i].float() for i in range(len(r2))])


def save_rotations(rot: Rotations, path: str | Path, layout: str = "ours", overwrite: bool = False) -> Path:
    """Write R1/R2 atomically. layout='ours' (safetensors) or 'reference' (torch dict, SpinQuant's R.bin)."""
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        if layout == "reference":
            d = {"R1": rot.r1.float().contiguous()}
            d.update({f"model.layers.{i}.self_attn.R2": r.float().contiguous() for i, r in enumerate(rot.r2)})
            torch.save(d, tmp)
        elif layout == "ours":
            from safetensors.torch import save_file

            d = {"R1": rot.r1.float().contiguous()}
            d.update({f"layers.{i}.R2": r.float().contiguous() for i, r in enumerate(rot.r2)})
            save_file(d, str(tmp), metadata={"format": "spinquant-rotations", "version": "1"})
        else:
            raise SpinQuantError(f"rotation layout {layout!r} is unknown; use ours or reference")
    return path


def load_rotations(path: str | Path) -> Rotations:
    """Read either layout, detected from the file's first bytes; never unpickles code."""
    path = Path(path)
    if path.is_dir():
        raise SpinQuantError(f"rotation file {path} is a directory; pass the rotation file itself "
                             "(written by --save-rotation)")
    if not path.is_file():
        raise SpinQuantError(f"rotation file {path} not found; pass a file written by --save-rotation")
    head = path.read_bytes()[:8]
    try:
        if head[:2] == b"PK" or head[:1] == b"\x80":  # torch zip archive or legacy pickle
            # A file object, not the path: torch.load would hand a *.safetensors name to safetensors.
            with path.open("rb") as f:
                d = torch.load(f, map_location="cpu", weights_only=True)
            if not isinstance(d, dict):
                raise SpinQuantError(f"{path} is not a dict of tensors; pass a SpinQuant rotation file")
            return _from_dict(d, REFERENCE_R2, path)
        from safetensors.torch import load_file

        return _from_dict(load_file(str(path)), OURS_R2, path)
    except SpinQuantError:
        raise
    except pickle.UnpicklingError as e:  # weights_only=True met code or objects other than tensors
        raise SpinQuantError(
            f"rotation file {path} holds more than tensors ({unpickling_refusal(e)}); refused, nothing in it "
            "was run: use a file written by --save-rotation or SpinQuant's R.bin from a trusted source"
        ) from None
    except Exception as e:  # noqa: BLE001 - corrupt or truncated files fail in many ways; all mean "re-save"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SpinQuantError(
            f"cannot read rotation file {path} ({first}); it is corrupt or not a rotation file: "
            "re-save it with --save-rotation"
        ) from None
