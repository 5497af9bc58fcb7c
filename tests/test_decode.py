"""The packed runtime's own decode step (runtime/decode.py) against the model's forward, on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_tokenizer
from test_runtime import quantized_tiny, save_load

from spinquant.runtime import native
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
