"""The supported architecture families. Adding one is adding an entry here (and a tiny-model test)."""

from .base import Adapter

LLAMA = Adapter(
    family="llama",
    model_types=("llama",),
    notes="Llama-2, Llama-3, Llama-3.x, SmolLM, SmolLM2",
)
MISTRAL = Adapter(family="mistral", model_types=("mistral",), notes="Mistral-7B and relatives")
QWEN2 = Adapter(
    family="qwen2",
    model_types=("qwen2",),
    notes="Qwen2 / Qwen2.5: biases on q, k, v (rotated along with their weights)",
)
QWEN3 = Adapter(
    family="qwen3",
    model_types=("qwen3",),
    notes="Qwen3: per-head q_norm / k_norm act before RoPE, inside the head basis R1/R2 leave alone",
)

FAMILIES: tuple[Adapter, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3)
