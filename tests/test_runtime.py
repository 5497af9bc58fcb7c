"""The packed runtime: packing, integer kernels, quantized KV cache, save/load, generation, CLI."""

from __future__ import annotations

import copy
import io
import json
import pickle

import pytest
import torch
from conftest import byte_tokenizer, tiny_model

from spinquant import native
from spinquant.config import QuantConfig, QuantSpec, RunConfig
from spinquant.errors import SpinQuantError
from spinquant.pipeline import quantize_model
from spinquant.quant.modules import KVQuant, QuantLinear
from spinquant.quant.quantizer import fake_quantize, quantize_activation, quantize_weight
from spinquant.rotation.hadamard import fast_hadamard_transform
from spinquant.rotation.hadamard import online_hadamard as hadamard
from spinquant.runtime import load_quantized, save_quantized
from spinquant.runtime.kernels import _exact_float_mm, int8_matmul
from spinquant.runtime.kvcache import QuantKVLayer
from spinquant.runtime.model import module_summary
from spinquant.runtime.modules import Int4Linear, IntLinear, WeightOnlyLinear
from spinquant.runtime.packing import from_block32, pack_codes, to_block32, unpack_codes

pytestmark = pytest.mark.usefixtures("one_thread")


def run_config(w=4, a=4, kv=4, w_group=None, a_group=None, a_sym=False, r3=True, r4=True,
               tables="int8", w_full_range=False) -> RunConfig:
    cfg = RunConfig()
    cfg.tables = tables
    cfg.quant = QuantConfig(weight=QuantSpec(w, symmetric=True, group_size=w_group, clip_search=True,
                                             full_range=w_full_range),
                            act=QuantSpec(a, symmetric=a_sym, group_size=a_group, clip_ratio=0.9),
                            key=QuantSpec(kv, symmetric=False, clip_ratio=0.95),
                            value=QuantSpec(kv, symmetric=False, clip_ratio=0.95))
    cfg.rotation.r3, cfg.rotation.r4 = r3, r4
    return cfg


def quantized_tiny(family="llama", seed=0, **kw):
    model = tiny_model(family, seed=seed, vocab_size=260)
    cfg = run_config(**kw)
    quantize_model(model, cfg, progress=False)
    return model, cfg


def save_load(model, cfg, path, **save_kw):
    save_quantized(model, byte_tokenizer(), cfg, path, **save_kw)  # the tables the model computes with
    return load_quantized(path)


# ---------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_unpack_round_trip(bits, symmetric):
    w = torch.randn(12, 32)
    qt = quantize_weight(w, QuantSpec(bits, symmetric=symmetric))
    packed = pack_codes(qt.codes, bits, symmetric)
    assert packed.dtype == torch.uint8
    assert packed.shape == ((12, 16) if bits <= 4 else (12, 32))  # two 4-bit codes per byte
    codes = unpack_codes(packed, bits, symmetric)
    expected = qt.codes.to(torch.int16) % 256 if (bits == 8 and not symmetric) else qt.codes
    assert torch.equal(codes.to(torch.int16), expected.to(torch.int16))


def test_pack_refuses_odd_rows_and_out_of_range_codes():
    with pytest.raises(SpinQuantError, match="odd"):
        pack_codes(torch.zeros(2, 3, dtype=torch.int8), 4, True)
    with pytest.raises(ValueError, match="range"):
        pack_codes(torch.full((2, 4), 9, dtype=torch.int8), 4, True)


# ---------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_int8_matmul_is_exact(m):
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-128, 128, (m, 200), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (48, 200), generator=g, dtype=torch.int8)
    ref = (a.long() @ w.long().t()).int()
    assert torch.equal(int8_matmul(a, w.t()), ref)
    assert torch.equal(_exact_float_mm(a, w.t()), ref)  # the fallback for shapes CUDA's _int_mm refuses


@pytest.mark.parametrize("spec", [QuantSpec(8, False, clip_ratio=0.9), QuantSpec(4, False, clip_ratio=0.9),
                                  QuantSpec(8, True), QuantSpec(4, True, clip_ratio=0.8)])
def test_activation_codes_match_the_fake_quantizer_bit_for_bit(spec):
    x = torch.randn(40, 96) * 3
    x[:, :2] *= 20
    q, scale, zero = quantize_activation(x.clone(), spec)
    deq = (q - (zero if zero is not None else 0)) * scale
    assert torch.equal(deq, fake_quantize(x, spec))


@pytest.mark.parametrize("n", [64, 96, 1536, 2048, 14336])
def test_runtime_hadamard_matches_the_fast_transform(n):
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard(x), fast_hadamard_transform(x), rtol=0, atol=1e-12)


def fake_linear(w, wspec, aspec, r4=False):
    lin = QuantLinear(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    qt = quantize_weight(w, wspec)
    lin.weight.data = qt.dequantize()
    lin.quantized = qt
    lin.act_quant.spec = aspec
    if r4:
        from spinquant.rotation.hadamard import OnlineHadamard

        lin.input_transform = OnlineHadamard(w.shape[1])
    return lin, qt


@pytest.mark.parametrize("label,wspec,aspec", [
    ("W8A8", QuantSpec(8, True), QuantSpec(8, False, clip_ratio=0.9)),
    ("W4A8", QuantSpec(4, True, clip_search=True), QuantSpec(8, False, clip_ratio=0.9)),
    ("W4A8-sym", QuantSpec(4, True), QuantSpec(8, True)),
    ("W4A4", QuantSpec(4, True, clip_search=True), QuantSpec(4, False, clip_ratio=0.9)),
    ("W4A4-asym-w", QuantSpec(4, False), QuantSpec(4, False, clip_ratio=0.9)),
    ("W4g32A8", QuantSpec(4, True, group_size=32), QuantSpec(8, False, clip_ratio=0.9)),
    ("W4g32A4g32", QuantSpec(4, True, group_size=32), QuantSpec(4, False, group_size=32, clip_ratio=0.9)),
    ("W4A4g32", QuantSpec(4, True), QuantSpec(4, False, group_size=32, clip_ratio=0.9)),
])
@pytest.mark.parametrize("r4", [False, True])
def test_int_linear_equals_fake_quant_linear(label, wspec, aspec, r4):
    torch.manual_seed(0)
    w = torch.randn(80, 96) * 0.05
    fake, qt = fake_linear(w, wspec, aspec, r4)
    centred = qt.codes.to(torch.int16)
    if not qt.symmetric:
        zero = qt.zero.reshape(80, -1).to(torch.int16)
        centred = centred - zero.repeat_interleave(96 // zero.shape[1], dim=-1)
    real = IntLinear(centred.to(torch.int8), qt.scale, aspec, weight_group=qt.group_size, hadamard=r4)
    x = torch.randn(2, 7, 96)
    x[..., 5] *= 30  # an outlier channel
    with torch.no_grad():
        ref, out = fake(x), real(x)
    # Integer accumulation is exact; only the float sum in the fake path differs (float rounding).
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


needs_native = pytest.mark.skipif(not native.available(), reason="the native kernel needs a C++ compiler and AVX2")


def test_block32_layout_round_trips_and_matches_q4_0_order():
    u = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = to_block32(u)
    assert packed.shape == (3, 32)
    assert torch.equal(packed[:, 0] & 0x0F, u[:, 0]) and torch.equal(packed[:, 0] >> 4, u[:, 16])
    assert torch.equal(from_block32(packed), u)


@needs_native
@pytest.mark.parametrize("label,wspec,aspec", [
    ("W4A8", QuantSpec(4, True, clip_search=True), QuantSpec(8, False, clip_ratio=0.9)),
    ("W4A8-sym", QuantSpec(4, True), QuantSpec(8, True)),
    ("W4A4", QuantSpec(4, True, clip_search=True), QuantSpec(4, False, clip_ratio=0.9)),
    ("W4A4-asym-w", QuantSpec(4, False), QuantSpec(4, False, clip_ratio=0.9)),
    ("W3A8", QuantSpec(3, True), QuantSpec(8, False)),
    ("W4g32A8", QuantSpec(4, True, group_size=32), QuantSpec(8, False, clip_ratio=0.9)),
    ("W4g32A4g32", QuantSpec(4, False, group_size=32), QuantSpec(4, False, group_size=32, clip_ratio=0.9)),
    ("W4A4g32", QuantSpec(4, True), QuantSpec(4, False, group_size=32, clip_ratio=0.9)),
])
@pytest.mark.parametrize("rows,n,k", [(1, 70, 96), (3, 70, 96), (9, 70, 96), (42, 71, 576)])
def test_packed_int4_kernel_equals_the_int8_kernel_bit_for_bit(label, wspec, aspec, rows, n, k):
    """Decode rows (packed weights), prefill tiles of 4 rows (unpacked weights, 16-bit partial sums, the
    vector epilogue), an odd last column and a remainder of rows: all the int8 reference's bits."""
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.05
    _, qt = fake_linear(w, wspec, aspec)
    centred = qt.codes.to(torch.int16)
    if not qt.symmetric:
        zero = qt.zero.reshape(n, -1).to(torch.int16)
        centred = centred - zero.repeat_interleave(k // zero.shape[1], dim=-1)
    bias = torch.randn(n)
    ref = IntLinear(centred.to(torch.int8), qt.scale, aspec, bias, weight_group=qt.group_size, hadamard=True)
    group = qt.group_size or aspec.group_size or k
    packed = Int4Linear(qt.codes, qt.scale, None if qt.symmetric else qt.zero, wspec, aspec, group, bias,
                        hadamard=True)
    x = torch.randn(rows, k)
    x[:, 5] *= 30
    assert torch.equal(packed(x), ref(x))


@needs_native
@pytest.mark.parametrize("rows,n,k", [(1, 50, 64), (2, 50, 64), (17, 50, 64), (263, 61, 576)])
@pytest.mark.parametrize("act", [QuantSpec(8, True), QuantSpec(8, False, clip_ratio=0.9), QuantSpec(4, False)])
def test_native_int8_weights_equal_the_int8_matmul(rows, n, k, act):
    """Single rows, 4-row prefill tiles over L1 strips of columns and 256-row blocks, odd remainders."""
    torch.manual_seed(1)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    lin = IntLinear(w, torch.rand(n) + 0.01, act, torch.randn(n))
    assert lin.native
    x = torch.randn(rows, k)
    native_out = lin(x)
    lin.native = False
    assert torch.equal(native_out, lin(x))


@needs_native
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_packed_int4_float_activations_equal_the_dequantized_weight(group, symmetric):
    w = torch.randn(48, 64)
    spec = QuantSpec(4, symmetric, group_size=group)
    qt = quantize_weight(w, spec)
    lin = Int4Linear(qt.codes, qt.scale, None if symmetric else qt.zero, spec, None, group or 64)
    x = torch.randn(5, 64)
    ref = x @ qt.dequantize().t()
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("mode", ["cached", "otf", "int4pack"])
@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_only_linear_equals_dequantized_weight(mode, group, symmetric):
    w = torch.randn(48, 64)
    qt = quantize_weight(w, QuantSpec(4, symmetric, group_size=group))
    lin = WeightOnlyLinear(qt.codes, qt.scale, None if symmetric else qt.zero, qt.group_size, mode=mode)
    x = torch.randn(5, 64)
    ref = x @ qt.dequantize().t()
    tol = 1e-5 if mode != "int4pack" else 1e-2 * ref.abs().max().item()  # int4pack computes in bf16
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=tol)


# --------------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rotate", [True, False])
def test_quantized_kv_cache_matches_fake_kv_quant_step_by_step(bits, rotate):
    spec = QuantSpec(bits, symmetric=False, clip_ratio=0.95)
    fake = KVQuant(64, rotate_qk=rotate)
    fake.key_quant.spec = fake.value_quant.spec = spec
    layer = QuantKVLayer(spec, spec, rotate_keys=rotate)
    keys = torch.randn(2, 3, 9, 64)
    values = torch.randn(2, 3, 9, 64)
    for lo, hi in [(0, 6), (6, 7), (7, 9)]:  # prefill, then decode steps
        k, v = layer.update(keys[:, :, lo:hi], values[:, :, lo:hi])
        _, k_ref, v_ref = fake(torch.zeros(2, 3, 1, 64), keys[:, :, :hi], values[:, :, :hi])
        assert torch.equal(v, v_ref)
        torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-6 if rotate else 0)
    assert layer.get_seq_length() == 9
    # Stored at the configured width: codes + per-token-per-head float scale and zero.
    per_vector = 64 * bits // 8 + 8
    assert layer.nbytes() == 2 * 2 * 3 * 9 * per_vector


# ---------------------------------------------------------------------------------- save / load / model


@pytest.mark.parametrize("w,a,kv,tables", [(4, 4, 4, "int8"), (4, 4, 4, "float32"), (4, 4, 4, "bfloat16"),
                                           (4, 8, 8, "int8"), (8, 8, 8, "float16")])
def test_saved_model_matches_fake_quant_model(tmp_path, w, a, kv, tables):
    model, cfg = quantized_tiny(w=w, a=a, kv=kv, tables=tables)
    loaded, _ = save_load(model, cfg, tmp_path / "q")
    # fused qkv, o, fused gate/up, down per layer (4-bit ones read packed by the native kernel where it
    # is built); plus lm_head as W8A8 over an int8 table
    kinds = module_summary(loaded)
    packed = 2 * 4 if w == 4 and native.available() else 0
    assert kinds.get("Int4Linear", 0) == packed
    assert kinds.get("IntLinear", 0) == 2 * 4 - packed + (tables == "int8")
    ids = torch.randint(0, 260, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(ids).logits, loaded(ids).logits
    # Bit for bit: the in-memory model evaluates in the kernels' integer order, with the same online
    # Hadamard and the same embedding / lm_head tables, so not even float rounding differs (at W4A4 a 1e-7
    # difference would compound, layer by layer).
    assert torch.equal(ref, out)


@pytest.mark.parametrize("family", ["llama-tied", "mistral", "qwen2", "qwen3"])
def test_saved_model_matches_fake_quant_for_every_family(tmp_path, family):
    model, cfg = quantized_tiny(family)
    loaded, _ = save_load(model, cfg, tmp_path / "q")
    ids = torch.randint(0, 260, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_grouped_and_weight_only_checkpoints(tmp_path):
    for i, kw in enumerate([{"w_group": 32}, {"w_group": 32, "a_group": 32}, {"a": 16, "kv": 16},
                            {"w_group": 32, "a": 16, "kv": 16, "w_full_range": True}, {"w_full_range": True}]):
        model, cfg = quantized_tiny(**kw)
        loaded, _ = save_load(model, cfg, tmp_path / f"q{i}")
        ids = torch.randint(0, 260, (1, 24), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-4)


def test_greedy_generation_matches_fake_quant_model(tmp_path):
    model, cfg = quantized_tiny(w=4, a=4, kv=4)
    loaded, _ = save_load(model, cfg, tmp_path / "q")
    prompt = torch.randint(0, 260, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=10, do_sample=False)
        out = loaded.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref)


def test_int8_tables_shrink_the_checkpoint_and_stay_close(tmp_path):
    model, cfg = quantized_tiny(w=4, a=8, kv=8)  # default: int8 embedding and lm_head
    float_model, float_cfg = quantized_tiny(w=4, a=8, kv=8, tables="float32")
    save_quantized(model, byte_tokenizer(), cfg, tmp_path / "int8")
    save_quantized(float_model, byte_tokenizer(), float_cfg, tmp_path / "f32")
    size = {n: (tmp_path / n / "model.safetensors").stat().st_size for n in ("int8", "f32")}
    assert size["int8"] < size["f32"] - 2 * 260 * 64 * 2  # two 260x64 tables: 4 bytes → 1 byte + scales
    loaded, _ = load_quantized(tmp_path / "int8")
    assert module_summary(loaded)["Int8Embedding"] == 1
    ids = torch.randint(0, 260, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, out = float_model(ids).logits, loaded(ids).logits
        assert torch.equal(out, model(ids).logits)  # the in-memory model already used the int8 tables
    assert 0 < (ref - out).abs().max() < 0.2 * ref.abs().max()


def test_saving_reuses_the_models_own_table_codes(tmp_path):
    from safetensors import safe_open

    from spinquant.models import model_parts

    model, cfg = quantized_tiny("qwen2", w=4, a=8, kv=8)  # tied: one int8 table serves embedding and lm_head
    parts = model_parts(model)
    save_quantized(model, byte_tokenizer(), cfg, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.embed_tokens.qweight"), parts.embedding.table.codes)
        assert torch.equal(f.get_tensor("model.embed_tokens.scale"), parts.embedding.table.scale)
        assert torch.equal(f.get_tensor("lm_head.tied_transform"), parts.lm_head.transform)


def test_tied_models_store_one_table(tmp_path):
    from safetensors import safe_open

    model, cfg = quantized_tiny("qwen2", tables="float32")  # tied before quantization: lm_head = embedding · M
    save_quantized(model, byte_tokenizer(), cfg, tmp_path / "q")  # lm_head="auto"
    assert json.loads((tmp_path / "q" / "config.json").read_text())["spinquant"]["lm_head"] == "tied"
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.tied_transform" in keys and "lm_head.weight" not in keys
    loaded, _ = load_quantized(tmp_path / "q")
    ids = torch.randint(0, 260, (1, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    untied, cfg = quantized_tiny("llama")
    with pytest.raises(SpinQuantError, match="not tied"):
        save_quantized(untied, byte_tokenizer(), cfg, tmp_path / "u", lm_head="tied")


def test_checkpoint_layout_and_config(tmp_path):
    from safetensors import safe_open

    model, cfg = quantized_tiny(w=4, a=8, kv=8)
    save_quantized(model, byte_tokenizer(), cfg, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    sq = config["spinquant"]
    assert config["tie_word_embeddings"] is False
    assert sq["quantization"]["label"] == "W4A8KV8"
    assert sq["online_hadamard"] == {"r3": 16, "r4": 96}
    assert sq["run_config"]["quant"]["weight"]["bits"] == 4
    assert "model.safetensors" in sq["files"] and len(sq["files"]["model.safetensors"]) == 64
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        assert q.dtype == torch.uint8 and tuple(q.shape) == (64, 48)  # [out, in / 2]
        assert f.get_tensor("model.layers.0.mlp.down_proj.scale").shape == (64,)
        assert f.get_tensor("model.embed_tokens.qweight").dtype == torch.int8


def test_refuses_to_overwrite(tmp_path):
    model, cfg = quantized_tiny()
    out = tmp_path / "q"
    save_quantized(model, byte_tokenizer(), cfg, out)
    with pytest.raises(SpinQuantError, match="already exists"):
        save_quantized(model, byte_tokenizer(), cfg, out)
    save_quantized(model, byte_tokenizer(), cfg, out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_refuses_an_unquantized_model(tmp_path):
    with pytest.raises(SpinQuantError, match="not quantized"):
        save_quantized(tiny_model(), byte_tokenizer(), None, tmp_path / "q")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_tampered_weights_are_refused(tmp_path, damage):
    model, cfg = quantized_tiny()
    out = tmp_path / "q"
    save_quantized(model, byte_tokenizer(), cfg, out)
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    f.write_bytes(bytes(data))
    with pytest.raises(SpinQuantError, match="model.safetensors.*re-save"):
        load_quantized(out)


def test_load_never_unpickles(tmp_path, monkeypatch):
    model, cfg = quantized_tiny()
    save_quantized(model, byte_tokenizer(), cfg, tmp_path / "q")

    def forbidden(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded, tok = load_quantized(tmp_path / "q")
    assert tok is not None and loaded(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 260)
    assert {p.suffix for p in (tmp_path / "q").iterdir()} <= {".json", ".safetensors", ".txt", ".jinja"}


def test_spinquant_load_and_load_model_detect_the_checkpoint(tmp_path):
    import spinquant
    from spinquant.loading import load_model

    model, cfg = quantized_tiny()
    save_quantized(model, byte_tokenizer(), cfg, tmp_path / "q")
    m = spinquant.load(tmp_path / "q")
    assert hasattr(m, "generate") and m.tokenizer is not None
    m2, tok = load_model(str(tmp_path / "q"))
    assert type(m2).__name__.startswith("SpinQuant") and tok is not None


def test_foreign_cache_is_refused(tmp_path):
    from transformers import DynamicCache

    model, cfg = quantized_tiny()
    loaded, _ = save_load(model, cfg, tmp_path / "q")
    with pytest.raises(SpinQuantError, match="KV cache"):
        loaded(torch.tensor([[1, 2]]), cache=DynamicCache())


def test_decode_with_cache_equals_full_forward(tmp_path):
    model, cfg = quantized_tiny(w=4, a=4, kv=4)
    loaded, _ = save_load(model, cfg, tmp_path / "q")
    ids = torch.randint(0, 260, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = loaded(ids).logits
        cache = loaded.new_cache()
        loaded(ids[:, :10], cache=cache, use_cache=True)
        steps = [loaded(ids[:, i: i + 1], cache=cache, use_cache=True).logits for i in range(10, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 10:], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def saved_dir(tmp_path):
    model, cfg = quantized_tiny()
    return save_quantized(model, byte_tokenizer(), cfg, tmp_path / "q")


def test_cli_generate_echoes_the_prompt_and_reports_speed(saved_dir, capsys, monkeypatch):
    """stdout: the prompt, its continuation, then (--json) the record; stderr: tokens and tokens/s; --threads
    reaches torch."""
    import torch

    from spinquant.cli import main

    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    assert main(["generate", str(saved_dir), "hello", "--max-new-tokens", "5", "--threads", "1", "--json"]) == 0
    captured = capsys.readouterr()
    *text, last = captured.out.strip().splitlines()
    result = json.loads(last)
    assert result["new_tokens"] == 5 and result["tokens_per_s"] > 0 and threads == [1]
    assert "\n".join(text) == "hello" + result["text"]
    assert "5 new tokens in" in captured.err and "tokens/s" in captured.err


def test_generation_stops_at_an_end_of_turn_token():
    from spinquant.runtime.generate import _eos_ids

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    model = tiny_model("llama", vocab_size=260)
    assert _eos_ids(model, tok)[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_cli_chat_reads_lines_until_exit(saved_dir, capsys, monkeypatch):
    from spinquant.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nthere\nexit\nnever read\n"))
    assert main(["chat", str(saved_dir), "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["turns"] == 2


def test_cli_eval_takes_the_folder(saved_dir, tmp_path, capsys):
    from spinquant.cli import main

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = ["eval", str(saved_dir), "--eval-data", str(text), "--seq-len", "64", "--max-windows", "2", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "W4A4KV4" and result["ppl"] > 1


def test_cli_quantize_output_refuses_existing_folder(saved_dir, capsys):
    from spinquant.cli import main

    args = ["quantize", "--model", str(saved_dir), "--output", str(saved_dir), "--no-eval"]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_bench_gpu_script_runs_tiny_on_cpu():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_runtime_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_runtime_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
                       "--vocab", "256", "--prefill", "16", "--decode", "2", "--repeats", "1", "--device", "cpu"])
    assert {r["config"] for r in rows} >= {"bf16", "w8a8", "w4a8"}


def test_deepcopy_of_loaded_model_still_runs(tmp_path):
    model, cfg = quantized_tiny()
    loaded, _ = save_load(model, cfg, tmp_path / "q")
    clone = copy.deepcopy(loaded)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(clone(ids).logits, loaded(ids).logits)


def test_without_the_native_kernel_the_pytorch_path_computes_the_same(tmp_path, monkeypatch):
    model, cfg = quantized_tiny(w=4, a=4, kv=4)
    fast, _ = save_load(model, cfg, tmp_path / "q")
    ids = torch.randint(0, 260, (1, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = fast(ids).logits
    monkeypatch.setitem(native._state, "module", None)  # as on a machine without a compiler or AVX2
    plain, _ = load_quantized(tmp_path / "q")
    assert "Int4Linear" not in module_summary(plain)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, expected)
