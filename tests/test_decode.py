"""The packed runtime's own decode step (runtime/decode.py) against the model's forward, on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_tokenizer
from test_runtime import quantized_tiny, save_load

from spinquant import native
from spinquant.runtime.decode import DecodeEngine, engine_for
from spinquant.runtime.generate import generate_text

pytestmark = pytest.mark.skipif(not native.available(), reason="the decode step needs the native kernel")


def step_against_forward(loaded, prompt_len=10, steps=6):
    """Max |logit difference| relative to the logits' scale, per step, feeding the forward's greedy tokens."""
    engine = DecodeEngine(loaded)
    prompt = torch.randint(0, 260, (1, prompt_len), generator=torch.Generator().manual_seed(7))
    cache = loaded.new_cache()
    with torch.inference_mode():
        first = engine.begin(prompt, prompt_len + steps)
        out = loaded(prompt, cache=cache, use_cache=True)
        # the prompt runs through the forward itself (logits of one row vs all rows: BLAS may round apart)
        torch.testing.assert_close(first, out.logits[0, -1], rtol=1e-6, atol=1e-6)
        token, rel = int(first.argmax()), []
        for i in range(steps):
            mine = engine.forward_token(token, prompt_len + i)
            ref = loaded(torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1]
            rel.append(float((mine - ref).abs().max() / ref.abs().max()))
            token = int(ref.argmax())
    return rel


@pytest.mark.parametrize("family", ["llama", "llama-tied", "qwen2", "qwen3"])
def test_decode_step_equals_the_forward_without_activation_quantizers(tmp_path, family):
    # W4A16KV16: no quantizer can amplify a float-order difference, so the step must agree to rounding.
    model, cfg = quantized_tiny(family, w=4, a=16, kv=16)
    loaded, _ = save_load(model, cfg, tmp_path / "q")
    assert max(step_against_forward(loaded)) < 1e-5


@pytest.mark.parametrize("a,kv", [(8, 8), (4, 4)])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decode_step_tracks_the_forward_with_quantized_activations_and_cache(tmp_path, family, a, kv):
    # With activations and K/V quantized, another float order can flip a code now and then; the step must
    # still compute the same network (a wrong rotation, cache position or head mapping gives O(1) errors).
    model, cfg = quantized_tiny(family, w=4, a=a, kv=kv)
    loaded, _ = save_load(model, cfg, tmp_path / "q")
    rel = step_against_forward(loaded)
    assert sorted(rel)[len(rel) // 2] < 0.05


def test_generate_uses_the_decode_step_and_streams(tmp_path, capsys):
    import io

    model, cfg = quantized_tiny("llama", w=4, a=16, kv=16)
    loaded, _ = save_load(model, cfg, tmp_path / "q")
    out = io.StringIO()
    result = generate_text(loaded, byte_tokenizer(), "hello", max_new_tokens=8, out=out)
    assert engine_for(loaded) is not None and result["new_tokens"] >= 1
    assert out.getvalue().strip() == result["text"].strip()
    with torch.no_grad():  # W4A16: greedy tokens of the step = transformers' generate on the same model
        ids = byte_tokenizer()("hello", return_tensors="pt").input_ids
        ref = loaded.generate(ids, max_new_tokens=result["new_tokens"], do_sample=False)[0, ids.shape[1]:]
    assert byte_tokenizer().decode(ref, skip_special_tokens=True) == result["text"]


def test_models_the_step_does_not_cover_keep_transformers_generate():
    from conftest import tiny_model

    assert DecodeEngine.unsupported(tiny_model("llama")) == "not a packed spinquant runtime model"
    assert engine_for(tiny_model("llama")) is None


# The small native ops the step is made of, each against the PyTorch formula it replaces.

def test_native_rms_norm_rope_and_silu_match_their_pytorch_formulas():
    ops = native.kernels()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 96, generator=g), torch.randn(96, generator=g)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), ref, rtol=1e-6, atol=1e-6)

    qk, cos, sin = torch.randn(5, 64, generator=g), torch.randn(64, generator=g), torch.randn(64, generator=g)
    rotated = torch.cat((-qk[:, 32:], qk[:, :32]), dim=-1)
    assert torch.equal(ops.rope(qk, cos, sin), qk * cos + rotated * sin)  # the same float operations

    gu = torch.randn(2, 2 * 48, generator=g)
    torch.testing.assert_close(ops.silu_mul(gu), torch.nn.functional.silu(gu[:, :48]) * gu[:, 48:])


@pytest.mark.parametrize("n", [64, 96, 1536, 2048])
def test_native_hadamard_rows_is_the_online_hadamard(n):
    from spinquant.rotation.hadamard import hadamard_base, online_hadamard

    x = torch.randn(4, n, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(native.kernels().hadamard_rows(x, hadamard_base(n)), online_hadamard(x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (3, True)])
def test_native_kv_append_writes_what_quantize_rows_and_packing_give(bits, symmetric):
    from spinquant.runtime.packing import pack_unsigned

    ops = native.kernels()
    heads, length, d, pos = 3, 8, 64, 5
    x = torch.randn(heads, d, generator=torch.Generator().manual_seed(bits))
    width = d // 2 if bits <= 4 else d
    codes = torch.zeros(heads, length, width, dtype=torch.uint8)
    scale, zero = torch.ones(heads, length, 1), torch.zeros(heads, length, 1) if not symmetric else torch.empty(0)
    ops.kv_append(x, codes, scale, zero, torch.tensor([pos]), bits, symmetric, 0.95)
    u, offset, s = ops.quantize_rows(x, bits, symmetric, 0.95, d)
    assert torch.equal(codes[:, pos], pack_unsigned(u, bits))
    assert torch.equal(scale[:, pos], s)
    if not symmetric:
        assert torch.equal(zero[:, pos], offset.float())
    others = [i for i in range(length) if i != pos]
    assert not codes[:, others].any() and torch.equal(scale[:, others], torch.ones(heads, length - 1, 1))
