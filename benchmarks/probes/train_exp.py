"""Train rotations with given knobs; report ppl on C4 (selection) and WikiText-2 test (report), 4 windows each.
usage: train_exp.py steps batch seqlen lr loss for_gptq(0/1) [tag]"""
import sys, time, torch, copy, os, json
from spinquant.loading import load_model
from spinquant.data import load_text, tokenize_windows
from spinquant.evaluate import perplexity
from spinquant.config import RunConfig
from spinquant.pipeline import quantize_model
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
if os.environ.get("PURE_STE"):  # the reference code's STE: identity gradient even where the clamp clips
    import spinquant.quant.quantizer as qz
    def _pure(x, scale, zero, bits, symmetric):
        qmin, qmax = qz.qrange(bits, symmetric)
        y = x / scale + zero
        return y + (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - y).detach()
    qz.quantize_codes = _pure
steps, batch, seqlen, lr, loss, fg = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6] == "1"
tag = sys.argv[7] if len(sys.argv) > 7 else ""
nwin = int(os.environ.get("NWIN", "4"))
base, tok = load_model()
wins = {"c4": tokenize_windows(load_text("c4"), tok, 2048, nwin), "wiki": tokenize_windows(load_text("wikitext2"), tok, 2048, nwin)}
name = f"runs/rot_{steps}_{batch}_{seqlen}_{lr}_{loss}{'_w16' if fg else ''}{tag}.safetensors"
cfg = RunConfig(); cfg.rotation.mode = "learned"; cfg.rotation.save_file = name; cfg.overwrite = True
cfg.train.steps, cfg.train.batch, cfg.train.seq_len, cfg.train.lr, cfg.train.loss, cfg.train.for_gptq = steps, batch, seqlen, lr, loss, fg
if os.environ.get("ACT_STE"): cfg.train.act_ste = os.environ["ACT_STE"]
for k in ("momentum", "clip_every"):
    if os.environ.get(k.upper()): setattr(cfg.train, k, type(getattr(cfg.train, k))(os.environ[k.upper()]))
m = copy.deepcopy(base)
t = time.time(); rep = quantize_model(m, cfg, tok, progress=True)
print(json.dumps(rep.train), flush=True)
res = {k: round(perplexity(m, w, progress=False), 2) for k, w in wins.items()}
print("RESULT", name, res, f"{time.time()-t:.0f}s", flush=True)
