"""Scratch prototype of --tune-scales (issue 18, session 13), kept for the record accuracy_tuned_w4a16_prototype:
recipe → GPTQ → end-to-end scale tuning (KL to the float model); perplexity before and after."""
import copy
import json
import sys
import time

import torch

torch.set_num_threads(1)
sys.path.insert(0, "benchmarks")
from bench_accuracy import row_config

from spinquant.evaluation.data import load_text, tokenize_windows
from spinquant.evaluation.scoring import perplexity
from spinquant.loading import load_model
from spinquant.pipeline import calibration_windows, quantize_model
from spinquant.quant.scale_tuning import tune_weight_scales

flags, out, steps, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
cfg = row_config(flags, "smollm2-135m")
fp, tok = load_model("smollm2-135m")
texts = {n: tokenize_windows(load_text(n), tok, 2048, k) for n, k in
         (("wikitext2", 16), ("c4", 4), ("runs/acc18/c4_select.txt", 4))}
m = copy.deepcopy(fp)
t = time.perf_counter(); quantize_model(m, cfg, tok, progress=False); tq = time.perf_counter() - t
res = {"flags": flags, "quantize_s": round(tq), "before": {k: perplexity(m, w, progress=False) for k, w in texts.items()}}
print(res, flush=True)
calib = calibration_windows("wikitext2-valid", cfg, tok, 512, 2 * steps, "tuning data")
teacher = lambda ids: fp(input_ids=ids, use_cache=False).logits
t = time.perf_counter()
losses = tune_weight_scales(m, teacher, calib, steps, batch=2, lr=lr, progress=False)
res["tune_s"] = round(time.perf_counter() - t); res["losses"] = losses; res["steps"] = steps; res["lr"] = lr
res["after"] = {k: perplexity(m, w, progress=False) for k, w in texts.items()}
print(res["tune_s"], losses[:3], losses[-3:], res["after"], flush=True)
with open(out, "w") as f:
    json.dump(res, f, indent=1)
