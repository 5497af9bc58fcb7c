"""Export as a GGUF file for llama.cpp: the R1/R2-merged weights, as our own codes where they fit the type.

llama.cpp runs an ordinary model: no online Hadamard on Q/K (R3) or before down_proj (R4). R1/R2 are merged
into the weights and need nothing, so a model quantized with `--no-r3 --no-r4` exports exactly; one with R4
cannot (its inverse sits inside down_proj's weight) and is refused, and so is R3, whose point, a 4-bit K cache
in the rotated basis, llama.cpp cannot keep.

Weights: where a linear's own codes fit the GGUF type, they are written as they are: symmetric 4-bit codes
per channel (or in groups of a multiple of 32) become Q4_0 blocks with the row's scale as the block scale
(q = code + 8), symmetric codes of up to 5 bits Q5_0 blocks (q = code + 16), and symmetric codes of up to 8
bits Q8_0 blocks the same way. Only the scale is
rounded (to float16), so llama.cpp computes with spinquant's weights. Anything else (asymmetric codes, float
weights, other group sizes) is quantized again block-wise by gguf's quantizer of that type from the float weights the
model computes with, which rounds twice. The embedding and output tables take Q8_0 (F16 for an F16 export),
norms F32. Tokenizer metadata comes from the source GGUF when the model was
loaded from one (the built-in SmolLM2 is), else from a byte-level BPE Hugging Face tokenizer.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SpinQuantError
from ..io import atomic_path, user_path
from ..quant.quantizer import QuantizedTensor
from .source import ExportSource, as_source

WEIGHT_TYPES = ("Q8_0", "Q5_0", "Q4_0", "F16", "auto")  # auto: each weight in the type that holds its own codes
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
ROLE_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
              "down": "ffn_down"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise SpinQuantError("the GGUF export needs the gguf package; install it with: pip install gguf") from None
    return gguf


def check_exportable(src: ExportSource) -> str:
    """The GGUF architecture name, or a SpinQuantError saying what to change."""
    if src.r3 or src.r4:
        active = " and ".join(n for n, on in (("R3 (Q/K)", src.r3), ("R4 (down_proj)", src.r4)) if on)
        raise SpinQuantError(f"llama.cpp has no online Hadamard, and this model uses {active}; quantize it with "
                             "--no-r3 --no-r4 for a GGUF export (R1/R2 are merged and kept)")
    if src.model_type not in ARCHITECTURES:
        raise SpinQuantError(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} models, not "
                             f"{src.model_type!r}; export compressed-tensors instead")
    return ARCHITECTURES[src.model_type]


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half RoPE layout → llama.cpp's interleaved pairs (rows of q/k weights and biases)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(config: Any) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def llama3_rope_factors(config: Any, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama-3.1-style RoPE scaling, the `rope_freqs` tensor llama.cpp reads."""
    theta, p = _rope(config)
    factor, low, high = float(p["factor"]), float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_ctx = float(p.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _add_hparams(w: Any, src: ExportSource, arch: str, n_vocab: int) -> np.ndarray | None:
    """Model hyper-parameters; returns the rope_freqs tensor when the model needs one."""
    gguf = _gguf()
    c = src.config
    n_head = int(c.num_attention_heads)
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // n_head)
    w.add_context_length(int(c.max_position_embeddings))
    w.add_embedding_length(int(c.hidden_size))
    w.add_block_count(int(c.num_hidden_layers))
    w.add_feed_forward_length(int(c.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(getattr(c, "num_key_value_heads", None) or n_head))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(n_vocab)
    w.add_rope_dimension_count(head_dim)
    if head_dim != c.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    theta, params = _rope(c)
    w.add_rope_freq_base(theta)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "llama3":
        return llama3_rope_factors(c, head_dim)
    elif kind not in ("default", None):
        raise SpinQuantError(f"RoPE scaling {kind!r} is not supported by the GGUF export; export compressed-tensors")
    return None


# ---------------------------------------------------------------------------------------------- tokenizer


def source_gguf(name: str | None) -> Path | None:
    """The GGUF file a model was loaded from (a built-in name or a .gguf path), if any."""
    if not name:
        return None
    from ..models.builtin import BUILTIN_GGUF, builtin_gguf

    if name in BUILTIN_GGUF:
        try:
            return builtin_gguf(name)
        except SpinQuantError:
            return None
    path = user_path(name)
    return path if path.suffix == ".gguf" and path.is_file() else None


def copy_tokenizer_fields(w: Any, path: Path, n_vocab: int) -> bool:
    """Copy every tokenizer.* key of another GGUF (same vocabulary size); False when they do not fit."""
    gguf = _gguf()
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != n_vocab:
        return False
    for key, f in fields.items():
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), gguf.GGUFValueType.ARRAY, sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), f.types[0])
    return True


def _backend_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SpinQuantError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; GGUF export needs "
                             "one (AutoTokenizer.from_pretrained(..., use_fast=True))")
    return json.loads(backend.to_str())


def _has_byte_level(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_has_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_byte_level(v) for v in node)
    return False


def add_hf_tokenizer(w: Any, tokenizer: Any, n_vocab: int) -> None:
    """GPT-2-style (byte-level BPE) tokenizer metadata from a Hugging Face fast tokenizer."""
    gguf = _gguf()
    spec = _backend_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not _has_byte_level(spec.get("pre_tokenizer")):
        raise SpinQuantError("GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama-3, Qwen); "
                             "this one is not: convert the compressed-tensors export with llama.cpp's "
                             "convert_hf_to_gguf.py instead")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise SpinQuantError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_vocab} "
                             "embeddings; pass the model's own tokenizer")
    by_id = {i: t for t, i in vocab.items()}
    special = set(getattr(tokenizer, "all_special_ids", []))
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embeddings past the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            is_control = i in special or (i in added and getattr(added[i], "special", False))
            types.append(gguf.TokenType.CONTROL if is_control
                         else gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise SpinQuantError("the tokenizer has no BPE merges, which llama.cpp requires; pass the model's tokenizer")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    bos = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]
    w.add_add_bos_token(bool(adds_bos))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        w.add_chat_template(template)


# ---------------------------------------------------------------------------------------------- tensors


QK = 32  # values per Q4_0 / Q5_0 / Q8_0 block
CODE_BITS = {"Q4_0": 4, "Q5_0": 5, "Q8_0": 8}  # 32-value blocks of symmetric codes, one float16 scale; smallest first


def codes_fit(qt: QuantizedTensor, kind: str) -> bool:
    """Whether a linear's own codes are exactly blocks of `kind`: symmetric, no wider than the type, and
    groups (or rows) a whole number of 32-value blocks."""
    cols = qt.codes.shape[1]
    return (kind in CODE_BITS and qt.symmetric and qt.bits <= CODE_BITS[kind] and cols % QK == 0
            and (cols // qt.scale.shape[1]) % QK == 0 and not bool((qt.zero != 0).any()))


def code_blocks(qt: QuantizedTensor, kind: str) -> np.ndarray | None:
    """A linear's own integer codes as Q4_0 / Q5_0 / Q8_0 blocks (uint8 [rows, bytes], gguf-py's layout), or
    None when they do not fit that type exactly.

    Each block is a float16 d, then its 32 values. Q4_0: 16 bytes whose low nibbles hold values 0-15 and high
    nibbles values 16-31, each stored as q + 8. Q5_0: 4 bytes holding bit 4 of every q + 16 (value i at bit
    i, little-endian), then the low nibbles as Q4_0's. Q8_0: 32 int8. With d the codes' own scale, every
    stored value is the code itself.
    """
    if not codes_fit(qt, kind):
        return None
    codes, scale = qt.codes, qt.scale  # normalized: int16 codes, scale [out, n_groups]
    rows, cols = codes.shape
    per_group = cols // scale.shape[1]
    d = scale.repeat_interleave(per_group // QK, dim=1).numpy().astype(np.float16)  # [rows, blocks]
    q = codes.numpy().reshape(rows, -1, QK)
    if kind == "Q8_0":
        body = q.astype(np.int8).view(np.uint8)
    else:
        stored = (q + (1 << (CODE_BITS[kind] - 1))).astype(np.uint8)
        body = (stored[..., : QK // 2] & 0x0F) | ((stored[..., QK // 2 :] & 0x0F) << 4)
        if kind == "Q5_0":
            high = np.packbits(stored >> 4, axis=-1, bitorder="little")  # [rows, blocks, 4]
            body = np.concatenate([high, body], axis=-1)
    blocks = np.concatenate([d[..., None].view(np.uint8), body], axis=-1)  # d as 2 little-endian bytes
    return np.ascontiguousarray(blocks.reshape(rows, -1))


def fitting_type(qt: QuantizedTensor | None) -> str:
    """The smallest 32-block type that holds these codes exactly (Q8_0 for anything else, quantized again)."""
    return next((kind for kind in CODE_BITS if qt is not None and codes_fit(qt, kind)), "Q8_0")


def _quantized(gguf: Any, array: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    """(data, raw ggml type) for a 2-D float array; rows not a multiple of 32 fall back to F16, as llama.cpp does."""
    q = gguf.GGMLQuantizationType
    if kind == "F16" or array.shape[-1] % 32:
        return array.astype(np.float16), None
    qtype = getattr(q, kind)
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def gguf_tensors(src: ExportSource, weight_type: str) -> list[tuple[str, np.ndarray, str, QuantizedTensor | None]]:
    """(GGUF name, float32 array, storage: "F32" | "table" | "weight", the weight's own codes or None) in
    llama.cpp's names and layout (q/k rows permuted, codes and scales alike)."""
    a = src.adapter
    c = src.config
    n_head = int(c.num_attention_heads)
    n_kv = int(getattr(c, "num_key_value_heads", None) or n_head)
    permute = ARCHITECTURES[src.model_type] == "llama"
    out: list[tuple[str, np.ndarray, str, QuantizedTensor | None]] = []

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().contiguous().numpy()

    def add(name: str, t: torch.Tensor, storage: str, codes: QuantizedTensor | None = None) -> None:
        out.append((name, arr(t), storage, codes))

    add("token_embd.weight", src.tensor(a.embedding), "table")
    for i in range(src.num_layers):
        prefix = f"{a.layers}.{i}"
        add(f"blk.{i}.attn_norm.weight", src.tensor(f"{prefix}.{a.layer.input_norm}"), "F32")
        add(f"blk.{i}.ffn_norm.weight", src.tensor(f"{prefix}.{a.layer.post_attention_norm}"), "F32")
        for role, name in ROLE_NAMES.items():
            lin = src.linear(i, role)
            weight, bias, qt = lin.weight, lin.bias, lin.quantized
            if permute and role in ("q", "k"):
                heads = n_head if role == "q" else n_kv
                weight = permute_qk(weight, heads)
                bias = permute_qk(bias, heads) if bias is not None else None
                if qt is not None:
                    qt = replace(qt, codes=permute_qk(qt.codes, heads), scale=permute_qk(qt.scale, heads),
                                 zero=permute_qk(qt.zero, heads))
            add(f"blk.{i}.{name}.weight", weight, "weight", qt)
            if bias is not None:
                add(f"blk.{i}.{name}.bias", bias, "F32")
        for hf, name in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):  # Qwen3
            key = f"{prefix}.{a.layer.attention}.{hf}.weight"
            if key in src.tensors:
                add(f"blk.{i}.{name}.weight", src.tensors[key], "F32")
    add("output_norm.weight", src.tensor(a.final_norm), "F32")
    head, embedding = src.tensor(a.lm_head), src.tensor(a.embedding)
    # Tied and unrotated (an int8 table's head is embedding · M with M = I to float rounding): one table,
    # which llama.cpp then reads for the output too, as in its own files.
    if head.shape != embedding.shape or (head - embedding).abs().max() > 1e-6 * embedding.abs().max():
        add("output.weight", head, "table")
    if f"{a.lm_head}.bias" in src.tensors:
        add("output.bias", src.tensors[f"{a.lm_head}.bias"], "F32")
    return out


def _gguf_data(gguf: Any, src: ExportSource, weight_type: str, table_type: str
               ) -> tuple[list[tuple[str, np.ndarray, Any]], bool]:
    """(name, data, raw ggml type or None) per tensor, and whether every decoder weight kept its own codes."""
    out, all_codes = [], weight_type != "F16"
    for name, array, storage, codes in gguf_tensors(src, weight_type):
        if storage == "F32":
            out.append((name, array.astype(np.float32), None))
            continue
        kind = fitting_type(codes) if weight_type == "auto" and storage == "weight" else weight_type
        blocks = code_blocks(codes, kind) if codes is not None else None  # None for F16
        if blocks is not None:
            out.append((name, blocks, getattr(gguf.GGMLQuantizationType, kind)))
            continue
        all_codes = all_codes and storage != "weight"
        out.append((name, *_quantized(gguf, array, table_type if storage == "table" else kind)))
    return out, all_codes


FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q5_0": "MOSTLY_Q5_0", "Q4_0": "MOSTLY_Q4_0", "F16": "MOSTLY_F16",
              "auto": "MOSTLY_Q4_0"}  # a mixed file names its main type, as llama.cpp's _M files do


def export_gguf(model: Any, tokenizer: Any, out_path: str | Path, weight_type: str = "Q8_0",
                overwrite: bool = False, tokenizer_gguf: str | Path | None = None,
                table_type: str | None = None) -> Path:
    """Write a model (in memory, or a folder from `quantize --output`) as a llama.cpp GGUF file.

    weight_type: Q8_0, Q5_0, Q4_0 (our codes where they fit, else gguf's block quantizers), F16, or auto (each
    weight in the smallest of Q4_0 / Q5_0 / Q8_0 that holds its codes: for per-role bits, --w-bits-role).
    table_type: the embedding and output tables' type (default Q8_0, F16 for an F16 export); a head equal to
    the embedding (a tied model left unrotated) is not written, so llama.cpp keeps one table.
    tokenizer_gguf: copy the tokenizer metadata from this GGUF (default: the GGUF the model came from, if any).
    """
    gguf = _gguf()
    table_type = table_type or ("F16" if weight_type == "F16" else "Q8_0")
    for what, kind in (("weight", weight_type), ("table", table_type)):
        if kind not in WEIGHT_TYPES or (what == "table" and kind == "auto"):
            raise SpinQuantError(f"GGUF {what} type {kind!r} is unknown; use one of {', '.join(WEIGHT_TYPES)}")
    src = as_source(model, tokenizer)
    arch = check_exportable(src)
    n_vocab = int(src.tensor(src.adapter.embedding).shape[0])
    out_path = Path(out_path)
    from ..version import __version__

    with atomic_path(out_path, overwrite=overwrite) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type("model")
        w.add_name(Path(str(src.source_name or "spinquant-model")).stem)
        w.add_string("general.quantized_by", f"spinquant {__version__}")
        w.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[weight_type])))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string("spinquant.rotation", src.rotation)
        tensors, from_codes = _gguf_data(gguf, src, weight_type, table_type)
        s = src.weight
        how = "codes written as they are" if from_codes else "re-quantized"
        w.add_string("spinquant.source_weights", "float" if not s.enabled else
                     f"W{s.bits} {'sym' if s.symmetric else 'asym'} {s.group_size or 'per-channel'}; "
                     f"{how} as {weight_type}")
        rope_freqs = _add_hparams(w, src, arch, n_vocab)
        from_gguf = Path(tokenizer_gguf) if tokenizer_gguf else source_gguf(src.source_name)
        if from_gguf is None or not copy_tokenizer_fields(w, from_gguf, n_vocab):
            if src.tokenizer is None:
                raise SpinQuantError("no tokenizer to write into the GGUF file; pass the model's tokenizer")
            add_hf_tokenizer(w, src.tokenizer, n_vocab)
        for name, data, raw in tensors:
            w.add_tensor(name, data, raw_dtype=raw)
        if rope_freqs is not None:
            w.add_tensor("rope_freqs.weight", rope_freqs)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out_path
