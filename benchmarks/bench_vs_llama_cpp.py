"""Our packed runtime beside llama.cpp on the same core(s), in one run: prefill and decode tokens/s and ratios.

    python benchmarks/bench_vs_llama_cpp.py --bin /path/to/llama.cpp/build/bin [--threads 1,2]
        [--configs fp32,w4a8,w4a4,w4a16] [--json benchmarks/results/vs_llama_cpp.json]

For each thread count: llama-bench on llama.cpp's Q4_0 of the shipped SmolLM2 GGUF (made with llama-quantize
if missing, see bench_llama_cpp.py), then each of our configs through bench_runtime.py's child (a fresh
process per config, same prompt and decode lengths). Both prefill figures keep the last position's logits
only. Prints one Markdown table and writes a JSON record (command, commit, machine, threads, figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_llama_cpp import bench as llama_bench
from bench_llama_cpp import run as run_tool
from record import write_record


def ours(config: str, workdir: Path, prompt: int, decode: int, repeats: int, threads: int,
         loop: str = "step") -> dict:
    cmd = [sys.executable, str(HERE / "bench_runtime.py"), "--child", config, "--workdir", str(workdir),
           "--prompt-len", str(prompt), "--decode-tokens", str(decode), "--repeats", str(repeats),
           "--threads", str(threads), "--decode", loop]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{config}: child failed\n{proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, type=Path, help="llama.cpp build/bin (llama-bench, llama-quantize)")
    p.add_argument("--configs", default="fp32,w4a8,w4a4,w4a16", help="bench_runtime.py configs")
    p.add_argument("--threads", default="1,2", help="comma list of thread counts")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "spinquant" / "bench-runtime")
    p.add_argument("--gguf-dir", type=Path, default=Path("runs/llama_cpp"))
    p.add_argument("--decode", default="step", help="comma list of decode loops for the packed configs: step, "
                                                      "compiled, hf (bench_runtime.py --decode)")
    p.add_argument("--json", type=Path, help="write the record here")
    a = p.parse_args()

    from spinquant.config import DEFAULT_MODEL
    from spinquant.models.builtin import builtin_gguf

    configs = [c for c in a.configs.split(",") if c]
    subprocess.run([sys.executable, str(HERE / "bench_runtime.py"), "--configs", ",".join(configs),
                    "--workdir", str(a.workdir), "--prepare-only"], check=True)
    q4 = a.gguf_dir / "smollm2-135m-q4_0.gguf"
    if not q4.exists():
        a.gguf_dir.mkdir(parents=True, exist_ok=True)
        run_tool([str(a.bin / "llama-quantize"), "--allow-requantize", str(builtin_gguf(DEFAULT_MODEL)), str(q4), "Q4_0"])
    rows = []
    for threads in [int(t) for t in a.threads.split(",")]:
        t0 = time.time()
        ref = llama_bench(a.bin, q4, a.prompt_len, a.decode_tokens, threads, a.repeats)
        rows.append({"engine": "llama.cpp", "config": "Q4_0", "threads": threads,
                     "prefill_tok_s": ref["prefill"], "decode_tok_s": ref["decode"]})
        for config in configs:
            loops = ["hf"] if config in ("fp32", "bf16") else a.decode.split(",")
            for loop in loops:
                r = ours(config, a.workdir, a.prompt_len, a.decode_tokens, a.repeats, threads, loop)
                label = config if loop == "step" or len(loops) == 1 else f"{config} ({loop})"
                rows.append({**r, "engine": "spinquant", "config": label, "threads": threads})
        for r in rows:
            if r["threads"] == threads:
                r["prefill_vs_q4_0"] = r["prefill_tok_s"] / ref["prefill"]
                r["decode_vs_q4_0"] = r["decode_tok_s"] / ref["decode"]
        print(f"{threads} thread(s) measured in {time.time() - t0:.0f}s", file=sys.stderr)
    print(f"\nSmolLM2-135M, prompt {a.prompt_len}, decode {a.decode_tokens}, batch 1; ratios against llama.cpp "
          "Q4_0 with the same threads, same run\n")
    print("| threads | engine | config | prefill tok/s | vs Q4_0 | decode tok/s | vs Q4_0 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['engine']} | {r['config']} | {r['prefill_tok_s']:.0f} | "
              f"{r['prefill_vs_q4_0']:.2f}× | {r['decode_tok_s']:.1f} | {r['decode_vs_q4_0']:.2f}× |")
    if a.json:
        write_record(a.json, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
