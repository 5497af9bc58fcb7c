"""Declarative model adapters: where each part of a decoder-only model lives.

An adapter is data, not code: dotted module paths and a few facts. Algorithms ask the adapter for
`ModelParts` and never spell out `model.model.layers[i]` themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import LINEAR_ROLES


@dataclass(frozen=True)
class LayerMap:
    """Module paths inside one decoder layer."""

    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"


@dataclass(frozen=True)
class Adapter:
    """One architecture family: which HF model_types it covers and where its parts are."""

    family: str
    model_types: tuple[str, ...]
    embedding: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    layer: LayerMap = LayerMap()
    notes: str = ""

    def parts(self, model: nn.Module) -> ModelParts:
        layers = get_module(model, self.layers)
        return ModelParts(
            model=model,
            adapter=self,
            embedding=get_module(model, self.embedding),
            final_norm=get_module(model, self.final_norm),
            lm_head=get_module(model, self.lm_head),
            layers=[LayerParts(layer, self.layer, i) for i, layer in enumerate(layers)],
        )


class LayerParts:
    """The named pieces of one decoder layer; linears can be swapped for wrappers in place."""

    def __init__(self, layer: nn.Module, names: LayerMap, index: int):
        self.module = layer
        self.names = names
        self.index = index

    def get(self, role: str) -> nn.Module:
        return get_module(self.module, getattr(self.names, role))

    def set(self, role: str, new: nn.Module) -> None:
        set_module(self.module, getattr(self.names, role), new)

    input_norm = property(lambda self: self.get("input_norm"))
    post_attention_norm = property(lambda self: self.get("post_attention_norm"))
    attention = property(lambda self: self.get("attention"))
    q = property(lambda self: self.get("q"))
    k = property(lambda self: self.get("k"))
    v = property(lambda self: self.get("v"))
    o = property(lambda self: self.get("o"))
    gate = property(lambda self: self.get("gate"))
    up = property(lambda self: self.get("up"))
    down = property(lambda self: self.get("down"))

    LINEAR_ROLES = LINEAR_ROLES

    def linears(self) -> dict[str, nn.Module]:
        return {role: self.get(role) for role in self.LINEAR_ROLES}


@dataclass
class ModelParts:
    model: nn.Module
    adapter: Adapter
    embedding: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Linear
    layers: list[LayerParts]

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads

    def set_lm_head(self, new: nn.Module) -> None:
        set_module(self.model, self.adapter.lm_head, new)
        self.lm_head = new


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)
