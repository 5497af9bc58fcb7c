"""Rotation training: the training-time parametrisation equals the merged model, and a short run works."""


import pytest
import torch
from conftest import tiny_model

from spinquant.config import QuantConfig, QuantSpec, RunConfig
from spinquant.errors import SpinQuantError
from spinquant.models import model_parts
from spinquant.pipeline import quantize_model
from spinquant.quant.install import install_modules
from spinquant.rotation.merge import merge_r1, merge_r2, prepare
from spinquant.rotation.sets import load_rotations, make_rotations, save_rotations
from spinquant.training.loop import RotationParams, _Installed, train_rotations

OFF = QuantSpec(bits=16)


def prepared(family="llama", dtype=torch.float64):
    model = tiny_model(family, dtype=dtype)
    parts = model_parts(model)
    prepare(parts)
    install_modules(parts, r3=True, r4=True)
    return model, parts


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_training_forward_equals_merged_model(family):
    """Wrappers computing W·R on the fly give the logits of the model with R merged (quantizers off)."""
    model, parts = prepared(family)
    rot = make_rotations("random", parts.hidden_size, parts.head_dim, len(parts.layers), seed=3)
    ids = torch.randint(0, 96, (2, 12))
    params = RotationParams(rot).double()
    installed = _Installed(parts, params, OFF)
    with torch.no_grad():
        training_logits = model(ids).logits
    installed.remove()
    merge_r1(parts, rot.r1)
    merge_r2(parts, rot.r2)
    with torch.no_grad():
        merged_logits = model(ids).logits
    assert (training_logits - merged_logits).abs().max() < 1e-5  # HF RMSNorm runs in float32


def tiny_train_config(steps=2, **quant) -> RunConfig:
    cfg = RunConfig()
    cfg.rotation.mode = "learned"
    cfg.train.steps, cfg.train.batch, cfg.train.seq_len, cfg.train.lr = steps, 2, 16, 1.0
    cfg.quant = QuantConfig(**quant) if quant else QuantConfig()
    return cfg


def test_teacher_forward_is_the_float_model_and_quantizers_come_back():
    """The KL loss's teacher runs the training model with every quantizer off: with the rotations cancelling,
    that is the original float model; afterwards the quantized forward is back."""
    model = tiny_model("llama", dtype=torch.float64)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        original = model(ids).logits
    parts = model_parts(model)
    prepare(parts)
    install_modules(parts, r3=True, r4=True)
    q = QuantConfig()  # W4A4KV4
    from spinquant.quant.install import set_activation_quant

    set_activation_quant(parts, q)
    rot = make_rotations("random", parts.hidden_size, parts.head_dim, len(parts.layers), seed=1)
    installed = _Installed(parts, RotationParams(rot).double(), q.weight)
    installed.refresh_clip()
    with torch.no_grad():
        quantized = model(ids).logits
        with installed.float_forward():
            teacher = model(ids).logits
        again = model(ids).logits
    installed.remove()
    assert (teacher - original).abs().max() < 1e-5
    assert (quantized - original).abs().max() > 1e-2  # the quantizers were really on
    assert torch.equal(again, quantized)


def test_clip_refresh_matches_the_final_clip_search():
    """In RTN mode training sees the clip-searched grid of the rotated weight, not the min-max one."""
    from spinquant.quant.quantizer import quantize_weight

    _model, parts = prepared("llama", torch.float32)
    spec = QuantSpec(bits=4, clip_search=True)
    rot = make_rotations("random", parts.hidden_size, parts.head_dim, len(parts.layers), seed=2)
    installed = _Installed(parts, RotationParams(rot), spec)
    wrapper = installed.wrappers()[0]
    wrapper.refresh_clip()
    w_train = wrapper.effective()[0].detach()
    final = quantize_weight(wrapper.rotated()[0].detach(), spec).dequantize()
    minmax = quantize_weight(wrapper.rotated()[0].detach(), QuantSpec(bits=4)).dequantize()
    installed.remove()
    # The training grid is a coarse search (every 4 %), so it is close to the final one, and not min-max.
    assert (w_train - final).abs().mean() < 0.5 * (minmax - final).abs().mean()


def test_two_step_training_smoke():
    model, parts = prepared("llama", torch.float32)
    init = make_rotations("learned", parts.hidden_size, parts.head_dim, len(parts.layers))
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_rotations(parts, init, tiny_train_config(), calib_ids=calib, progress=False)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    r1 = result.rotations.r1.double()
    assert (r1.T @ r1 - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-5
    assert (result.rotations.r1 - init.r1.float()).abs().max() > 1e-4, "R1 did not move"
    # Weights stay frozen and the wrappers are gone.
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights_before[n])
    assert all(type(m).__name__ != "RotatedLinear" for m in model.modules())
    assert result.summary["steps"] == 2 and result.summary["tokens"] == 2 * 2 * 16


def test_learned_pipeline_with_calibration_ids_and_saved_rotations(tmp_path):
    model = tiny_model("qwen2")
    cfg = tiny_train_config()
    cfg.rotation.save_file = str(tmp_path / "rot.safetensors")
    calib = torch.randint(0, 96, (4, 16))
    report = quantize_model(model, cfg, progress=False, calib_ids=calib)
    assert report.train["steps"] == 2
    assert (tmp_path / "rot.safetensors").is_file()
    assert (tmp_path / "rot.safetensors.loss.csv").is_file()
    # Reusing the saved file gives the same quantized model without training.
    again = tiny_model("qwen2")
    cfg2 = tiny_train_config()
    cfg2.rotation.rotation_file = cfg.rotation.save_file
    report2 = quantize_model(again, cfg2, progress=False)
    assert report2.train is None
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)


@pytest.mark.parametrize("layout", ["ours", "reference"])
def test_rotation_files_round_trip_and_give_identical_logits(tmp_path, layout):
    rot = make_rotations("random", 64, 16, 2, seed=5).to(torch.float32)
    path = save_rotations(rot, tmp_path / f"r.{layout}", layout=layout)
    back = load_rotations(path)
    assert torch.equal(back.r1, rot.r1) and all(torch.equal(a, b) for a, b in zip(back.r2, rot.r2))
    if layout == "reference":
        d = torch.load(path, weights_only=True)
        assert set(d) == {"R1", "model.layers.0.self_attn.R2", "model.layers.1.self_attn.R2"}
    models = []
    for r in (rot, back):
        model, parts = prepared("llama", torch.float32)
        merge_r1(parts, r.r1)
        merge_r2(parts, r.r2)
        models.append(model)
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert torch.equal(models[0](ids).logits, models[1](ids).logits)


def test_non_finite_loss_stops_with_clear_error():

    model, parts = prepared("llama", torch.float32)
    with torch.no_grad():
        parts.layers[1].down.weight[0, 0] = float("nan")
    init = make_rotations("learned", parts.hidden_size, parts.head_dim, len(parts.layers))
    with pytest.raises(SpinQuantError, match="loss became nan"):
        train_rotations(parts, init, tiny_train_config(), calib_ids=torch.randint(0, 96, (4, 16)), progress=False)
    assert all(type(m).__name__ != "RotatedLinear" for m in model.modules())


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_resumed_training_reaches_the_same_rotations(tmp_path, loss):
    """Stop after 2 of 4 steps (checkpoint), resume: same rotations as an uninterrupted 4-step run. The clip
    search runs every 3 steps, so the resumed run must also restore the clip ranges from the checkpoint."""
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))

    def run(**train):
        _model, parts = prepared("llama", torch.float32)
        init = make_rotations("learned", parts.hidden_size, parts.head_dim, len(parts.layers))
        cfg = tiny_train_config(steps=4)
        cfg.train.loss, cfg.train.clip_every = loss, 3
        for k, v in train.items():
            setattr(cfg.train, k, v)
        return train_rotations(parts, init, cfg, calib_ids=calib, progress=False)

    full = run()
    ckpt = tmp_path / "train.ckpt"
    import spinquant.training.loop as train_mod

    name = "distillation_loss" if loss == "kl" else "next_token_loss"
    original = getattr(train_mod, name)
    calls = {"n": 0}

    def interrupting(*args):
        # Interrupt right after the step-2 checkpoint by making step 3's batch blow up.
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args)

    setattr(train_mod, name, interrupting)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(checkpoint=str(ckpt), checkpoint_every=2)
    finally:
        setattr(train_mod, name, original)
    assert ckpt.is_file()
    resumed = run(checkpoint=str(ckpt), resume=str(ckpt))
    assert len(resumed.losses) == 4 and resumed.losses[:2] == full.losses[:2]
    assert (resumed.rotations.r1 - full.rotations.r1).abs().max() <= 1e-6
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(resumed.rotations.r2, full.rotations.r2))


def test_resume_refuses_a_foreign_file(tmp_path):

    bad = tmp_path / "bad.ckpt"
    torch.save({"format": "something else"}, bad)
    _model, parts = prepared("llama", torch.float32)
    init = make_rotations("learned", parts.hidden_size, parts.head_dim, len(parts.layers))
    cfg = tiny_train_config()
    cfg.train.resume = str(bad)
    with pytest.raises(SpinQuantError, match="cannot resume"):
        train_rotations(parts, init, cfg, calib_ids=torch.randint(0, 96, (4, 16)), progress=False)


def test_activation_ste_is_configurable_and_restored():
    from spinquant.quant.modules import ActQuantizer
    from spinquant.training.loop import training_act_ste

    cfg = RunConfig()
    assert training_act_ste(cfg) == "identity"  # clipped outliers still send gradient
    cfg.train.act_ste = "clipped"
    assert training_act_ste(cfg) == "clipped"
    _model, parts = prepared()
    quantizers = [m for m in parts.model.modules() if isinstance(m, ActQuantizer)]
    installed = _Installed(parts, RotationParams(make_rotations("random", parts.hidden_size, parts.head_dim,
                                                                len(parts.layers), seed=0)).double(),
                           OFF, act_ste="identity")
    assert quantizers and all(q.ste == "identity" for q in quantizers)
    installed.remove()
    assert all(q.ste == "clipped" for q in quantizers)


def test_gptq_runs_train_with_float_weights_unless_told_otherwise():
    from spinquant.training.loop import training_weight_spec

    cfg = RunConfig()
    assert training_weight_spec(cfg).bits == 4  # RTN: the final grid in the loop
    cfg.quant.weight_method = "gptq"
    assert training_weight_spec(cfg).bits == 16  # GPTQ places the weights itself
    cfg.train.for_gptq = False
    assert training_weight_spec(cfg).bits == 4


def test_r2_alone_trains_r2_and_leaves_r1_the_identity(tmp_path):
    """--no-r1 with weights the only quantizer (a GGUF target): the weight grid in the loop moves R2, R1
    stays the identity, and a rotation file with a trained R1 is refused for such a run."""
    model = tiny_model("llama-tied")
    cfg = tiny_train_config(weight=QuantSpec(bits=4, group_size=16, clip_search=True), act=OFF, key=OFF, value=OFF)
    cfg.quant.weight_method = "gptq"
    cfg.train.for_gptq = False  # --train-weights grid
    cfg.rotation.r1, cfg.rotation.r3, cfg.rotation.r4 = False, False, False
    cfg.rotation.save_file = str(tmp_path / "r2.safetensors")
    parts = model_parts(model)
    init = make_rotations("learned", parts.hidden_size, parts.head_dim, len(parts.layers), r1=False)
    report = quantize_model(model, cfg, progress=False, calib_ids=torch.randint(0, 96, (8, 16)))
    assert report.train["first_loss"] > 0  # the quantized weights are in the loop (a float loop gives KL 0)
    learned = model.spinquant_rotations
    assert torch.equal(learned.r1, torch.eye(parts.hidden_size))
    assert max((a - b.float()).abs().max().item() for a, b in zip(learned.r2, init.r2)) > 1e-4, "R2 did not move"
    assert torch.equal(parts.lm_head.weight, parts.embedding.weight)

    other = tmp_path / "r1.safetensors"
    save_rotations(make_rotations("hadamard", parts.hidden_size, parts.head_dim, len(parts.layers)), other)
    cfg.rotation.rotation_file, cfg.rotation.save_file = str(other), None
    with pytest.raises(SpinQuantError, match="trained R1"):
        quantize_model(tiny_model("llama-tied"), cfg, progress=False, calib_ids=torch.randint(0, 96, (8, 16)))
