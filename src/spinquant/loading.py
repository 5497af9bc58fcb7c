"""Find and load a model and its tokenizer: built-in name, GGUF file, local HF directory or hub id."""

from __future__ import annotations

import functools
import json
import logging
import pickle
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from .config import DEFAULT_MODEL
from .errors import SpinQuantError, unpickling_refusal
from .io import user_path
from .models.builtin import BUILTIN_GGUF, builtin_gguf


def resolve(name: str) -> tuple[str, str | None]:
    """→ (directory or hub id, gguf file name or None)."""
    if name in BUILTIN_GGUF:
        path = builtin_gguf(name)
        return str(path.parent), path.name
    p = user_path(name)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise SpinQuantError(f"GGUF file {p} not found; pass an existing .gguf file")
        return str(p.parent), p.name
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise SpinQuantError(
                f"{p} is not a Hugging Face model folder (no config.json); pass a model folder, a .gguf "
                f"file, a hub id, or the built-in {DEFAULT_MODEL!r}"
            )
        _check_config_json(p / "config.json")
        return str(p), None
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name, None  # a hub id
    raise SpinQuantError(
        f"model {name!r} not found: not a folder, a .gguf file, a hub id (owner/name) or a built-in name "
        f"({', '.join(BUILTIN_GGUF)})"
    )


def _check_config_json(path: Path) -> None:
    """transformers reads config.json as a dict; anything else would surface as a traceback deep inside it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpinQuantError(f"{path} is not readable JSON ({type(e).__name__}: {e}); restore the model's "
                             "config.json") from None
    if not isinstance(data, dict):
        raise SpinQuantError(f"{path} holds a JSON {type(data).__name__}, not an object; restore the model's "
                             "config.json")


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu",
               verify: bool = True, float_only: bool = False):
    """(model in eval mode, tokenizer). Quantized GGUF weights are dequantized to `dtype`.

    A folder saved by spinquant loads as its packed runtime model (verify: check its sha256 manifest);
    float_only refuses one, for commands that quantize a floating-point model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if float_only:
        from .runtime.manifest import is_quantized_checkpoint

        path = user_path(name)
        if path.is_dir() and is_quantized_checkpoint(path):
            raise SpinQuantError(f"{name} is a model spinquant already quantized; pass the floating-point model "
                                 "it came from (evaluate this one with: spinquant eval DIR)")
    quantized = load_spinquant_checkpoint(name, dtype, device, verify)
    if quantized is not None:
        return quantized
    source, gguf_file = resolve(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # GGUF loading is chatty; our own progress shows instead
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load would bury a one-line error below it
    try:
        with _gguf_parsed_once() if gguf_file else nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True, **kwargs)
    except SpinQuantError:
        raise
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met a pickle that is not just tensors
        raise SpinQuantError(
            f"cannot load model {name!r}: its weights file is a pickle with more than tensors in it "
            f"({unpickling_refusal(e)}); "
            "refused, nothing in it was run: use the model's safetensors weights or a trusted source"
        ) from None
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        msg = str(e).strip().splitlines()[0][:240] if str(e).strip() else type(e).__name__
        raise SpinQuantError(
            f"cannot load model {name!r}: {msg}; check the path or hub id (hub ids need network access)"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        logging.getLogger("transformers").setLevel(logging.WARNING)
    missing = [k for k in info.get("missing_keys", ()) if not _tied_head(model, k)]
    if missing:  # transformers fills them with random numbers and carries on
        raise SpinQuantError(f"model {name!r}: its weights lack {len(missing)} tensors (e.g. {min(missing)}); "
                             "the weights file is incomplete or from another model: restore it")
    from .models import adapter_for

    adapter_for(model)  # unsupported architectures fail here, before any work
    model.to(device).eval()
    model.spinquant_source = name
    return model, tokenizer


@contextmanager
def _gguf_parsed_once():
    """transformers parses a GGUF file three times per load (config, tokenizer, weights), ~5 s each for
    SmolLM2's 49k-token vocabulary, and builds gguf's tensor-name map once per tensor (397 times). Both are
    pure functions of their arguments, and transformers looks them up on the `gguf` package at each call,
    so for the duration of one load the package hands out one parse per file and one map per architecture."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed: dict = {}

    def read_once(path, mode="r"):
        key = (str(path), mode)
        if key not in parsed:
            parsed[key] = reader(path, mode)
        return parsed[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = read_once, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _tied_head(model, key: str) -> bool:
    """A missing lm_head weight is expected when the model ties it to the embedding."""
    return key.endswith("lm_head.weight") and bool(getattr(model.config, "tie_word_embeddings", False))


def load_spinquant_checkpoint(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                              verify: bool = True):
    """(runtime model, tokenizer) when `name` is a folder saved by `spinquant quantize --output`, else None."""
    from .runtime.checkpoint import load_quantized
    from .runtime.manifest import is_quantized_checkpoint

    path = user_path(name)
    if not path.is_dir() or not is_quantized_checkpoint(path):
        return None
    model, tokenizer = load_quantized(path, dtype=dtype, device=device, verify=verify)
    model.spinquant_source = name
    return model, tokenizer
