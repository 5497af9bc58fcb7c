"""Scratch driver used for RESULTS.md: loss of one calibration batch under the training-time forward vs the merged model, min-max vs clip-searched weights."""
import copy, torch
from spinquant.loading import load_model
from spinquant.data import load_text, tokenize_windows
from spinquant.config import RunConfig
from spinquant.models import model_parts
from spinquant.pipeline import install_modules, set_activation_quant, quantize_weights_rtn
from spinquant.rotate import prepare, merge_r1, merge_r2
from spinquant.rotations import load_rotations, make_rotations
from spinquant.train import RotationParams, _Installed, training_weight_spec, next_token_loss
from dataclasses import replace
base, tok = load_model()
ids = tokenize_windows(load_text("wikitext2-valid"), tok, 512, 2)
cfg = RunConfig()
for name, rot in [("had", make_rotations("hadamard", 576, 64, 30)), ("learned", load_rotations("runs/rot_60_2_512_1.5.safetensors"))]:
    m = copy.deepcopy(base); parts = model_parts(m); prepare(parts); install_modules(parts, True, True)
    set_activation_quant(parts, cfg.quant)
    inst = _Installed(parts, RotationParams(rot), training_weight_spec(cfg))
    with torch.no_grad(): lt = next_token_loss(m, ids).item()
    inst.remove()
    merge_r1(parts, rot.r1); merge_r2(parts, rot.r2)
    m2 = copy.deepcopy(m)
    quantize_weights_rtn(parts, replace(cfg.quant.weight, clip_search=False), progress=False)
    with torch.no_grad(): lm = next_token_loss(m, ids).item()
    parts2 = model_parts(m2); quantize_weights_rtn(parts2, cfg.quant.weight, progress=False)
    with torch.no_grad(): lc = next_token_loss(m2, ids).item()
    print(name, "train-install", lt, "merged minmax", lm, "merged clipsearch", lc, flush=True)
