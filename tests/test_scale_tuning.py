"""End-to-end scale tuning: codes stay, scales move toward the float model, the model stays consistent."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from spinquant.config import QuantConfig, QuantSpec, RunConfig
from spinquant.errors import SpinQuantError
from spinquant.pipeline import quantize_model
from spinquant.quant.modules import QuantLinear
from spinquant.quant.scale_tuning import float_model, tune_weight_scales

pytestmark = pytest.mark.usefixtures("one_thread")


def quantized(family: str, act_bits: int = 16):
    """A tiny float model and its W3 RTN copy (Hadamard), with per-token activations at `act_bits`."""
    fp = tiny_model(family)
    cfg = RunConfig()
    act = QuantSpec(bits=act_bits, symmetric=False, clip_ratio=0.9) if act_bits < 16 else QuantSpec(bits=16)
    cfg.quant = QuantConfig(weight=QuantSpec(bits=3, symmetric=True), act=act, key=QuantSpec(bits=16),
                            value=QuantSpec(bits=16))
    cfg.tables = "float32"
    q = copy.deepcopy(fp)
    quantize_model(q, cfg, progress=False)
    return fp, q


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 96, (n, 24), generator=torch.Generator().manual_seed(seed))


def kl_to(fp, q, x) -> float:
    with torch.no_grad():
        t = fp(input_ids=x).logits.log_softmax(-1)
        s = q(input_ids=x).logits.log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.mark.parametrize("act_bits", [16, 4])
def test_tuning_lowers_the_kl_and_keeps_codes(family, act_bits):
    fp, q = quantized(family, act_bits)
    linears = [m for m in q.modules() if isinstance(m, QuantLinear)]
    codes = [m.quantized.codes.clone() for m in linears]
    scales = [m.quantized.scale.clone() for m in linears]
    calib, held_out = ids(16, 0), ids(8, 1)
    before = kl_to(fp, q, held_out)
    losses = tune_weight_scales(q, lambda x: fp(input_ids=x).logits, calib, steps=30, batch=4, lr=1e-2,
                                progress=False)
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    assert kl_to(fp, q, held_out) < before
    assert any(not torch.equal(m.quantized.scale, s) for m, s in zip(linears, scales))
    for m, c in zip(linears, codes):
        assert torch.equal(m.quantized.codes, c)  # only the scales moved
        assert torch.equal(m.weight, m.quantized.dequantize(m.weight.dtype))  # the stored weight follows them
    assert all(not p.requires_grad or p.grad is None for p in q.parameters())


def test_non_finite_loss_leaves_the_model_untouched():
    _, q = quantized("llama")
    scales = [m.quantized.scale.clone() for m in q.modules() if isinstance(m, QuantLinear)]
    with pytest.raises(SpinQuantError, match="lower the learning rate"):
        tune_weight_scales(q, lambda x: torch.full((*x.shape, 96), float("nan")), ids(4, 0), steps=3,
                           progress=False)
    after = [m.quantized.scale for m in q.modules() if isinstance(m, QuantLinear)]
    assert all(torch.equal(a, b) for a, b in zip(after, scales))


def test_needs_quantized_weights():
    with pytest.raises(SpinQuantError, match="after RTN or GPTQ"):
        tune_weight_scales(tiny_model("llama"), lambda x: x, ids(2, 0), steps=1, progress=False)


def tuned_config(steps: int, act_bits: int = 4) -> RunConfig:
    cfg = RunConfig()
    cfg.quant = QuantConfig(weight=QuantSpec(bits=3, symmetric=True),
                            act=QuantSpec(bits=act_bits, symmetric=False, clip_ratio=0.9))
    cfg.rotation.mode = "hadamard"
    cfg.tables = "float32"
    cfg.tune.steps, cfg.tune.batch, cfg.tune.lr = steps, 4, 1e-2
    return cfg


def test_quantize_model_tunes_against_the_float_network(family):
    fp = tiny_model(family)
    plain, tuned = copy.deepcopy(fp), copy.deepcopy(fp)
    quantize_model(plain, tuned_config(0), progress=False)
    report = quantize_model(tuned, tuned_config(30), progress=False, calib_ids=ids(16, 0))
    assert len(report.tune_losses) == 30 and "tune" in report.seconds
    held_out = ids(8, 1)
    assert kl_to(fp, tuned, held_out) < kl_to(fp, plain, held_out)


def test_float_model_is_the_float_network(family):
    """The teacher: the rotated model with float weights and quantizers off computes the original logits."""
    fp = tiny_model(family)
    q = copy.deepcopy(fp)
    cfg = tuned_config(0)
    quantize_model(q, cfg, progress=False)  # rotated and quantized; its float weights are gone
    ref = copy.deepcopy(fp)
    quantize_model(ref, RunConfig(quant=QuantConfig(weight=QuantSpec(bits=16), act=QuantSpec(bits=16),
                                                    key=QuantSpec(bits=16), value=QuantSpec(bits=16)),
                                  tables="float32"), progress=False)  # the same rotations, nothing quantized
    float_weights = {a: b.weight.data for a, b in zip(
        [m for m in q.modules() if isinstance(m, QuantLinear)],
        [m for m in ref.modules() if isinstance(m, QuantLinear)])}
    x = ids(2, 3)
    with torch.no_grad(), float_model(q, float_weights):
        got = q(input_ids=x).logits
    with torch.no_grad():
        want = fp(input_ids=x).logits
        after = q(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(after, want, atol=1e-3)  # and the quantized model is back afterwards


def test_tuned_model_saves_and_runs_bit_for_bit(tmp_path):
    """Tuning changes only scales: the packed runtime computes exactly what the tuned in-memory model does."""
    from conftest import byte_tokenizer

    from spinquant.runtime.checkpoint import load_quantized, save_quantized

    model = tiny_model("llama", vocab_size=260)
    cfg = tuned_config(10)
    cfg.tables = "int8"
    quantize_model(model, cfg, progress=False,
                   calib_ids=torch.randint(0, 260, (8, 24), generator=torch.Generator().manual_seed(0)))
    save_quantized(model, byte_tokenizer(), cfg, tmp_path / "q")
    loaded, _ = load_quantized(tmp_path / "q")
    x = torch.randint(0, 260, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("flags, message", [
    (["--tune-scales", "-1"], "must be 0"),
    (["--tune-scales", "5", "--tune-lr", "nan"], "positive number"),
    (["--tune-scales", "5", "--w-bits", "16"], "needs quantized weights"),
    (["--tune-scales", "5", "--offload"], "drop --offload"),
])
def test_cli_refuses_bad_tuning_flags(flags, message):
    from spinquant.cli import config_from_args, parse_args

    with pytest.raises(SpinQuantError, match=message):
        config_from_args(parse_args(["quantize", *flags]))


def test_cli_flags_reach_the_config():
    from spinquant.cli import config_from_args, parse_args

    cfg = config_from_args(parse_args(["quantize", "--tune-scales", "40", "--tune-lr", "2e-3", "--calib-data", "c4"]))
    assert (cfg.tune.steps, cfg.tune.lr, cfg.tune.calib_data) == (40, 2e-3, "c4")


def test_long_caller_windows_are_cut_to_the_tuning_length(monkeypatch):
    """Memory grows with window length: windows given for GPTQ (2048 tokens) are cut to tune.seq_len."""
    import spinquant.quant.scale_tuning as st

    seen = []
    real = st.tune_weight_scales

    def spy(model, teacher, calib_ids, *args, **kw):
        seen.append(tuple(calib_ids.shape))
        return real(model, teacher, calib_ids, *args, **kw)

    monkeypatch.setattr(st, "tune_weight_scales", spy)
    cfg = tuned_config(2)
    cfg.tune.seq_len = 24
    long_windows = torch.randint(0, 96, (3, 50), generator=torch.Generator().manual_seed(0))
    quantize_model(tiny_model("llama"), cfg, progress=False, calib_ids=long_windows)
    assert seen == [(6, 24)]


def test_checkpoints_see_the_model_as_a_shorter_run_leaves_it():
    fp, q = quantized("llama", act_bits=4)
    q_short = copy.deepcopy(q)
    teacher, calib, x = (lambda ids_: fp(input_ids=ids_).logits), ids(16, 0), ids(4, 1)
    with torch.no_grad():
        untuned = q(input_ids=x).logits
    seen: dict[int, torch.Tensor] = {}

    def look(steps_done: int) -> None:
        with torch.no_grad():
            seen[steps_done] = q(input_ids=x).logits.clone()

    tune_weight_scales(q, teacher, calib, steps=6, batch=4, lr=1e-2, progress=False, every=3, checkpoint=look)
    tune_weight_scales(q_short, teacher, calib, steps=3, batch=4, lr=1e-2, progress=False)
    assert sorted(seen) == [0, 3, 6]
    torch.testing.assert_close(seen[0], untuned, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(seen[3], q_short(input_ids=x).logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(seen[6], q(input_ids=x).logits, rtol=0, atol=0)
    assert not torch.equal(seen[3], seen[6])


def test_tuned_scales_export_to_compressed_tensors(tmp_path):
    """The tuned scales are what the export writes: stock transformers computes the tuned model's logits."""
    pytest.importorskip("compressed_tensors")
    import transformers
    from conftest import byte_tokenizer

    from spinquant.export import export_compressed_tensors

    model = tiny_model("llama", vocab_size=260)
    cfg = tuned_config(10, act_bits=16)
    cfg.quant.weight = QuantSpec(bits=4, symmetric=True, group_size=16)
    cfg.quant.key = cfg.quant.value = QuantSpec(bits=16)
    cfg.rotation.r3 = cfg.rotation.r4 = False
    calib = torch.randint(0, 260, (8, 24), generator=torch.Generator().manual_seed(0))
    untuned = copy.deepcopy(model)
    quantize_model(model, cfg, progress=False, calib_ids=calib)
    cfg.tune.steps = 0
    quantize_model(untuned, cfg, progress=False, calib_ids=calib)
    out = export_compressed_tensors(model, byte_tokenizer(), tmp_path / "ct", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = torch.randint(0, 260, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(hf(x).logits, untuned(x).logits, atol=1e-3)  # the tuning reached the file
