"""Layer streaming (--offload): one decoder layer at a time visits the compute device, and the results are
those of the all-in-memory path. On this CPU machine the device is the CPU too, so what is checked is the
streamed code path itself: which layers were moved when, and that nothing changes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from spinquant import pipeline
from spinquant.config import QuantConfig, QuantSpec, RunConfig
from spinquant.evaluation.scoring import perplexity
from spinquant.models import model_parts
from spinquant.pipeline import quantize_model
from spinquant.streaming import LayerStream

pytestmark = pytest.mark.usefixtures("one_thread")

OFF = QuantSpec(bits=16)


def config(rotation: str, weights: str, offload: bool) -> RunConfig:
    cfg = RunConfig(device="cpu", offload=offload)
    cfg.rotation.mode = rotation
    cfg.quant = QuantConfig(weight_method=weights)
    if weights == "gptq":
        cfg.quant = QuantConfig(weight=QuantSpec(bits=4, clip_search=True), act=OFF, key=OFF, value=OFF,
                                weight_method="gptq")
    cfg.train.steps, cfg.train.batch, cfg.train.seq_len, cfg.train.lr = 2, 2, 16, 1.0
    return cfg


def one_at_a_time(moves: list[tuple[str, int]], n_layers: int, passes: int) -> bool:
    """load 0, unload 0, load 1, unload 1, ... once per pass."""
    one = [(what, i) for i in range(n_layers) for what in ("load", "unload")]
    return moves == one * passes


@pytest.mark.parametrize(("rotation", "weights"), [("hadamard", "gptq"), ("learned", "rtn")])
def test_streamed_quantization_gives_the_in_memory_weights(rotation, weights, monkeypatch):
    streams: list[LayerStream] = []

    class Recorded(LayerStream):
        def __init__(self, device):
            super().__init__(device)
            streams.append(self)

    monkeypatch.setattr(pipeline, "LayerStream", Recorded)
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    models = []
    for offload in (False, True):
        model = tiny_model("llama")
        quantize_model(model, config(rotation, weights, offload), progress=False, calib_ids=calib)
        models.append(model)
    memory, streamed = (dict(m.named_parameters()) for m in models)
    assert memory.keys() == streamed.keys()
    for name, p in memory.items():
        assert torch.equal(p, streamed[name]), name
    for a, b in zip(model_parts(models[0]).layers, model_parts(models[1]).layers, strict=True):
        for role, linear in a.linears().items():
            assert torch.equal(linear.quantized.codes, b.get(role).quantized.codes)
    # Only the offloaded run streamed: R1 merge, R2 merge, then the weights, each one layer at a time.
    (stream,) = streams
    assert stream.peak == 1
    assert one_at_a_time(stream.moves, n_layers=2, passes=3)


def test_streamed_perplexity_equals_in_memory():
    model = tiny_model("llama")
    quantize_model(model, config("hadamard", "rtn", offload=False), progress=False)
    windows = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(1))
    in_memory = perplexity(model, windows, progress=False)
    stream = LayerStream("cpu")
    parts = model_parts(model)
    seen: list[int] = []
    for layer in parts.layers:  # how many layers are resident as each layer finishes (before it is unloaded)
        layer.module.register_forward_hook(lambda m, a, out: seen.append(len(stream._resident)))
    with stream.forward(parts):
        streamed = perplexity(model, windows, batch_size=2, device=stream.device, progress=False)
    assert streamed == pytest.approx(in_memory, rel=1e-6)
    assert stream.peak == 1 and set(seen) == {1}
    assert one_at_a_time(stream.moves, n_layers=2, passes=2)  # 3 windows in batches of 2: two forwards


def test_stream_puts_the_rest_of_the_model_back():
    """A forward that raises inside a layer leaves that layer resident: leaving the stream unloads it."""
    model = tiny_model("llama")
    parts = model_parts(model)
    stream = LayerStream("cpu")
    with pytest.raises(RuntimeError, match="boom"), stream.forward(parts):
        parts.layers[1].module.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
        model(torch.randint(0, 96, (1, 8)))
    assert not stream._resident
    assert stream.moves == [("load", 0), ("unload", 0), ("load", 1), ("unload", 1)]


def test_offload_flag_from_the_cli(tiny_dir, tmp_path, capsys):
    """`--device cpu --offload` reaches the pipeline and evaluation and changes nothing in the result."""
    import json

    from spinquant.cli import main

    text = "The quick brown fox jumps over the lazy dog. " * 40
    (tmp_path / "eval.txt").write_text(text)
    (tmp_path / "calib.txt").write_text(text[::-1])
    args = ["quantize", "--model", str(tiny_dir), "--eval-data", str(tmp_path / "eval.txt"), "--calib-data",
            str(tmp_path / "calib.txt"), "--seq-len", "64", "--max-windows", "2", "--weight-quant", "gptq",
            "--gptq-samples", "4", "--gptq-seq-len", "32", "--device", "cpu", "--json"]
    ppl = []
    for extra in ([], ["--offload"]):
        assert main([*args, *extra]) == 0
        ppl.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"])
    assert ppl[0] == ppl[1]
