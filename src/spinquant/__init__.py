"""spinquant: learned-rotation (SpinQuant) 4-bit quantization of LLM weights, activations and KV cache."""

from .api import evaluate, quantize, run_compare, run_eval, run_quantize, save
from .config import EvalConfig, GPTQConfig, QuantConfig, QuantSpec, RotationConfig, RunConfig, TrainConfig
from .errors import SpinQuantError
from .evaluation.scoring import perplexity
from .loading import load_model
from .runtime.checkpoint import load
from .version import __version__

__all__ = [
    "EvalConfig",
    "GPTQConfig",
    "QuantConfig",
    "QuantSpec",
    "RotationConfig",
    "RunConfig",
    "SpinQuantError",
    "TrainConfig",
    "__version__",
    "evaluate",
    "load",
    "load_model",
    "perplexity",
    "quantize",
    "run_compare",
    "run_eval",
    "run_quantize",
    "save",
]
