"""The compressed-tensors export in stock transformers (issue 19): Hadamard R1/R2 W4A16 SmolLM2 quantized with
--no-r3 --no-r4, exported, loaded with plain `AutoModelForCausalLM.from_pretrained`; its perplexity and greedy
continuation beside the model in memory.

    python benchmarks/check_ct_transformers.py --json benchmarks/results/ct_transformers.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers
from record import write_record

import spinquant
from spinquant import RunConfig
from spinquant.export import export_compressed_tensors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows of 2048 tokens")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    model, tok = spinquant.load_model("smollm2-135m")
    cfg = RunConfig()
    cfg.quant.act.bits = cfg.quant.key.bits = cfg.quant.value.bits = 16
    cfg.rotation.r3 = cfg.rotation.r4 = False
    cfg.tables = "float32"  # the export's tables are float: compare like with like
    spinquant.quantize(model, tok, cfg, progress=False)
    ours = spinquant.evaluate(model, tok, max_windows=args.windows, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = export_compressed_tensors(model, tok, Path(tmp) / "ct", dtype="float32")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        theirs = spinquant.evaluate(hf, tok, max_windows=args.windows, progress=False)
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        greedy = {"max_new_tokens": 24, "do_sample": False}
        with torch.no_grad():
            a, b = model.generate(ids, **greedy), hf.generate(ids, **greedy)
    figures = {"windows": args.windows, "our_ppl": ours, "transformers_ppl": theirs,
               "relative_difference": theirs / ours - 1, "greedy_equal": bool(torch.equal(a, b)),
               "our_text": tok.decode(a[0]), "transformers_text": tok.decode(b[0]),
               "transformers": transformers.__version__}
    print(f"ours {ours:.4f}  transformers {theirs:.4f}  ({100 * (theirs / ours - 1):+.2f} %)  "
          f"greedy equal: {figures['greedy_equal']}")
    print(figures["our_text"], "|", figures["transformers_text"], sep="\n")
    if args.json:
        write_record(args.json, **figures)


if __name__ == "__main__":
    main()
