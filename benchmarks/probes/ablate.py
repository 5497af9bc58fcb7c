"""Which quantizer dominates the W4A4KV4 Hadamard error on SmolLM2? Turn quantizers off one group at a time."""
import sys, time, torch, copy
from spinquant.loading import load_model
from spinquant.data import load_text, tokenize_windows
from spinquant.evaluate import perplexity
from spinquant.config import RunConfig, QuantSpec
from spinquant.pipeline import quantize_model
from spinquant.models import model_parts
torch.set_num_threads(2)
nwin = int(sys.argv[1]) if len(sys.argv) > 1 else 4
base, tok = load_model()
win = tokenize_windows(load_text("wikitext2"), tok, 2048, nwin)
def build(w):
    m = copy.deepcopy(base)
    cfg = RunConfig(); cfg.rotation.mode = "hadamard"
    cfg.quant.weight.bits = w
    for s in (cfg.quant.act, cfg.quant.key, cfg.quant.value): s.bits = 4
    quantize_model(m, cfg, progress=False)
    return m, cfg
def off(parts, roles=(), kv=()):
    saved = []
    for L in parts.layers:
        for r, lin in L.linears().items():
            if r in roles: saved.append((lin.act_quant, lin.act_quant.spec)); lin.act_quant.spec = QuantSpec(bits=16)
        for name in kv:
            q = getattr(L.attention.kv_quant, name); saved.append((q, q.spec)); q.spec = QuantSpec(bits=16)
    return saved
def restore(saved):
    for q, s in saved: q.spec = s
for w in (4, 16):
    m, cfg = build(w); parts = model_parts(m)
    for label, roles, kv in [("all on", (), ()), ("A16 at down", ("down",), ()), ("A16 at o", ("o",), ()),
                             ("A16 at qkv", ("q","k","v"), ()), ("A16 at gate/up", ("gate","up"), ()),
                             ("K16", (), ("key_quant",)), ("V16", (), ("value_quant",)),
                             ("only down A4 (+W)", ("q","k","v","o","gate","up"), ("key_quant","value_quant"))]:
        s = off(parts, roles, kv); t = time.time()
        p = perplexity(m, win, progress=False); restore(s)
        print(f"W{w} {label:22s} {p:9.2f} {time.time()-t:.0f}s", flush=True)
