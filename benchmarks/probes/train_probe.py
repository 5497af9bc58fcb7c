"""Scratch driver used for RESULTS.md: train rotations (args: steps batch seq_len lr eval_windows; FOR_GPTQ=1 trains at W16), save them under runs/, report W4A4KV4 RTN perplexity."""
import sys, time, torch, copy
from spinquant.loading import load_model
from spinquant.data import load_text, tokenize_windows
from spinquant.evaluate import perplexity
from spinquant.config import RunConfig
from spinquant.pipeline import quantize_model
torch.set_num_threads(2)
import os; os.makedirs("runs", exist_ok=True)
steps, batch, seqlen, lr = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
nwin = int(sys.argv[5]) if len(sys.argv) > 5 else 16
base, tok = load_model()
win = tokenize_windows(load_text("wikitext2"), tok, 2048, nwin)
cfg = RunConfig(); cfg.rotation.mode = "learned"; cfg.rotation.save_file = f"runs/rot_{steps}_{batch}_{seqlen}_{lr}.safetensors"; cfg.overwrite=True
cfg.train.steps, cfg.train.batch, cfg.train.seq_len, cfg.train.lr = steps, batch, seqlen, lr
import os
if os.environ.get("FOR_GPTQ"): cfg.train.for_gptq = True; cfg.rotation.save_file = cfg.rotation.save_file.replace(".safetensors", "_w16.safetensors")
m = copy.deepcopy(base)
t = time.time(); rep = quantize_model(m, cfg, tok, progress=True)
print(rep.train, flush=True)
print("learned ppl", perplexity(m, win, progress=False), time.time() - t, flush=True)
