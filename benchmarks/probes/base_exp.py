import sys, time, torch, copy, os
from spinquant.loading import load_model
from spinquant.data import load_text, tokenize_windows
from spinquant.evaluate import perplexity
from spinquant.config import RunConfig
from spinquant.pipeline import quantize_model
torch.set_num_threads(1)
base, tok = load_model()
nwin = int(os.environ.get("NWIN", "4"))
wins = {"c4": tokenize_windows(load_text("c4"), tok, 2048, nwin), "wiki": tokenize_windows(load_text("wikitext2"), tok, 2048, nwin)}
for mode in sys.argv[1:]:
    m = copy.deepcopy(base); cfg = RunConfig(); cfg.rotation.mode = mode
    if mode == "fp": cfg.rotation.mode = "none"; cfg.quant.weight.bits = cfg.quant.act.bits = cfg.quant.key.bits = cfg.quant.value.bits = 16
    quantize_model(m, cfg, tok, progress=False)
    print("RESULT", mode, {k: round(perplexity(m, w, progress=False), 2) for k, w in wins.items()}, flush=True)
