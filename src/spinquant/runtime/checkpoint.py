"""Save a quantized model as a folder of packed safetensors + JSON, and load it back into runtime modules.

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

from ..config import QuantSpec, RunConfig
from ..errors import SpinQuantError
from ..io import atomic_path
from ..models import model_parts
from ..nn import QuantLinear
from ..quant.quantizer import QuantizedTensor
from ..quant.tables import TABLE_STORAGE, model_storage, resolve_head_storage, table_of
from .packing import pack_codes

FORMAT = "spinquant-packed"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
# How ≤4-bit linears run: "native" reads packed codes with the compiled kernel where it applies (the
# default); "cached" dequantizes weight-only layers once and keeps int8 codes for integer ones; "otf" /
# "int4pack" are the other weight-only variants of runtime.modules.WeightOnlyLinear.
WEIGHT_KERNELS = ("native", "cached", "otf", "int4pack")


def spec_to_dict(spec: QuantSpec) -> dict:
    return {"bits": spec.bits, "symmetric": spec.symmetric, "group_size": spec.group_size,
            "clip_ratio": spec.clip_ratio}


def spec_from_dict(d: dict) -> QuantSpec:
    return QuantSpec(bits=int(d["bits"]), symmetric=bool(d["symmetric"]), group_size=d.get("group_size"),
                     clip_ratio=float(d.get("clip_ratio", 1.0)))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _table(prefix: str, module: torch.nn.Module, storage: str, out: dict) -> None:
    """Embedding or lm_head: int8 per row (symmetric, plain min-max; the model's own codes once
    `apply_tables` has run) or a float copy."""
    table = table_of(module, storage)
    if isinstance(table, QuantizedTensor):
        out[f"{prefix}.qweight"] = table.codes.contiguous()
        out[f"{prefix}.scale"] = table.scale.float().contiguous()
    else:
        out[f"{prefix}.weight"] = table.to(TABLE_STORAGE[storage]).contiguous()


def _quantized_specs(model) -> tuple[QuantSpec, QuantSpec, QuantSpec, QuantSpec, bool, bool]:
    """Weight / activation / K / V specs and R3 / R4 as installed in the model (not as requested)."""
    parts = model_parts(model)
    linears = [lin for layer in parts.layers for lin in layer.linears().values()]
    if not linears or not all(isinstance(lin, QuantLinear) for lin in linears):
        raise SpinQuantError("the model is not quantized (no QuantLinear modules); run spinquant.quantize first")
    first = linears[0].quantized
    if first is not None:
        weight = QuantSpec(bits=first.bits, symmetric=first.symmetric, group_size=first.group_size)
    else:
        weight = QuantSpec(bits=16)
    if any((lin.quantized is None) != (first is None) for lin in linears):
        raise SpinQuantError("only some linears have quantized weights; re-run the quantization")
    act = linears[0].act_quant.spec
    kv = getattr(parts.layers[0].attention, "kv_quant", None)
    key = kv.key_quant.spec if kv is not None else QuantSpec(bits=16)
    value = kv.value_quant.spec if kv is not None else QuantSpec(bits=16)
    r3 = bool(kv is not None and kv.rotate_qk)
    r4 = parts.layers[0].down.input_transform is not None
    return weight, act, key, value, r3, r4


def collect_tensors(model, embedding: str = "int8", lm_head: str = "int8",
                    head_transform: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every tensor to save, keyed by module path; quantized linears packed.

    lm_head "tied" (with `head_transform` M from `resolve_head_storage`): only M is stored for the head.
    """
    parts = model_parts(model)
    adapter = parts.adapter
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        qt = module.quantized
        if qt is None:
            out[f"{name}.weight"] = module.weight.detach().float().contiguous()
        else:
            out[f"{name}.qweight"] = pack_codes(qt.codes, qt.bits, qt.symmetric)
            out[f"{name}.scale"] = qt.scale.float().contiguous()
            if not qt.symmetric:
                out[f"{name}.zero"] = qt.zero.round().to(torch.uint8).contiguous()
        if module.bias is not None:
            out[f"{name}.bias"] = module.bias.detach().float().contiguous()
        done.update({f"{name}.weight", f"{name}.bias"})
    _table(adapter.embedding, parts.embedding, embedding, out)
    if lm_head == "tied":
        out[f"{adapter.lm_head}.tied_transform"] = head_transform.contiguous()
    else:
        _table(adapter.lm_head, parts.lm_head, lm_head, out)
    done.update({f"{adapter.embedding}.weight", f"{adapter.lm_head}.weight"})
    if getattr(parts.lm_head, "bias", None) is not None:
        out[f"{adapter.lm_head}.bias"] = parts.lm_head.bias.detach().float().contiguous()
        done.add(f"{adapter.lm_head}.bias")
    for key, tensor in model.state_dict().items():
        if key not in done and key not in out:
            # clone: safetensors refuses tensors that share storage (e.g. views of one buffer)
            out[key] = tensor.detach().clone().contiguous()
    return out


def spinquant_section(model, cfg: RunConfig | None, embedding: str, lm_head: str) -> dict:
    weight, act, key, value, r3, r4 = _quantized_specs(model)
    parts = model_parts(model)
    rotation = cfg.rotation.mode if cfg is not None else "unknown"
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quantization": {"weight": spec_to_dict(weight), "act": spec_to_dict(act), "key": spec_to_dict(key),
                         "value": spec_to_dict(value),
                         "weight_method": cfg.quant.weight_method if cfg is not None else "unknown",
                         "label": f"W{weight.bits}A{act.bits}KV{key.bits}"},
        "rotation": {"mode": rotation, "r1_r2": "merged into the weights" if rotation != "none" else "none"},
        "online_hadamard": {"r3": parts.head_dim if r3 else None, "r4": parts.intermediate_size if r4 else None},
        "embedding": embedding,
        "lm_head": lm_head,
        "packing": "codes stored as code - qmin; <=4 bits: two per byte, low nibble = even index",
        "run_config": cfg.to_dict() if cfg is not None else None,
    }


def _plain_config(model) -> dict:
    """config.json's content for a packed model: untied, without the fake-quant attention choice and
    without a source quantization (GGUF) that the packed weights no longer have."""
    config = model.config.to_dict()
    for k in [k for k in config if "attn_implementation" in k or k == "quantization_config"]:
        config.pop(k)
    config["tie_word_embeddings"] = False
    return config


def freeze(model, cfg: RunConfig | None = None) -> tuple[torch.nn.Module, int]:
    """(the packed runtime model, its checkpoint bytes) for a model `pipeline.quantize_model` quantized.

    The same tensors `save_quantized` writes go through the same builder `load_quantized` uses, in memory:
    evaluating or timing the result is evaluating the saved model, without writing it."""
    from transformers import AutoConfig

    from .model import build_model

    parts = model_parts(model)
    embedding = model_storage(parts)
    lm_head, head_transform = resolve_head_storage(parts, embedding, "auto")
    section = spinquant_section(model, cfg, embedding, lm_head)
    tensors = collect_tensors(model, embedding, lm_head, head_transform)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    data = _plain_config(model)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    runtime = build_model(config, tensors, section)
    runtime.generation_config = model.generation_config
    return runtime, size


def save_quantized(model, tokenizer, cfg: RunConfig | None, out_dir: str | Path, overwrite: bool = False,
                   embedding: str | None = None, lm_head: str = "auto") -> Path:
    """Write the quantized `model` (after `pipeline.quantize_model`) as a packed checkpoint folder.

    embedding / lm_head: "int8" (per row), "float16", "bfloat16" or "float32"; lm_head may also be "tied"
    (share the embedding table through a hidden x hidden matrix: models that were tied) or "auto" (tied
    when that fits, else like the embedding). embedding None: the tables the model already computes with
    (RunConfig.tables, applied by quantize_model), so the saved model computes exactly what it did.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    parts = model_parts(model)
    if embedding is None:
        embedding = model_storage(parts)
    lm_head, head_transform = resolve_head_storage(parts, embedding, lm_head)
    section = spinquant_section(model, cfg, embedding, lm_head)
    tensors = collect_tensors(model, embedding, lm_head, head_transform)
    config = _plain_config(model)
    with atomic_path(out_dir, overwrite=overwrite, directory=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "spinquant": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(tmp))
        files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != "config.json")
        section["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in files}
        config["spinquant"] = section
        section["config_sha256"] = config_digest(config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    return out_dir


# ------------------------------------------------------------------------------------------------------


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
    if verify:
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


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   weight_only: str = "native", head_act_bits: int = 8, verify: bool = True, fuse: bool = True):
    """(runtime model, tokenizer) from a folder written by `save_quantized`. Reads JSON and safetensors only."""
    from transformers import AutoTokenizer, GenerationConfig

    path = Path(path)
    if weight_only not in WEIGHT_KERNELS:
        raise SpinQuantError(f"weight kernel {weight_only!r} is unknown; use one of {', '.join(WEIGHT_KERNELS)}")
    data, section = read_manifest(path, verify)
    if not verify:
        print(f"spinquant: warning: --no-verify: {path} is loaded without checking its sha256 manifest",
              file=sys.stderr)
    tensors = load_tensors(path)
    config = config_from_manifest(data, path)
    weight, *_ = quant_specs(section, path)
    check_layout(config, section, weight, tensors, path)
    from .model import build_model

    model = build_model(config, tensors, section, dtype=dtype, weight_only=weight_only,
                        head_act_bits=head_act_bits, fuse=fuse)
    try:
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path)) if any(
            (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")) else None
    except (OSError, ValueError, TypeError, KeyError) as e:  # only reachable unverified: the digests cover these
        raise SpinQuantError(f"cannot read the tokenizer or generation config in {path} ({e}); {RESAVE}") from None
    model.to(device)
    model.spinquant_source = str(path)
    return model, tokenizer


def load(path: str | Path, **kwargs):
    """`spinquant.load(DIR)`: the runtime model (its tokenizer is at `model.tokenizer`)."""
    model, tokenizer = load_quantized(path, **kwargs)
    model.tokenizer = tokenizer
    return model
