"""The Llama-3-8B shape that the GPU benchmarks build with random weights (no download needed)."""

from __future__ import annotations

import argparse


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """--layers, --hidden, ... defaulting to Llama-3-8B (shrink --layers when memory is short)."""
    g = parser.add_argument_group("model shape (default: Llama-3-8B)")
    g.add_argument("--layers", type=int, default=32)
    g.add_argument("--hidden", type=int, default=4096)
    g.add_argument("--intermediate", type=int, default=14336)
    g.add_argument("--heads", type=int, default=32)
    g.add_argument("--kv-heads", type=int, default=8)
    g.add_argument("--vocab", type=int, default=128256)


def llama_config(a: argparse.Namespace, max_positions: int):
    """An untied LlamaConfig of the parsed shape with Llama-3's RoPE base."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                       max_position_embeddings=max(8192, max_positions), tie_word_embeddings=False,
                       rope_theta=500000.0)
