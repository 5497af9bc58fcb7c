"""Scratch driver used for RESULTS.md: perplexity rows, e.g. run(\"FP\",\"none\",16,16,16)."""
import sys, time, torch, copy
from spinquant.loading import load_model
from spinquant.data import load_text, tokenize_windows
from spinquant.evaluate import perplexity
from spinquant.config import RunConfig, QuantConfig, QuantSpec
from spinquant.pipeline import quantize_model
torch.set_num_threads(2)
base, tok = load_model()
win = tokenize_windows(load_text("wikitext2"), tok, 2048, 16)
print("windows", win.shape)
def run(label, mode, w, a, kv, **kw):
    m = copy.deepcopy(base)
    cfg = RunConfig(); cfg.rotation.mode = mode
    cfg.quant.weight.bits, cfg.quant.act.bits, cfg.quant.key.bits, cfg.quant.value.bits = w, a, kv, kv
    for k, v in kw.items(): exec(f"cfg.{k} = v")
    t = time.time(); quantize_model(m, cfg, progress=False)
    p = perplexity(m, win, progress=False)
    print(f"{label:30s} {p:10.2f}  {time.time()-t:.0f}s", flush=True)
for spec in sys.argv[1:]:
    eval(spec)
