"""Export as a compressed-tensors checkpoint (the format vLLM and `transformers` load): pack-quantized weights.

transformers (5.x) decompresses the weights but does not apply `transform_config`: a model with R4 needs vLLM
or `load_compressed_tensors`; one quantized with --no-r4 runs in stock transformers. The export prints what a
reader will not run (R4 for transformers, the K/V quantization, the activation clip) and keeps the list in
config.json.

Layout of OUT (a Hugging Face model folder):
    config.json        the model's config (untied) with `quantization_config` in the compressed-tensors schema:
                       one config group targeting the decoder linears, `format: pack-quantized`, channel or group
                       strategy, dynamic per-token (or per-group) activations in `input_activations`, and R4 as
                       an online input transform on down_proj in `transform_config`
    model.safetensors  per decoder linear `weight_packed` (int32, codes densely packed as the library does),
                       `weight_scale` ([out, 1] or [out, groups]), `weight_zero_point` (asymmetric only, packed
                       along the output dim), `weight_shape`, `bias`; the R4 matrix as
                       `<down_proj>.R4_input.weight` (±1 entries, divided by √n at load); everything else float
    tokenizer files, generation_config.json

What has no place in that schema is left out and recorded under `spinquant_export` in config.json: the
activation clip ratio, and the K/V cache quantization with its R3 (R3 cancels in Q·Kᵀ, so a runtime that keeps
the cache in float or fp8 computes the same function without it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..config import QuantSpec
from ..errors import SpinQuantError
from ..io import atomic_path
from .source import ExportSource, as_source, hadamard_pm1

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
R4_SCHEME = "R4"
PACKED_FORMAT = "pack-quantized"


def _require_library():
    try:
        import compressed_tensors
    except ImportError:
        raise SpinQuantError("the compressed-tensors export needs the compressed-tensors package; install it with: "
                             "pip install 'spinquant[export]'") from None
    return compressed_tensors


def _pack(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed int8 codes → int32 words, 32 codes in `bits` words with no padding bits (the library's layout)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(codes.to(torch.int8).contiguous(), bits, packed_dim=dim)


def _scheme_args(spec: QuantSpec, dynamic: bool, row_strategy: str) -> dict:
    """compressed-tensors QuantizationArgs fields: one row (`row_strategy`) or groups along it."""
    args = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "dynamic": dynamic}
    if spec.group_size is None:
        args.update(strategy=row_strategy)
    else:
        args.update(strategy="group", group_size=spec.group_size)
    return args


def weight_args(spec: QuantSpec) -> dict:
    return _scheme_args(spec, dynamic=False, row_strategy="channel")


def activation_args(spec: QuantSpec) -> dict | None:
    """Dynamic per-token (or per-group) activation quantization; None when activations stay in float."""
    return _scheme_args(spec, dynamic=True, row_strategy="token") if spec.enabled else None


def quantization_config(src: ExportSource) -> dict:
    """The `quantization_config` block of config.json (validates against compressed-tensors' pydantic models)."""
    ct = _require_library()
    a = src.adapter
    # "Linear" minus lm_head is exactly the decoder linears; readers (vLLM) know how to match it against their
    # fused modules (qkv_proj, gate_up_proj).
    group = {"targets": ["Linear"], "weights": weight_args(src.weight),
             "input_activations": activation_args(src.act), "output_activations": None, "format": PACKED_FORMAT}
    config: dict[str, Any] = {
        "version": ct.__version__,
        "quant_method": "compressed-tensors",
        "format": PACKED_FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "kv_cache_scheme": None,
        "ignore": [a.lm_head],
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
    if src.r4:
        config["transform_config"] = {"config_groups": {R4_SCHEME: r4_scheme(src)}}
    return config


def r4_is_sylvester(n: int) -> bool:
    """Whether our R4 matrix is Sylvester's (vLLM then runs its fast Hadamard kernel instead of a matmul)."""
    if n & (n - 1):
        return False
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    return bool(torch.equal(hadamard_pm1(n), deterministic_hadamard_matrix(n, torch.float64)))


def r4_scheme(src: ExportSource) -> dict:
    """R4 as an online transform on down_proj's input; its inverse is already merged into the weight."""
    down = src.adapter.layer.down.replace(".", r"\.")
    # "hadamard" means Sylvester's matrix to every reader, so only claim it when ours is exactly that; other
    # orders (e.g. 1536 = 12·128) are Hadamard matrices too, applied from the stored weight.
    kind = "hadamard" if r4_is_sylvester(src.r4) else "random-hadamard"
    return {"type": kind, "apply": [{"targets": [f"re:.*{down}$"], "location": "input", "inverse": False,
                                     "ignore": []}],
            "randomize": False, "requires_grad": False, "head_dim": None, "precision": "float32"}


def validate_config(qconfig: dict) -> None:
    """Parse the block with the library's own pydantic models (raises on anything it would reject)."""
    _require_library()
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.transform import TransformConfig

    body = {k: v for k, v in qconfig.items() if k not in ("version", "sparsity_config", "transform_config")}
    QuantizationConfig.model_validate(body)
    if qconfig.get("transform_config"):
        TransformConfig.model_validate(qconfig["transform_config"])


def compressed_state_dict(src: ExportSource, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every tensor of the export, keyed as the HF model names them (linears compressed)."""
    out: dict[str, torch.Tensor] = {}
    t4 = hadamard_pm1(src.r4).to(dtype).contiguous() if src.r4 else None
    for name, lin in src.linears.items():
        qt = lin.quantized
        if qt is None:
            raise SpinQuantError(f"{name} has float weights; the compressed-tensors export needs quantized weights "
                                 "(quantize with --w-bits 2-8)")
        # The library's integer grid is signed for every scheme: shift our unsigned asymmetric codes and zero
        # points by 2^(b-1), which leaves (code - zero) and so every dequantized value unchanged.
        offset = 0 if qt.symmetric else 2 ** (qt.bits - 1)
        codes = qt.codes.to(torch.int16) - offset
        out[f"{name}.weight_packed"] = _pack(codes, qt.bits)
        out[f"{name}.weight_scale"] = qt.scale.to(dtype).contiguous()  # [out, 1] per channel, [out, groups]
        out[f"{name}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
        if not qt.symmetric:
            out[f"{name}.weight_zero_point"] = _pack(qt.zero.round().to(torch.int16) - offset, qt.bits, dim=0)
        if lin.bias is not None:
            out[f"{name}.bias"] = lin.bias.to(dtype).contiguous()
        if t4 is not None and name.endswith(src.adapter.layer.down):
            out[f"{name}.{R4_SCHEME}_input.weight"] = t4.clone()
    for key, tensor in src.tensors.items():
        out[key] = tensor.to(dtype).contiguous()
    return out


def export_metadata(src: ExportSource) -> dict:
    """What the compressed-tensors schema cannot say, kept for people and for a later import."""
    from ..version import __version__

    def spec(s: QuantSpec) -> dict:
        return {"bits": s.bits, "symmetric": s.symmetric, "group_size": s.group_size, "clip_ratio": s.clip_ratio}

    return {"exporter": f"spinquant {__version__}", "rotation": src.rotation,
            "r1_r2": "merged into the weights" if src.rotation != "none" else "none",
            "online_hadamard": {"r3": src.r3, "r4": src.r4},
            "activations": spec(src.act), "key_cache": spec(src.key), "value_cache": spec(src.value),
            "not_in_quantization_config": ["activation clip ratio", "K/V cache quantization and R3 (Q/K Hadamard)"]}


def reader_notes(src: ExportSource) -> list[str]:
    """What a reader of this folder will not run as spinquant does, one line each (printed at export)."""
    notes = []
    if src.r4:
        notes.append("down_proj needs the online Hadamard R4 from transform_config: vLLM applies it, but "
                     "transformers' from_pretrained does not (it reports R4_input weights as unexpected and "
                     "generates garbage); load it with spinquant.export.load_compressed_tensors, or quantize "
                     "with --no-r4 for a folder stock transformers runs")
    if src.key.enabled or src.value.enabled:
        notes.append(f"the K/V cache quantization (K{src.key.bits}/V{src.value.bits}) and R3 are dropped: "
                     "readers keep the cache in float (R3 cancels in Q·Kᵀ)")
    if src.act.enabled and src.act.clip_ratio < 1.0:
        notes.append(f"the activation clip ratio {src.act.clip_ratio} is dropped: readers quantize activations "
                     "over their full range")
    return notes


def load_compressed_tensors(path: str | Path, dtype: torch.dtype = torch.float32):
    """transformers' from_pretrained on an export folder, plus what that does not do itself: the online R4
    from `transform_config` (compressed-tensors' own transform modules, weights from the folder)."""
    import transformers

    path = Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    groups = json.loads((path / "config.json").read_text())["quantization_config"].get("transform_config")
    applied = any(name.endswith(f".{R4_SCHEME}_input") for name, _ in model.named_modules())
    if groups and not applied:  # this transformers does not apply transform_config: do it here
        from compressed_tensors.transform import TransformConfig, apply_transform_config
        from safetensors.torch import load_file

        apply_transform_config(model, TransformConfig.model_validate(groups))
        stored = load_file(str(path / "model.safetensors"))
        model.load_state_dict({k: v.to(dtype) for k, v in stored.items() if f".{R4_SCHEME}_input." in k},
                              strict=False)
    return model


def _save_tokenizer(src: ExportSource, out: Path) -> None:
    if src.tokenizer is not None:
        src.tokenizer.save_pretrained(str(out))


def export_compressed_tensors(model: Any, tokenizer: Any, out_dir: str | Path, dtype: str = "bfloat16",
                              overwrite: bool = False) -> Path:
    """Write a quantized model (in memory, or a folder from `quantize --output`) as a compressed-tensors folder.

    dtype: storage of scales and float tensors (bfloat16 for vLLM; float32 keeps every value exact).
    """
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise SpinQuantError(f"dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    src = as_source(model, tokenizer)
    if not src.weight.enabled:
        raise SpinQuantError("the model's weights are not quantized; compressed-tensors export needs --w-bits 2-8")
    if any(lin.quantized is not None and lin.quantized.bits != src.weight.bits for lin in src.linears.values()):
        raise SpinQuantError("this export writes one weight scheme, and the model has other bits per role "
                             "(--w-bits-role); export it as GGUF (--gguf-type auto) or quantize without per-role bits")
    qconfig = quantization_config(src)
    validate_config(qconfig)
    tensors = compressed_state_dict(src, DTYPES[dtype])
    config = src.config.to_dict()
    for k in [k for k in config if "attn_implementation" in k]:
        config.pop(k)
    config["dtype"] = config["torch_dtype"] = dtype  # transformers 5 reads dtype, older readers torch_dtype
    if not config.get("architectures"):  # vLLM picks its model class from this list
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[src.model_type]]
    config["quantization_config"] = qconfig
    config["spinquant_export"] = {**export_metadata(src), "reader_notes": reader_notes(src)}
    out_dir = Path(out_dir)
    with atomic_path(out_dir, overwrite=overwrite, directory=True) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        _save_tokenizer(src, tmp)
    for note in config["spinquant_export"]["reader_notes"]:
        print(f"spinquant: note: {note}", file=sys.stderr)
    return out_dir
