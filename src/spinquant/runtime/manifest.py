"""The saved checkpoint format, read in one place: its layout, manifest and the checks on them.

Written by runtime/checkpoint.py (save_quantized); read here for the loader (runtime/checkpoint.py) and every
exporter (export/source.py).

Layout of DIR (nothing in it is ever unpickled):
    config.json         the transformers config (untied) plus a "spinquant" section: format version, the
                        quantization specs (weights, activations, K, V), rotations (R1/R2 merged, online
                        Hadamard sizes for R3 and R4), how embedding / lm_head are stored, the full
                        RunConfig, the sha256 of every other file and of config.json itself
    model.safetensors   per decoder linear `<path>.qweight` (uint8: codes - qmin, two 4-bit codes per byte,
                        low nibble first; one byte per code above 4 bits), `<path>.scale` (float32, [out] or
                        [out, groups]), `<path>.zero` (uint8, asymmetric weights only), `<path>.bias`;
                        embedding / lm_head as `<path>.qweight` int8 + `<path>.scale` float32 per row, or
                        `<path>.weight` in 16/32-bit; a tied lm_head as `lm_head.tied_transform` only
                        (float32 [hidden, hidden] M: logits = (x·Mᵀ)·embeddingᵀ); norms as floats
    tokenizer files, generation_config.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from ..config import QuantSpec
from ..errors import SpinQuantError
from ..models import model_parts
from ..quant.tables import TABLE_STORAGE

FORMAT = "spinquant-packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


def spec_to_dict(spec: QuantSpec) -> dict:
    return {"bits": spec.bits, "symmetric": spec.symmetric, "group_size": spec.group_size,
            "clip_ratio": spec.clip_ratio, "full_range": spec.full_range}


def spec_from_dict(d: dict) -> QuantSpec:
    return QuantSpec(bits=int(d["bits"]), symmetric=bool(d["symmetric"]), group_size=d.get("group_size"),
                     clip_ratio=float(d.get("clip_ratio", 1.0)), full_range=bool(d.get("full_range", False)))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def read_section(path: str | Path) -> dict | None:
    """The "spinquant" section of DIR/config.json, or None when DIR is not a spinquant checkpoint."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    section = data.get("spinquant") if isinstance(data, dict) else None
    return section if isinstance(section, dict) else None


def weights_written_by_spinquant(path: str | Path) -> bool:
    """Whether DIR/model.safetensors carries our format tag (its header, read without loading tensors)."""
    f = Path(path) / WEIGHTS_FILE
    if not f.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as handle:
            return (handle.metadata() or {}).get("spinquant") == FORMAT
    except Exception:  # noqa: BLE001 - an unreadable header is not our tag
        return False


def is_quantized_checkpoint(path: str | Path) -> bool:
    """A folder saved by spinquant: its config.json says so, or its weights do (a config.json that lost its
    section must not load as a plain Hugging Face model with random weights)."""
    return read_section(path) is not None or weights_written_by_spinquant(path)


def config_digest(config: dict) -> str:
    """sha256 of config.json's content (canonical JSON), leaving out the digest itself."""
    section = {k: v for k, v in config.get("spinquant", {}).items() if k != "config_sha256"}
    canonical = json.dumps({**config, "spinquant": section}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


RESAVE = "re-save the model (spinquant quantize --output DIR)"


def read_manifest(path: str | Path, verify: bool = True) -> tuple[dict, dict]:
    """(config.json without its section, the "spinquant" section) of a saved folder: the one reader of the
    format, for loading and exporting alike. Refuses, in one line each: a missing or malformed config.json,
    a missing section, another format or version, and (verify) a missing manifest or any file or config
    value that differs from its recorded sha256. verify=False (`--no-verify`) skips the digests only."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SpinQuantError(f"{path} is not a model folder (no config.json); pass a folder saved by "
                             "spinquant quantize --output DIR")
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpinQuantError(f"{cfg_file} is not readable JSON ({type(e).__name__}: {e}); {RESAVE}") from None
    if not isinstance(data, dict):
        raise SpinQuantError(f"{cfg_file} holds a JSON {type(data).__name__}, not an object; {RESAVE}")
    section = data.pop("spinquant", None)
    if section is None:
        if weights_written_by_spinquant(path):
            raise SpinQuantError(f"{cfg_file} has lost its 'spinquant' section, but the weights are spinquant's; "
                                 f"the folder was edited: {RESAVE}")
        raise SpinQuantError(f"{path} is not a spinquant checkpoint (no 'spinquant' in config.json); save one with "
                             "spinquant quantize --output DIR")
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        raise SpinQuantError(f"{path} is not a {FORMAT} checkpoint (config.json's spinquant.format is "
                             f"{section.get('format') if isinstance(section, dict) else section!r}); {RESAVE}")
    version = section.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise SpinQuantError(f"{path} has checkpoint format version {version!r}; this spinquant reads version "
                             f"{FORMAT_VERSION}: upgrade spinquant or {RESAVE}")
    if not verify:  # the one place that skips the digests, so the one place that says so
        print(f"spinquant: warning: --no-verify: {path} is read without checking its sha256 manifest",
              file=sys.stderr)
    else:
        files, digest = section.get("files"), section.get("config_sha256")
        if not (isinstance(files, dict) and WEIGHTS_FILE in files and isinstance(digest, str)):
            raise SpinQuantError(f"{path} has no integrity manifest (the sha256 of config.json and of "
                                 f"{WEIGHTS_FILE}); {RESAVE}, or pass --no-verify to load it unchecked")
        if config_digest({**data, "spinquant": section}) != digest:
            raise SpinQuantError(f"{cfg_file} does not match its recorded sha256 (edited or corrupted); {RESAVE}")
        verify_files(path, files)
    return data, section


def quant_specs(section: dict, path: str | Path = "") -> tuple[QuantSpec, QuantSpec, QuantSpec, QuantSpec]:
    """The weight / activation / K / V specs a checkpoint declares, validated."""
    try:
        q = section["quantization"]
        specs = tuple(spec_from_dict(q[k]) for k in ("weight", "act", "key", "value"))
        for spec, what in zip(specs, ("weight", "activation", "key-cache", "value-cache")):
            spec.validate(what)
    except (KeyError, TypeError, ValueError, SpinQuantError) as e:
        raise SpinQuantError(f"{path} declares an invalid quantization ({e}); {RESAVE}") from None
    return specs  # type: ignore[return-value]


def config_from_manifest(data: dict, path: str | Path = ""):
    """The transformers config of a checkpoint's config.json (without its section), refusing what
    transformers cannot build in one line."""
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if not isinstance(model_type, str):
        raise SpinQuantError(f"{path}/config.json has no model_type; {RESAVE}")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError, KeyError) as e:
        raise SpinQuantError(f"{path}/config.json does not describe a {model_type} model ({e}); {RESAVE}") from None


def _expect(tensors: dict, key: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...], path) -> None:
    t = tensors.get(key)
    if t is None:
        raise SpinQuantError(f"{path} lacks the tensor {key}; {RESAVE}")
    if tuple(t.shape) != shape or t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise SpinQuantError(f"{path}: {key} is {str(t.dtype).replace('torch.', '')} {tuple(t.shape)}, the declared "
                             f"layout needs {want} {shape}; {RESAVE}")


FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_layout(config, section: dict, weight: QuantSpec, tensors: dict[str, torch.Tensor], path="") -> None:
    """Every saved tensor has the dtype and shape the declared layout gives it (codes two per byte at ≤ 4
    bits, a scale per row or group, a zero point only for asymmetric weights, tables as declared), and no
    tensor is missing or left over. A checkpoint with consistent digests can still be wrong here (written
    by hand or by a buggy tool): this is what keeps it from computing nonsense."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parts = model_parts(model)
    adapter = parts.adapter
    expected = dict(model.state_dict())
    seen: set[str] = set()
    for layer in parts.layers:
        for role, lin in layer.linears().items():
            prefix = f"{adapter.layers}.{layer.index}.{getattr(layer.names, role)}"
            n, k = lin.out_features, lin.in_features
            expected.pop(f"{prefix}.weight", None)
            if f"{prefix}.weight" in tensors:
                _expect(tensors, f"{prefix}.weight", (n, k), FLOATS, path)
                seen.add(f"{prefix}.weight")
            else:
                group = weight.group_size if weight.group_size not in (None, k) else k
                if k % group:
                    raise SpinQuantError(f"{path}: weight group size {group} does not divide {prefix}'s {k} inputs; "
                                         f"{RESAVE}")
                width = k // 2 if weight.bits <= 4 else k
                _expect(tensors, f"{prefix}.qweight", (n, width), (torch.uint8,), path)
                scale_shape = (n,) if group == k else (n, k // group)
                if tuple(tensors.get(f"{prefix}.scale", torch.empty(0)).shape) == (n, 1):
                    scale_shape = (n, 1)
                _expect(tensors, f"{prefix}.scale", scale_shape, (torch.float32,), path)
                seen.update({f"{prefix}.qweight", f"{prefix}.scale"})
                if not weight.symmetric:
                    _expect(tensors, f"{prefix}.zero", scale_shape, (torch.uint8,), path)
                    seen.add(f"{prefix}.zero")
            if f"{prefix}.bias" in tensors:
                _expect(tensors, f"{prefix}.bias", (n,), FLOATS, path)
                seen.add(f"{prefix}.bias")
                expected.pop(f"{prefix}.bias", None)
    vocab, hidden = parts.embedding.weight.shape
    tables = [(adapter.embedding, section.get("embedding"))]
    if section.get("lm_head") == "tied":
        _expect(tensors, f"{adapter.lm_head}.tied_transform", (hidden, hidden), FLOATS, path)
        seen.add(f"{adapter.lm_head}.tied_transform")
    else:
        tables.append((adapter.lm_head, section.get("lm_head")))
    for prefix, storage in tables:
        if storage == "int8":
            _expect(tensors, f"{prefix}.qweight", (vocab, hidden), (torch.int8,), path)
            _expect(tensors, f"{prefix}.scale", (vocab,), (torch.float32,), path)
            seen.update({f"{prefix}.qweight", f"{prefix}.scale"})
        elif storage in TABLE_STORAGE:
            _expect(tensors, f"{prefix}.weight", (vocab, hidden), (TABLE_STORAGE[storage],), path)
            seen.add(f"{prefix}.weight")
        else:
            raise SpinQuantError(f"{path} declares {prefix} stored as {storage!r}, which this spinquant does not "
                                 f"know; {RESAVE}")
    for prefix in (adapter.embedding, adapter.lm_head):
        expected.pop(f"{prefix}.weight", None)
    if f"{adapter.lm_head}.bias" in tensors:
        _expect(tensors, f"{adapter.lm_head}.bias", (vocab,), FLOATS, path)
        seen.add(f"{adapter.lm_head}.bias")
        expected.pop(f"{adapter.lm_head}.bias", None)
    for key, meta in expected.items():  # norms and the like: plain floats of the model's own shapes
        _expect(tensors, key, tuple(meta.shape), FLOATS, path)
        seen.add(key)
    left = sorted(set(tensors) - seen)
    if left:
        raise SpinQuantError(f"{path} holds {len(left)} tensors the declared layout has no place for (e.g. "
                             f"{left[0]}); {RESAVE}")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as e:
        raise SpinQuantError(f"cannot read {path / WEIGHTS_FILE} ({e}); {RESAVE}") from None


def verify_files(path: Path, files: dict[str, str]) -> None:
    """Refuse a checkpoint whose files are missing, truncated or modified."""
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise SpinQuantError(f"{f} is missing from the checkpoint; {RESAVE}")
        if sha256_file(f) != digest:
            raise SpinQuantError(f"{f} does not match its recorded sha256 (corrupted, truncated or modified); "
                                 f"{RESAVE}")
