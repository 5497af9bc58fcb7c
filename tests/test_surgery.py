"""Rotation invariance: with every quantizer off, untie + fuse + R1 + R2 + R3 + R4 must not move the logits."""

import pytest
import torch
from conftest import tiny_model

from spinquant.config import QuantConfig, QuantSpec, RunConfig
from spinquant.models import model_parts
from spinquant.pipeline import quantize_model
from spinquant.rotation.merge import prepare

OFF = QuantSpec(bits=16)


def float_config(rotation: str, **rot) -> RunConfig:
    cfg = RunConfig()
    cfg.quant = QuantConfig(weight=OFF, act=OFF, key=OFF, value=OFF)
    cfg.tables = "float32"  # the rotation alone must not move the logits: no int8 embedding / lm_head either
    cfg.rotation.mode = rotation
    for k, v in rot.items():
        setattr(cfg.rotation, k, v)
    return cfg


@pytest.mark.parametrize("rotation", ["hadamard", "random"])
# float64 models still run RMSNorm in float32 inside transformers, so its error is float32 rounding
# of the norm input (~1e-6); the merge itself is checked to 1e-12 below.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-5)])
def test_rotations_preserve_logits(family, rotation, dtype, tol):
    model = tiny_model(family, dtype=dtype)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        quantize_model(model, float_config(rotation), progress=False)
        out = model(ids).logits
    assert model.spinquant_rotations is not None
    assert (out - ref).abs().max().item() <= tol


def test_rotation_actually_changes_weights():
    model = tiny_model("llama")
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    quantize_model(model, float_config("hadamard"), progress=False)
    after = model_parts(model).layers[0].q.weight
    assert (after - before).abs().max() > 1e-2


def test_prepare_unties_and_makes_norms_scale_free():
    model = tiny_model("llama-tied")
    parts = model_parts(model)
    assert parts.lm_head.weight is parts.embedding.weight
    prepare(parts)
    assert parts.lm_head.weight is not parts.embedding.weight
    assert model.config.tie_word_embeddings is False
    for layer in parts.layers:
        assert torch.all(layer.input_norm.weight == 1) and torch.all(layer.post_attention_norm.weight == 1)
    assert torch.all(parts.final_norm.weight == 1)


@pytest.mark.parametrize("r3,r4", [(True, False), (False, True), (False, False)])
def test_online_hadamards_are_optional(r3, r4):
    model = tiny_model("qwen2", dtype=torch.float64)
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
        quantize_model(model, float_config("hadamard", r3=r3, r4=r4), progress=False)
        assert (model(ids).logits - ref).abs().max() <= 1e-5
    layer = model_parts(model).layers[0]
    assert (layer.down.input_transform is not None) == r4
    assert layer.attention.kv_quant.rotate_qk == r3


def test_generation_with_cache_matches_after_rotation():
    model = tiny_model("llama", dtype=torch.float64)
    ids = torch.randint(0, 96, (1, 8))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    quantize_model(model, float_config("hadamard"), progress=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), ref)


def test_rotation_algebra_is_exact_in_float64():
    """The tensor functions themselves: (W·R)(x·R)ᵀ = W xᵀ, Rᵀ-rotated outputs, per-head blocks."""
    from spinquant.rotation.hadamard import random_hadamard
    from spinquant.rotation.merge import rotate_heads_in, rotate_heads_out, rotate_in, rotate_out

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, dtype=torch.float64, generator=g)
    x = torch.randn(5, 64, dtype=torch.float64, generator=g)
    r = random_hadamard(64, generator=g)
    assert torch.allclose((x @ r) @ rotate_in(w, r).T, x @ w.T, atol=1e-12)
    xin = torch.randn(5, 48, dtype=torch.float64, generator=g)  # input of the [64, 48] weight wᵀ
    assert torch.allclose(xin @ rotate_out(w.T, r).T, (xin @ w) @ r, atol=1e-12)
    r2 = random_hadamard(16, generator=g)
    v = rotate_heads_out(w, r2, 16)  # each 16-row head block of the output rotated by R2
    y, yv = (x @ w.T).reshape(5, 3, 16), (x @ v.T).reshape(5, 3, 16)
    assert torch.allclose(yv, y @ r2, atol=1e-12)
    o = torch.randn(64, 48, dtype=torch.float64, generator=g)
    assert torch.allclose((yv.reshape(5, 48)) @ rotate_heads_in(o, r2, 16).T, y.reshape(5, 48) @ o.T, atol=1e-12)


def test_eight_bit_asymmetric_weight_codes_do_not_wrap():
    from spinquant.quant.quantizer import fake_quantize_weight, quantize_weight

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=8, symmetric=False)
    qt = quantize_weight(w, spec)
    assert int(qt.codes.max()) > 127  # uses the upper half of the unsigned grid
    assert torch.allclose(qt.dequantize(), fake_quantize_weight(w, spec), atol=1e-6)
    assert (qt.dequantize() - w).abs().max() < 0.05


def test_r2_alone_keeps_the_tied_table_and_the_norms():
    """--no-r1: only v_proj / o_proj change, the norms keep their scales, a tied head stays the embedding."""
    model = tiny_model("llama-tied", dtype=torch.float64)
    ids = torch.randint(0, 96, (1, 16))
    parts = model_parts(model)
    norm = parts.layers[0].input_norm.weight.detach().clone()
    q = parts.layers[0].q.weight.detach().clone()
    with torch.no_grad():
        ref = model(ids).logits
        quantize_model(model, float_config("hadamard", r1=False, r3=False, r4=False), progress=False)
        assert (model(ids).logits - ref).abs().max() <= 1e-6
    parts = model_parts(model)
    assert torch.equal(parts.lm_head.weight, parts.embedding.weight)
    assert torch.equal(parts.layers[0].input_norm.weight, norm) and torch.equal(parts.layers[0].q.weight, q)
    assert torch.equal(model.spinquant_rotations.r1, torch.eye(parts.hidden_size))
