"""Save a quantized model as a folder of packed safetensors + JSON (the format: runtime/manifest.py), and
load it back into runtime modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import QuantizedAs, RunConfig, layer_spec
from ..errors import SpinQuantError
from ..io import atomic_path
from ..models import model_parts
from ..quant.modules import QuantLinear
from ..quant.quantizer import QuantizedTensor
from ..quant.tables import TABLE_STORAGE, model_storage, resolve_head_storage, table_of
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    RESAVE,
    WEIGHTS_FILE,
    check_layout,
    config_digest,
    config_from_manifest,
    load_tensors,
    quant_specs,
    read_manifest,
    sha256_file,
    spec_to_dict,
)
from .model import build_model
from .packing import pack_codes

# How ≤4-bit linears run: "native" reads packed codes with the compiled kernel where it applies (the
# default); "cached" dequantizes weight-only layers once and keeps int8 codes for integer ones; "otf" /
# "int4pack" are the other weight-only variants of runtime.modules.WeightOnlyLinear.
WEIGHT_KERNELS = ("native", "cached", "otf", "int4pack")


def _table(prefix: str, module: torch.nn.Module, storage: str, out: dict) -> None:
    """Embedding or lm_head: int8 per row (symmetric, plain min-max; the model's own codes once
    `apply_tables` has run) or a float copy."""
    table = table_of(module, storage)
    if isinstance(table, QuantizedTensor):
        out[f"{prefix}.qweight"] = table.codes.contiguous()
        out[f"{prefix}.scale"] = table.scale.float().contiguous()
    else:
        out[f"{prefix}.weight"] = table.to(TABLE_STORAGE[storage]).contiguous()


def quantization_record(model) -> QuantizedAs:
    """What the pipeline recorded on `model` when it quantized it, checked against the installed modules
    (every linear on its role's grid, the same online Hadamards): the specs a save writes."""
    done = getattr(model, "spinquant_quantized_as", None)
    parts = model_parts(model)
    by_role = [(i, role, lin) for i, layer in enumerate(parts.layers) for role, lin in layer.linears().items()]
    linears = [lin for *_, lin in by_role]
    if done is None or not linears or not all(isinstance(lin, QuantLinear) for lin in linears):
        raise SpinQuantError("the model was not quantized by spinquant.quantize (no record of it on the model); "
                             "run spinquant.quantize first")
    specs = done.weight_specs() if done.weight.enabled else None
    kv = getattr(parts.layers[0].attention, "kv_quant", None)
    installed_ok = (all((lin.quantized is None) == (specs is None) for lin in linears)
                    and all(lin.quantized.bits == layer_spec(specs, i, role).bits
                            and lin.quantized.symmetric == specs[role].symmetric
                            for i, role, lin in by_role if specs is not None)
                    and all(lin.act_quant.spec == done.act for lin in linears)
                    and bool(kv is not None and kv.rotate_qk) == done.r3
                    and all((layer.down.input_transform is not None) == done.r4 for layer in parts.layers))
    if not installed_ok:
        raise SpinQuantError("the model's quantized modules no longer match how it was quantized (edited after "
                             "spinquant.quantize?); re-run the quantization")
    return done


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
    done = quantization_record(model)
    if done.weight_role_bits:
        raise SpinQuantError("weights with other bits per role (--w-bits-role) are saved as GGUF only: use "
                             "--export gguf --gguf-type auto; the packed folder format holds one weight grid")
    weight, act, key, value, r3, r4 = done.weight, done.act, done.key, done.value, done.r3, done.r4
    parts = model_parts(model)
    rotation = done.rotation
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quantization": {"weight": spec_to_dict(weight), "act": spec_to_dict(act), "key": spec_to_dict(key),
                         "value": spec_to_dict(value),
                         "weight_method": done.weight_method,
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


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   weight_only: str = "native", head_act_bits: int = 8, verify: bool = True, fuse: bool = True):
    """(runtime model, tokenizer) from a folder written by `save_quantized`. Reads JSON and safetensors only."""
    from transformers import AutoTokenizer, GenerationConfig

    path = Path(path)
    if weight_only not in WEIGHT_KERNELS:
        raise SpinQuantError(f"weight kernel {weight_only!r} is unknown; use one of {', '.join(WEIGHT_KERNELS)}")
    data, section = read_manifest(path, verify)
    tensors = load_tensors(path)
    config = config_from_manifest(data, path)
    weight, *_ = quant_specs(section, path)
    check_layout(config, section, weight, tensors, path)
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
