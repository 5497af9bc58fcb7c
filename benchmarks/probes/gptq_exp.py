"""GPTQ/RTN rows for issue 4. usage: gptq_exp.py rotation(none|hadamard|FILE) method(rtn|gptq) W A KV [group] [samples]
prints RESULT with WikiText-2 test (16 x 2048) and C4 (4 x 2048) ppl, GPTQ seconds and peak RSS.
env: TABLES=float32|int8, ACT_ORDER=1, W_ASYM=1, W_NOCLIP=1 (plain min-max grid), DAMP=0.01, THREADS=1."""
import sys, time, torch, copy, os, json, resource
from spinquant.loading import load_model
from spinquant.data import load_text, tokenize_windows
from spinquant.evaluate import perplexity
from spinquant.config import RunConfig
from spinquant.pipeline import quantize_model
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
rot, method, w, a, kv = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
group = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] != "0" else None
samples = int(sys.argv[7]) if len(sys.argv) > 7 else 16
base, tok = load_model()
wins = {"wiki": tokenize_windows(load_text("wikitext2"), tok, 2048, 16), "c4": tokenize_windows(load_text("c4"), tok, 2048, 4)}
cfg = RunConfig()
if rot in ("none", "hadamard"): cfg.rotation.mode = rot
else: cfg.rotation.mode = "learned"; cfg.rotation.rotation_file = rot
cfg.quant.weight.bits, cfg.quant.act.bits, cfg.quant.key.bits, cfg.quant.value.bits = w, a, kv, kv
cfg.quant.weight.group_size = group
cfg.quant.weight_method = method
cfg.tables = os.environ.get("TABLES", "float32")  # float32: comparable with the rows that predate in-memory tables
cfg.gptq.samples = samples
cfg.gptq.act_order = bool(os.environ.get("ACT_ORDER"))
cfg.quant.weight.symmetric = not os.environ.get("W_ASYM")
cfg.quant.weight.clip_search = not os.environ.get("W_NOCLIP")
cfg.gptq.damp = float(os.environ.get("DAMP", "0.01"))
m = copy.deepcopy(base)
t = time.time(); rep = quantize_model(m, cfg, tok, progress=False)
qs = time.time() - t
res = {k: round(perplexity(m, x, progress=False), 2) for k, x in wins.items()}
print("RESULT", rot, method, f"W{w}A{a}KV{kv}", f"g{group}", f"samples={samples}", f"act_order={cfg.gptq.act_order}", f"sym={cfg.quant.weight.symmetric}", f"clip_search={cfg.quant.weight.clip_search}", f"damp={cfg.gptq.damp}", res, f"quantize {qs:.0f}s",
      f"weights {rep.seconds.get('weights', 0):.0f}s", f"peakRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20:.2f}GB", json.dumps(rep.gptq), flush=True)
