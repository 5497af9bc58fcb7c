"""Probe for issue 4: GPTQ on a grid whose clip ratio is searched in the H metric, i.e. per row the shrink
minimising (w - Q(w))ᵀ H (w - Q(w)) (RTN output error on the calibration inputs) instead of Σ|w - Q(w)|^2.4.
usage: gptq_hclip.py [full|diag] — W4A16, Hadamard, per channel, 16 x 2048 calibration; prints RESULT."""
import copy, os, resource, sys, time

import torch

import spinquant.quant.gptq as gptq_mod
import spinquant.quant.gptq_driver as driver
from spinquant.config import RunConfig
from spinquant.data import load_text, tokenize_windows
from spinquant.evaluate import perplexity
from spinquant.loading import load_model
from spinquant.pipeline import quantize_model
from spinquant.quant.quantizer import compute_qparams, fake_quant

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
mode = sys.argv[1] if len(sys.argv) > 1 else "full"
current = {}


def h_clip_qparams(w, spec, grid=100, max_shrink=0.8):
    h = current["h"].float()
    hd = torch.diagonal(h)
    best_err = torch.full((w.shape[0], 1), float("inf"))
    best = None
    for i in range(int(max_shrink * grid)):
        ratio = 1.0 - i / grid
        s, z = compute_qparams(w, spec.bits, spec.symmetric, ratio)
        d = fake_quant(w, s, z, spec.bits, spec.symmetric) - w
        err = ((d @ h) * d).sum(-1, keepdim=True) if mode == "full" else (d * d * hd).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (s, z) if best is None else (torch.where(better, s, best[0]), torch.where(better, z, best[1]))
    return best


real = gptq_mod.gptq_quantize


def wrapped(weight, hessian, spec, **kw):
    current["h"] = hessian
    return real(weight, hessian, spec, **kw)


gptq_mod.weight_qparams = h_clip_qparams  # gptq_quantize's per-channel grid
driver.gptq_quantize = wrapped
base, tok = load_model()
wins = {"wiki": tokenize_windows(load_text("wikitext2"), tok, 2048, 16), "c4": tokenize_windows(load_text("c4"), tok, 2048, 4)}
cfg = RunConfig()
cfg.rotation.mode = "hadamard"
cfg.quant.weight.bits, cfg.quant.act.bits, cfg.quant.key.bits, cfg.quant.value.bits = 4, 16, 16, 16
cfg.quant.weight_method = "gptq"
cfg.gptq.samples = 16
cfg.tables = "float32"  # comparable with the earlier W4A16 rows (they predate in-memory tables)
m = copy.deepcopy(base)
t = time.time()
rep = quantize_model(m, cfg, tok, progress=False)
res = {k: round(perplexity(m, x, progress=False), 2) for k, x in wins.items()}
print("RESULT hclip", mode, res, f"quantize {time.time() - t:.0f}s",
      f"peakRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}GB", flush=True)
